"""The BREEN model in one file: patch embedding, learnable queries, Qwen2 decoder with an image expert,
alignment head and losses.

BREEN (arXiv 2503.12446) is an encoder-free vision-language model: a Qwen2 decoder reads raw 14x14 image
patches, and 100 learnable queries placed after the image are pulled towards (cached) CLIP features.
Every decoder layer owns two SwiGLU FFNs, ``text_expert`` and ``image_expert``, each scaled by a scalar
sigmoid gate; image and query tokens use the image expert, all other tokens the text expert. Each expert
runs only on its own tokens. Attention, norms, embeddings and ``lm_head`` are shared and identical to
Hugging Face Qwen2, so a converted Qwen2 checkpoint gives the same text-only logits (gates off).

Batch format (right padding; `breen.data.collate` builds it):

===============  ======================  ==================================================================
key              shape / dtype           meaning
===============  ======================  ==================================================================
input_ids        [B, L] int64            text token ids, with IMAGE_TOKEN_ID (-200) repeated once per
                                         image token and QUERY_TOKEN_ID (-300) once per query (100), so
                                         positions, masks and labels line up 1:1 with the spliced sequence;
                                         pad_token_id after the end of each row
attention_mask   [B, L] int64            1 for real tokens, 0 for padding
labels           [B, L] int64            target ids aligned with input_ids (the model shifts by one);
                                         any negative value (IGNORE_INDEX = -100) carries no loss
pixel_values     [B, 3, S, S] uint8      RGB canvas (S = config.image_size) from `breen.data.letterbox`,
                                         normalised here with image_mean/std; a float tensor is taken as
                                         already normalised. Optional (None: no images in the batch)
image_grid       [B, 2] int64            valid image-token (rows, cols) per sample, (0, 0) for no image
fine / coarse    [B, 64, D] / [B, 36, D] cached teacher features (D = config.clip_dim), any float dtype
align_mask       [B] bool                rows that carry alignment targets (default: every row with a
                                         query block)
===============  ======================  ==================================================================

Packed format (training; `breen.data.pack` builds it): one row holds n samples back to back, so the only
padding is an alignment tail. ``input_ids``/``labels`` are [1, T], ``cu_seqlens`` [n + 1] int32 gives the
sample boundaries (no ``attention_mask``, no ``position_ids``), and ``pixel_values``, ``image_grid``,
``fine``, ``coarse`` and ``align_mask`` have one entry per sample instead of per row. Positions restart at
0 in every sample, attention stays inside each sample (flash-attn's varlen kernel through transformers'
``cu_seq_lens_*`` kwargs, else one causal SDPA call per sample: `packed_sdpa`), a sample's last token
predicts nothing of the next sample, and so the losses equal those of the padded batch of the same samples.

The output (`BreenCausalLMOutput`) has ``loss = lm_loss + align_loss_weight * (align_loss_fine +
align_loss_coarse)`` and each part separately for logging. With labels, the LM head runs only on the
supervised positions and ``logits`` is None (full [B, L, V] logits of a 7B model at 2.5k tokens do not
fit); without labels ``logits`` holds [B, L or logits_to_keep, V]. The forward takes exactly the keys
above plus the decoding ones (`BreenForCausalLM.forward` says who needs each); any other keyword raises.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.cache_utils import Cache, DynamicCache
from transformers.masking_utils import create_causal_mask
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import ModelOutput
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from breen.attention import default_attn_implementation
from breen.config import ACTIVE_COMPONENTS, IMAGE_TOKEN_ID, QUERY_TOKEN_ID, BreenConfig
from breen.stages import COMPONENTS


# ----------------------------------------------------------------------------- Qwen2 building blocks
class BreenRMSNorm(nn.Module):
    """Qwen2 RMSNorm: normalise in fp32, scale by a learned weight in the input dtype."""

    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class BreenRotaryEmbedding(nn.Module):
    """1-D RoPE over sequential positions (image tokens and queries included), theta = config.rope_theta."""

    def __init__(self, config: BreenConfig):
        super().__init__()
        self.head_dim, self.theta = config.head_dim, config.rope_theta
        self.register_buffer("inv_freq", self.compute_inv_freq(), persistent=False)

    def compute_inv_freq(self) -> torch.Tensor:
        return 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float) / self.head_dim))

    @torch.no_grad()
    def forward(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = position_ids[..., None].float() * self.inv_freq.to(x.device)  # [B, L, head_dim/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [B, L, head_dim]
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def eager_attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    """Reference attention (used when config._attn_implementation == "eager")."""
    n_rep = module.num_key_value_groups
    key = key.repeat_interleave(n_rep, dim=1)  # [B, kv_heads, S, hd] -> [B, heads, S, hd]
    value = value.repeat_interleave(n_rep, dim=1)
    weights = torch.matmul(query, key.transpose(2, 3)) * scaling  # [B, heads, L, S]
    if attention_mask is not None:
        if attention_mask.dtype == torch.bool:
            weights = weights.masked_fill(~attention_mask, torch.finfo(weights.dtype).min)
        else:
            weights = weights + attention_mask
    weights = F.softmax(weights, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = F.dropout(weights, p=dropout, training=module.training)
    out = torch.matmul(weights, value).transpose(1, 2).contiguous()  # [B, L, heads, hd]
    return out, weights


class BreenAttention(nn.Module):
    """Qwen2 grouped-query attention (q/k/v with bias, o without), dispatched to transformers' backends."""

    def __init__(self, config: BreenConfig, layer_idx: int):
        super().__init__()
        self.config, self.layer_idx = config, layer_idx
        self.head_dim = config.head_dim
        self.num_key_value_groups = config.num_attention_heads // config.num_key_value_heads
        self.scaling = self.head_dim**-0.5
        self.is_causal = True
        q_out, kv_out = config.num_attention_heads * self.head_dim, config.num_key_value_heads * self.head_dim
        self.q_proj = nn.Linear(config.hidden_size, q_out, bias=True)
        self.k_proj = nn.Linear(config.hidden_size, kv_out, bias=True)
        self.v_proj = nn.Linear(config.hidden_size, kv_out, bias=True)
        self.o_proj = nn.Linear(q_out, config.hidden_size, bias=False)

    def forward(
        self, x, position_embeddings, attention_mask, cache=None, packed: PackedSequences | None = None
    ):
        """``packed``: the row holds several samples (`PackedSequences`): flash-attention's varlen kernel
        gets their boundaries, other backends run `packed_sdpa`."""
        b, n, _ = x.shape
        q = self.q_proj(x).view(b, n, -1, self.head_dim).transpose(1, 2)  # [B, heads, L, hd]
        k = self.k_proj(x).view(b, n, -1, self.head_dim).transpose(1, 2)  # [B, kv_heads, L, hd]
        v = self.v_proj(x).view(b, n, -1, self.head_dim).transpose(1, 2)
        cos, sin = (t.unsqueeze(1) for t in position_embeddings)  # [B, 1, L, hd]
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if cache is not None:
            k, v = cache.update(k, v, self.layer_idx)  # [B, kv_heads, S, hd], S = past + L
        if packed is not None and not packed.flash:  # packed row, no varlen kernel: causal SDPA per sample
            out = packed_sdpa(q, k, v, packed, self.scaling, self.num_key_value_groups)
            return self.o_proj(out.reshape(b, n, -1))
        attend: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention
        )
        out, _ = attend(
            self,
            q,
            k,
            v,
            attention_mask,
            dropout=self.config.attention_dropout if self.training else 0.0,
            scaling=self.scaling,
            **(packed.flash_kwargs() if packed is not None else {}),
        )  # [B, L, heads, hd]
        return self.o_proj(out.reshape(b, n, -1))  # [B, L, heads*hd] -> [B, L, H]


class PackedSequences(NamedTuple):
    """Sample boundaries of a packed batch (one row holding several samples back to back), computed once
    per forward.

    ``cu_seqlens`` [n + 1] int32 covers the whole row: the samples, then the padding tail as one more
    segment when the row is longer than its samples. ``flash``: hand the boundaries to flash-attention's
    varlen kernel (transformers' ``cu_seq_lens_*`` kwargs) instead of `packed_sdpa`.
    """

    cu_seqlens: torch.Tensor  # [n_segments + 1] int32, last = row length
    bounds: tuple[int, ...]  # cu_seqlens as Python ints (per-sample slicing without a device sync)
    max_length: int
    segment_ids: torch.Tensor  # [1, L] int64: index of the segment (sample) of every token
    flash: bool

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: torch.Tensor, length: int, flash: bool) -> PackedSequences:
        bounds = [int(x) for x in cu_seqlens.tolist()]
        if bounds[0] != 0 or any(b < a for a, b in itertools.pairwise(bounds)) or bounds[-1] > length:
            raise ValueError(f"cu_seqlens must rise from 0 to at most the row length {length}: {bounds}")
        if bounds[-1] < length:  # padding tail: its own segment, so no real token attends to it
            bounds.append(length)
        cu = torch.tensor(bounds, dtype=torch.int32, device=cu_seqlens.device)
        lengths = (cu[1:] - cu[:-1]).long()
        segments = torch.repeat_interleave(torch.arange(len(lengths), device=cu.device), lengths)[None]
        return cls(cu, tuple(bounds), max(b - a for a, b in itertools.pairwise(bounds)), segments, flash)

    def position_ids(self) -> torch.Tensor:
        """[1, L] int64: positions restart at 0 in every sample (the RoPE positions of unpacked samples)."""
        seg = self.segment_ids[0]
        return (torch.arange(len(seg), device=seg.device) - self.cu_seqlens.long()[seg])[None]

    def flash_kwargs(self) -> dict:
        return {"cu_seq_lens_q": self.cu_seqlens, "cu_seq_lens_k": self.cu_seqlens,
                "max_length_q": self.max_length, "max_length_k": self.max_length}  # fmt: skip


def packed_sdpa(q, k, v, packed: PackedSequences, scaling: float, n_rep: int) -> torch.Tensor:
    """Causal attention inside each sample of a packed row, without a varlen kernel.

    q [1, heads, L, hd], k/v [1, kv_heads, L, hd] -> [1, L, heads, hd]. One SDPA call per sample, so the
    cost is sum(l_i^2), as with flash-attention's varlen kernel, not L^2 with a block-diagonal mask.
    """
    k, v = k.repeat_interleave(n_rep, dim=1), v.repeat_interleave(n_rep, dim=1)  # GQA -> full heads
    parts = [
        F.scaled_dot_product_attention(
            q[:, :, lo:hi], k[:, :, lo:hi], v[:, :, lo:hi], is_causal=True, scale=scaling
        )
        for lo, hi in itertools.pairwise(packed.bounds)
        if hi > lo
    ]
    return torch.cat(parts, dim=2).transpose(1, 2)  # [1, heads, L, hd] -> [1, L, heads, hd]


class SwiGLU(nn.Module):
    """Qwen2 FFN: down(act(gate(x)) * up(x))."""

    def __init__(self, config: BreenConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.act = ACT2FN[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


# ----------------------------------------------------------------------------- the image expert
class ExpertRouting(NamedTuple):
    """Flat token indices (into B*L) of text tokens and of image/query tokens, computed once per forward."""

    text_idx: torch.Tensor  # [N_text] int64
    image_idx: torch.Tensor  # [N_image] int64

    @classmethod
    def from_mask(cls, image_mask: torch.Tensor) -> ExpertRouting:
        flat = image_mask.reshape(-1)  # [B*L]
        return cls(torch.nonzero(~flat).view(-1), torch.nonzero(flat).view(-1))


class ModalityExperts(nn.Module):
    """Two gated SwiGLU experts with fixed modality routing (no router, no load balancing).

    out[t] = sigmoid(text_expert_gate(x[t])) * text_expert(x[t])    for text (and padding) tokens
    out[t] = sigmoid(image_expert_gate(x[t])) * image_expert(x[t])  for image and query tokens
    (without the sigmoid factor when config.expert_gate == "none"). Each expert sees only its own tokens.
    Both experts are always called, on an empty batch if need be, so that every rank touches every
    parameter in the same order (ZeRO-3 gathers parameters per module call) and every parameter gets a
    gradient (zero when unused).
    """

    def __init__(self, config: BreenConfig):
        super().__init__()
        self.text_expert = SwiGLU(config)
        self.image_expert = SwiGLU(config)
        self.text_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)
        self.image_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)
        self.gated = config.expert_gate == "sigmoid"

    def _run_expert(self, expert: nn.Module, gate: nn.Module, x: torch.Tensor) -> torch.Tensor:
        y = expert(x)
        return torch.sigmoid(gate(x)) * y if self.gated else y

    def forward(self, x: torch.Tensor, routing: ExpertRouting) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])  # [B, L, H] -> [B*L, H]
        y_text = self._run_expert(
            self.text_expert, self.text_expert_gate, flat.index_select(0, routing.text_idx)
        )
        y_image = self._run_expert(
            self.image_expert, self.image_expert_gate, flat.index_select(0, routing.image_idx)
        )
        out = flat.new_zeros(flat.shape).index_copy(0, routing.text_idx, y_text)
        out = out.index_copy(0, routing.image_idx, y_image)  # every row written exactly once
        return out.view_as(x)  # [B*L, H] -> [B, L, H]


class BreenDecoderLayer(GradientCheckpointingLayer):
    """Qwen2 decoder layer whose FFN is `ModalityExperts` (attention and both norms shared)."""

    def __init__(self, config: BreenConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = BreenRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = BreenAttention(config, layer_idx)
        self.post_attention_layernorm = BreenRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = ModalityExperts(config)

    def forward(
        self,
        hidden_states,
        routing,
        attention_mask=None,
        position_embeddings=None,
        cache=None,
        packed: PackedSequences | None = None,
    ):
        attn = self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings, attention_mask, cache, packed
        )
        hidden_states = hidden_states + attn
        return hidden_states + self.mlp(self.post_attention_layernorm(hidden_states), routing)


class BreenDecoder(nn.Module):
    """Token embedding, decoder layers and final norm (module names match Qwen2's ``model.*``)."""

    def __init__(self, config: BreenConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)
        self.layers = nn.ModuleList(BreenDecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = BreenRMSNorm(config.hidden_size, config.rms_norm_eps)
        self.rotary_emb = BreenRotaryEmbedding(config)

    def forward(
        self,
        inputs_embeds,
        image_mask,
        attention_mask=None,
        position_ids=None,
        cache=None,
        packed: PackedSequences | None = None,
    ):
        """inputs_embeds [B, L, H], image_mask [B, L] bool -> final normed hidden states [B, L, H].

        ``packed``: the row holds several samples (`PackedSequences`); positions restart per sample and
        attention stays inside each sample (flash varlen kernel, or `packed_sdpa`).
        """
        if packed is not None:
            return self._run_layers(inputs_embeds, image_mask, None, packed.position_ids(), None, packed)
        if position_ids is None:
            past = cache.get_seq_length() if cache is not None else 0
            position_ids = torch.arange(past, past + inputs_embeds.shape[1], device=inputs_embeds.device)[
                None
            ]
        # The cache goes by position: transformers 5.24 renamed this parameter (past_key_values -> cache).
        mask = create_causal_mask(self.config, inputs_embeds, attention_mask, cache, position_ids)
        return self._run_layers(inputs_embeds, image_mask, mask, position_ids, cache, None)

    def _run_layers(self, inputs_embeds, image_mask, mask, position_ids, cache, packed):
        position_embeddings = self.rotary_emb(inputs_embeds, position_ids)
        routing = ExpertRouting.from_mask(image_mask)
        h = inputs_embeds
        for layer in self.layers:
            h = layer(
                h,
                routing,
                attention_mask=mask,
                position_embeddings=position_embeddings,
                cache=cache,
                packed=packed,
            )
        return self.norm(h)


# ----------------------------------------------------------------------------- vision side
def valid_token_mask(image_grid: torch.Tensor, grid: int) -> torch.Tensor:
    """[B, 2] (rows, cols) of centred images -> [B, grid, grid] bool mask of their tokens on the canvas."""
    rows, cols = image_grid[:, 0:1], image_grid[:, 1:2]  # [B, 1]
    r = torch.arange(grid, device=image_grid.device)[None]  # [1, grid]
    top, left = (grid - rows) // 2, (grid - cols) // 2
    row_ok = (r >= top) & (r < top + rows)  # [B, grid]
    col_ok = (r >= left) & (r < left + cols)
    return row_ok[:, :, None] & col_ok[:, None, :]  # [B, grid, grid]


class PatchEmbed(nn.Module):
    """Conv2d(3 -> patch_dim, 14, stride 14, no bias) on the canvas, keep valid tokens, Linear-GELU-Linear.

    No CLS, no row separators, no positional embedding: positions come from the decoder's 1-D RoPE over
    the raster order (as in the released ``VisionLinearTokenizer`` + ``mlp2x_gelu`` projector).
    """

    def __init__(self, config: BreenConfig):
        super().__init__()
        self.config = config
        self.conv = nn.Conv2d(3, config.patch_dim, config.patch_size, stride=config.patch_size, bias=False)
        self.fc1 = nn.Linear(config.patch_dim, config.hidden_size)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(config.hidden_size, config.hidden_size)
        for layer in (self.conv, self.fc1, self.fc2):
            layer.init_rule = "torch_default"  # see BreenForCausalLM._init_weights, rule 4

    def normalize(self, pixel_values: torch.Tensor) -> torch.Tensor:
        if pixel_values.dtype != torch.uint8:
            return pixel_values.to(self.conv.weight.dtype)  # already normalised
        mean = torch.tensor(self.config.image_mean, device=pixel_values.device).view(1, 3, 1, 1)
        std = torch.tensor(self.config.image_std, device=pixel_values.device).view(1, 3, 1, 1)
        return ((pixel_values.float() / 255.0 - mean) / std).to(self.conv.weight.dtype)

    def forward(self, pixel_values: torch.Tensor, image_grid: torch.Tensor) -> torch.Tensor:
        """pixel_values [B, 3, S, S], image_grid [B, 2] -> image tokens [sum(rows*cols), H], sample-major."""
        feats = self.conv(self.normalize(pixel_values))  # [B, C, G, G], G = S / patch_size
        valid = valid_token_mask(image_grid, feats.shape[-1])  # [B, G, G]
        tokens = feats.permute(0, 2, 3, 1)[valid]  # [B, G, G, C] -> [N, C], raster order within a sample
        return self.fc2(self.act(self.fc1(tokens)))  # [N, H]


class AlignHead(nn.Module):
    """LayerNorm(clip_dim) + Linear(clip_dim -> hidden, no bias): maps teacher features into hidden space."""

    def __init__(self, config: BreenConfig):
        super().__init__()
        self.norm = nn.LayerNorm(config.clip_dim)
        self.proj = nn.Linear(config.clip_dim, config.hidden_size, bias=False)
        self.proj.init_rule = "torch_default"  # see BreenForCausalLM._init_weights, rule 5

    def forward(self, targets: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(targets.to(self.proj.weight.dtype)))  # [..., D] -> [..., H]


def cosine_alignment_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """1 - mean cosine similarity over all (sample, query) pairs; pred, target [N, Q, H]. Computed in fp32."""
    return 1.0 - F.cosine_similarity(pred.float(), target.float(), dim=-1).mean()


# ----------------------------------------------------------------------------- the full model
@dataclass
class BreenCausalLMOutput(ModelOutput):
    """Losses (each part separately for logging), logits and the KV cache.

    The cache field is ``cache``, the name transformers' own outputs use since 5.24 (a field named
    ``past_key_values`` clashes with 5.24's compatibility property of that name and its constructor
    rewrite, which broke every forward pass).
    """

    loss: torch.Tensor | None = None
    lm_loss: torch.Tensor | None = None
    align_loss_fine: torch.Tensor | None = None
    align_loss_coarse: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    cache: Cache | None = None


class BreenForCausalLM(PreTrainedModel, GenerationMixin):
    """BREEN vision-language model (see the module docstring for the batch format).

    Module tree: ``patch_embed`` (conv + fc1/fc2), ``queries`` [100, H], ``align_head`` (norm + proj),
    ``model`` (``embed_tokens``, ``layers.N.{input_layernorm, self_attn, post_attention_layernorm, mlp}``
    with ``mlp.{text_expert, image_expert, text_expert_gate, image_expert_gate}``, ``norm``), ``lm_head``.
    """

    config_class = BreenConfig
    base_model_prefix = "model"
    supports_gradient_checkpointing = True
    _no_split_modules = ["BreenDecoderLayer"]  # noqa: RUF012 (transformers class attributes)
    _skip_keys_device_placement = ["cache", "past_key_values"]  # noqa: RUF012 (5.24 name, older name)
    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}  # noqa: RUF012 (only if tied)
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_attention_backend = True

    def __init__(self, config: BreenConfig):
        if config._attn_implementation is None:
            config._attn_implementation = default_attn_implementation()
        super().__init__(config)
        self.patch_embed = PatchEmbed(config)
        self.queries = nn.Parameter(torch.empty(config.num_queries, config.hidden_size))  # fine first
        self.align_head = AlignHead(config)
        self.model = BreenDecoder(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    # ------------------------------------------------------------------ initialisation
    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Every initialisation rule of the model. transformers calls this for each module that owns
        parameters or buffers (children first); parameters already loaded from a checkpoint are skipped
        by `transformers.initialization`. Linear/Conv layers follow rule 1 unless built with
        ``init_rule = "torch_default"`` (patch embedding and alignment head).

        1. Decoder (Qwen2 rules): attention q/k/v/o and both experts' Linears, ``lm_head`` and the token
           embedding ~ N(0, initializer_range = 0.02); biases 0; embedding row ``pad_token_id`` 0. In practice
           `breen.convert` overwrites all of them from Qwen2, both experts as copies of the Qwen2 FFN.
        2. Expert gates (Linear H -> 1, no bias) ~ N(0, initializer_range), as the released code's post_init:
           at step 0 each FFN output is scaled by about 0.5.
        3. RMSNorm weights 1; the rotary ``inv_freq`` buffer is recomputed (it is not saved).
        4. Patch embedding (conv, fc1, fc2): PyTorch's default init (kaiming-uniform with a = sqrt(5), biases
           U(+-1/sqrt(fan_in))): the released code builds these modules outside post_init [inferred].
        5. Alignment head: LayerNorm weight 1, bias 0; Linear PyTorch default init. With the released
           quirk ``align_head_frozen`` it stays at this random init for all three stages.
        6. Learnable queries ~ N(0, 1) (``torch.randn``, as released).
        """
        std = self.config.initializer_range
        if isinstance(module, BreenForCausalLM):
            init.normal_(module.queries, mean=0.0, std=1.0)
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            if getattr(module, "init_rule", "normal") == "torch_default":
                _torch_default_init(module)
            else:
                init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            init.normal_(module.weight, mean=0.0, std=std)
            pad = module.padding_idx
            if pad is not None and not getattr(module.weight, "_is_hf_initialized", False):
                init.zeros_(module.weight[pad])
        elif isinstance(module, (nn.LayerNorm, BreenRMSNorm)):
            init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
        elif isinstance(module, BreenRotaryEmbedding):
            init.copy_(module.inv_freq, module.compute_inv_freq())

    # ------------------------------------------------------------------ embeddings plumbing
    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_grid: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Splice image tokens and queries into the token embeddings.

        input_ids [B, L] with sentinels -> (inputs_embeds [B, L, H], image_mask [B, L] bool), where
        image_mask marks image and query positions (routed to the image expert). ``segment_ids`` [B, L]:
        the sample of every token (`_segments`; default: one sample per row).
        """
        is_image = input_ids == IMAGE_TOKEN_ID  # [B, L]
        is_query = input_ids == QUERY_TOKEN_ID
        embeds = self.model.embed_tokens(input_ids.clamp(min=0))  # sentinel rows are overwritten below
        if pixel_values is None:  # still call the patch embedding (on nothing): same modules on every rank
            s = self.config.image_size
            pixel_values = embeds.new_zeros(0, 3, s, s)
            image_grid = input_ids.new_zeros(0, 2)
        image_tokens = self.patch_embed(pixel_values, image_grid.to(input_ids.device))  # [N_img, H]
        n_sentinels = int(is_image.sum())
        if image_tokens.shape[0] != n_sentinels:
            raise ValueError(
                f"input_ids hold {n_sentinels} image sentinels but image_grid gives {image_tokens.shape[0]} "
                "image tokens (pixel_values missing, or the grid does not match the ids)"
            )
        embeds = embeds.masked_scatter(is_image[..., None], image_tokens.to(embeds.dtype))
        seg = _segments(input_ids, segment_ids).reshape(-1)
        n_query = torch.bincount(seg[is_query.reshape(-1)], minlength=int(seg.max()) + 1)  # per sample
        if bool(((n_query != 0) & (n_query != self.config.num_queries)).any()):
            raise ValueError(
                f"each sample needs 0 or {self.config.num_queries} query sentinels, got {n_query.tolist()}"
            )
        n_blocks = int((n_query > 0).sum())
        queries = self.queries[None].expand(n_blocks, -1, -1).reshape(-1, self.config.hidden_size)  # [n*Q, H]
        embeds = embeds.masked_scatter(is_query[..., None], queries.to(embeds.dtype))
        return embeds, is_image | is_query

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: torch.Tensor,
        *,
        attention_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid: torch.Tensor | None = None,
        fine: torch.Tensor | None = None,
        coarse: torch.Tensor | None = None,
        align_mask: torch.Tensor | None = None,
        cu_seqlens: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: Cache | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int = 0,
        past_key_values: Cache | None = None,
        return_dict: bool = True,
    ) -> BreenCausalLMOutput:
        """Run the model on a prepared batch (module docstring) and compute the losses.

        There is no ``**kwargs``: an unknown keyword (a misspelt ``cu_seqlen=``) raises Python's TypeError
        naming it instead of being dropped. Who needs each keyword:

        - the batch keys (``breen.data.collate`` / ``pack``, `jobs.ingest.MODEL_KEYS`): ``input_ids``,
          ``attention_mask``, ``labels``, ``pixel_values``, ``image_grid``, ``fine``, ``coarse``,
          ``align_mask``, ``cu_seqlens`` [n + 1] (the batch is packed: one row, samples back to back).
          The alignment loss needs ``fine`` and ``coarse``; it uses the final normed hidden state at each
          query position minus ``config.align_position_shift``.
        - decoding (`breen.generate`, `breen.lmms` and transformers' ``generate``): ``cache`` (KV cache),
          ``use_cache`` (return a `DynamicCache`, created when ``cache`` is None; default: config.use_cache
          in eval mode without labels), ``logits_to_keep`` > 0 (logits only for the last that many
          positions; ``generate`` passes it because this signature names it), ``position_ids`` (``generate``
          passes them; default: positions after the cache).
        - transformers compatibility only: ``past_key_values`` is ``cache`` under its name before
          transformers 5.24 (older ``generate``); ``return_dict`` is passed by transformers 5.24's
          ``generate`` (always True); the output is always a `BreenCausalLMOutput`, so False is refused.
        With labels the LM head runs only on the supervised positions and ``logits`` is None; without
        labels ``logits`` holds [B, L or logits_to_keep, V].
        """
        if not return_dict:
            raise ValueError("return_dict=False is not supported: the output is always a BreenCausalLMOutput")
        if past_key_values is not None:
            if cache is not None:
                raise ValueError(
                    "pass the KV cache once: cache or past_key_values (its older name), not both"
                )
            cache = past_key_values
        packed = segment_ids = None
        if cu_seqlens is not None:
            packed = self._packed(input_ids, cu_seqlens, attention_mask, position_ids, cache, use_cache)
            segment_ids, use_cache = packed.segment_ids, False
        inputs_embeds, image_mask = self.embed_inputs(input_ids, pixel_values, image_grid, segment_ids)
        if use_cache is None:
            use_cache = self.config.use_cache and not self.training and labels is None
        if use_cache and cache is None:
            cache = DynamicCache(config=self.config)
        hidden = self.model(
            inputs_embeds, image_mask, attention_mask, position_ids, cache, packed
        )  # [B, L, H]

        lm_loss = None
        if labels is not None:
            shifted = labels[:, 1:]  # position t predicts labels[t + 1]
            supervised = shifted >= 0  # [B, L-1]
            if segment_ids is not None:  # a sample's last token does not predict the next sample's first
                supervised &= segment_ids[:, 1:] == segment_ids[:, :-1]
            logits_sup = self.lm_head(hidden[:, :-1][supervised]).float()  # [N_sup, V]
            denom = supervised.sum().clamp(min=1)
            lm_loss = F.cross_entropy(logits_sup, shifted[supervised], reduction="sum") / denom

        align_fine = align_coarse = None
        if fine is not None and coarse is not None:
            align_fine, align_coarse = self.alignment_losses(
                hidden, input_ids, fine, coarse, align_mask, segment_ids
            )

        loss = None
        if lm_loss is not None or align_fine is not None:
            loss = lm_loss if lm_loss is not None else hidden.new_zeros((), dtype=torch.float32)
            if align_fine is not None:
                loss = loss + self.config.align_loss_weight * (align_fine + align_coarse)

        logits = None
        if labels is None:
            kept = hidden[:, -logits_to_keep:] if logits_to_keep else hidden  # [B, K, H]
            logits = self.lm_head(kept)  # [B, K, V]
        return BreenCausalLMOutput(
            loss=loss,
            lm_loss=lm_loss,
            align_loss_fine=align_fine,
            align_loss_coarse=align_coarse,
            logits=logits,
            cache=cache if use_cache else None,
        )

    def alignment_losses(
        self,
        hidden: torch.Tensor,
        input_ids: torch.Tensor,
        fine: torch.Tensor,
        coarse: torch.Tensor,
        align_mask: torch.Tensor | None = None,
        segment_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(fine, coarse) alignment losses: 1 - mean cosine between hidden states and projected targets.

        hidden [B, L, H] final normed states; fine [N, 64, D], coarse [N, 36, D], one per sample (N = B,
        or the samples of a packed row, see ``segment_ids``). Samples used: ``align_mask`` [N] (default:
        those with a query block). The state paired with query k sits at query k's position minus
        ``config.align_position_shift`` (1 in the released code: the token before the query).
        """
        q, n_fine = self.config.num_queries, self.config.num_fine_queries
        is_query = (input_ids == QUERY_TOKEN_ID).reshape(-1)  # [B*L]
        blocks = torch.nonzero(is_query).view(-1, q)  # [n_blocks, Q] flat positions, in sequence order
        owner = _segments(input_ids, segment_ids).reshape(-1)[blocks[:, 0]]  # the sample of each block
        n = fine.shape[0]
        if owner.numel() and int(owner.max()) >= n:
            raise ValueError(
                f"fine/coarse hold {n} samples but a query block belongs to sample {int(owner.max())}"
            )
        block_of = torch.full((n,), -1, dtype=torch.long, device=owner.device)
        block_of[owner] = torch.arange(len(owner), device=owner.device)
        has_block = block_of >= 0  # [N]
        use = has_block if align_mask is None else align_mask.to(torch.bool)
        if bool((use & ~has_block).any()):
            raise ValueError("align_mask selects a sample without a query block")
        rows = torch.nonzero(use).view(-1)  # [n]
        positions = blocks[block_of[rows]] - self.config.align_position_shift  # [n, Q] flat positions
        pred = hidden.reshape(-1, hidden.shape[-1])[positions]  # [n, Q, H]
        targets = self.align_head(torch.cat([fine[rows], coarse[rows]], dim=1))  # [n, 64+36, D] -> [n, Q, H]
        if rows.numel() == 0:  # keep the graph (zero gradients) so every rank backpropagates the same way
            zero = targets.float().sum() * 0.0 + hidden.float().sum() * 0.0
            return zero, zero
        fine_loss = cosine_alignment_loss(pred[:, :n_fine], targets[:, :n_fine])
        coarse_loss = cosine_alignment_loss(pred[:, n_fine:], targets[:, n_fine:])
        return fine_loss, coarse_loss

    def _packed(self, ids, cu_seqlens, attention_mask, position_ids, cache, use_cache):
        """Check a packed batch and describe its samples (`PackedSequences`)."""
        if ids.shape[0] != 1:
            raise ValueError(f"a packed batch (cu_seqlens) is one row, got {ids.shape[0]} rows")
        if attention_mask is not None or position_ids is not None:
            raise ValueError("a packed batch takes no attention_mask or position_ids (cu_seqlens gives both)")
        if cache is not None or use_cache:
            raise ValueError("a packed batch cannot use a KV cache (packing is for training)")
        flash = (self.config._attn_implementation or "").startswith("flash_attention")
        return PackedSequences.from_cu_seqlens(cu_seqlens, ids.shape[1], flash)

    # ------------------------------------------------------------------ bookkeeping
    def component_params(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Every parameter, once (tied weights counted once), grouped by component (see `COMPONENTS`)."""
        groups: dict[str, list[tuple[str, nn.Parameter]]] = {c: [] for c in COMPONENTS}
        for name, param in self.named_parameters():
            groups[component_of(name)].append((name, param))
        return groups

    def num_params(self, active: bool = False) -> int:
        """Stored parameters, or (``active=True``) those one text token passes through (MFU estimates;
        see `BreenConfig.flops_per_token`). Works on the meta device and under ZeRO-3 (``ds_numel``)."""
        groups = self.component_params()
        names = ACTIVE_COMPONENTS if active else COMPONENTS
        return sum(param_numel(p) for c in names for _, p in groups[c])


def _segments(input_ids: torch.Tensor, segment_ids: torch.Tensor | None) -> torch.Tensor:
    """[B, L] sample index of every token: the given ``segment_ids``, or the row index (unpacked)."""
    if segment_ids is not None:
        return segment_ids
    b, n = input_ids.shape
    return torch.arange(b, device=input_ids.device)[:, None].expand(b, n)


def component_of(name: str) -> str:
    """Component of a parameter name, by the fixed module tree of `BreenForCausalLM`."""
    parts = name.split(".")
    top = parts[0]
    if top in ("patch_embed", "queries", "align_head", "lm_head"):
        return top
    if top == "model":
        if parts[1] == "embed_tokens":
            return "embed_tokens"
        if parts[1] == "norm":
            return "norms"
        if parts[1] == "layers":
            sub = parts[3]
            if sub == "self_attn":
                return "attention"
            if sub in ("input_layernorm", "post_attention_layernorm"):
                return "norms"
            if sub == "mlp":
                return {
                    "text_expert": "text_experts",
                    "image_expert": "image_experts",
                    "text_expert_gate": "text_gates",
                    "image_expert_gate": "image_gates",
                }[parts[4]]
    raise KeyError(f"parameter {name!r} belongs to no BREEN component")


def param_numel(p: torch.Tensor) -> int:
    return int(getattr(p, "ds_numel", p.numel()))


def _torch_default_init(layer: nn.Module) -> None:
    """PyTorch's own Linear/Conv init, through transformers' loaded-weight-aware init functions."""
    init.kaiming_uniform_(layer.weight, a=5**0.5)
    if getattr(layer, "bias", None) is not None:
        fan_in = layer.weight[0].numel()
        bound = 1.0 / fan_in**0.5
        init.uniform_(layer.bias, -bound, bound)
