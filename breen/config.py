"""Typed configuration of the BREEN model, with named presets.

`BreenConfig` is a transformers `PreTrainedConfig` (a dataclass in transformers 5), so it is saved as
`config.json` next to the weights and read back by `BreenForCausalLM.from_pretrained`.

Presets (`BreenConfig.preset(name, **overrides)`):

- ``"qwen2.5-7b"``: the released model. Qwen2.5-7B-Instruct decoder (hidden 3584, 28 layers, 28 query /
  4 KV heads, FFN 18944, vocab 152064, RoPE theta 1e6, untied embeddings), 1024-channel patch embedding,
  672-px images, CLIP ViT-L/14 teacher features (1024-d). About 13.3B stored, 7.6B active parameters.
- ``"mid"``: the Qwen2.5-0.5B-Instruct decoder shapes (hidden 896, 24 layers, tied embeddings) with the
  full-size vision side, about 0.8B stored: fits one GPU for benchmarks and can be converted from the real
  0.5B checkpoint.
- ``"tiny"``: 2 layers, width 64, 32-channel patch embedding and 32-d teacher features, 56-px images
  (at most 4x4 image tokens), for CPU tests. Same 14-px patch and 28-px rounding rules as the real model.

The three quirks of the released code (see `reference/breen-method.md` section 7) are named fields, all set
to the released behaviour by default; `PAPER_FIGURE_SETTINGS` holds the alternative reading:

- ``queries_frozen_in_stage1`` (True): the learnable queries match none of the stage-1 trainable keywords
  in the released code and stay at their random init during stage 1 (the paper figure trains them).
- ``align_head_frozen`` (True): the alignment head (LayerNorm + Linear mapping CLIP features into the
  hidden space) is frozen at its random init in every stage (its name contains "clip").
- ``align_position_shift`` (1): query target k is compared with the final hidden state one position
  *before* query k (next-position feature prediction); 0 compares the query outputs themselves.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedConfig

from breen.geometry import CLIP_MEAN, CLIP_STD, letterbox_size

# Sentinel ids in `input_ids` (as in the released code): one entry per image token / query token.
IMAGE_TOKEN_ID = -200
QUERY_TOKEN_ID = -300
# Label value that carries no loss (PyTorch cross-entropy default).
IGNORE_INDEX = -100
# The components (`breen.stages.COMPONENTS`) one text token passes through, one expert and its gate per
# layer: the "active" parameters of `BreenConfig.param_counts` and `BreenForCausalLM.num_params`.
ACTIVE_COMPONENTS = ("embed_tokens", "attention", "norms", "text_experts", "text_gates", "lm_head")

RELEASED_CODE_QUIRKS: dict[str, Any] = {
    "queries_frozen_in_stage1": True,
    "align_head_frozen": True,
    "align_position_shift": 1,
}
PAPER_FIGURE_SETTINGS: dict[str, Any] = {
    "queries_frozen_in_stage1": False,
    "align_head_frozen": False,
    "align_position_shift": 0,
}


class BreenConfig(PreTrainedConfig):
    """Configuration of `BreenForCausalLM` (defaults = the released Qwen2.5-7B model).

    Decoder fields follow `Qwen2Config` names so a Qwen2 `config.json` maps onto them one to one
    (`from_qwen2_config`). Vision, query and alignment fields:

    - ``patch_size`` (14), ``patch_dim`` (1024): Conv2d(3 -> patch_dim, patch_size, stride patch_size).
    - ``image_size`` (672): the long side every image is resized to, and the square canvas side.
    - ``size_multiple`` (28): the short side is rounded *up* to a multiple of this (must be an even number
      of patches so the centred image starts on a patch boundary).
    - ``image_mean`` / ``image_std`` (default `breen.geometry.CLIP_MEAN` / ``CLIP_STD``): normalisation of
      uint8 pixels; the mean is the canvas colour.
    - ``fine_grid`` (8), ``coarse_grid`` (6): query grids; queries = fine_grid**2 + coarse_grid**2 = 100,
      fine first. ``clip_dim`` (1024): width of the cached teacher features ``fine`` [64, clip_dim] and
      ``coarse`` [36, clip_dim].
    - ``align_loss_weight`` (lambda = 1.0): total loss = LM + lambda * (fine + coarse).
    - ``expert_gate``: "sigmoid" (released: output = sigmoid(gate(x)) * expert(x)) or "none" (output =
      expert(x); used by the Qwen2 parity test).
    - the three released-code quirks, documented in the module docstring.
    """

    model_type = "breen"
    keys_to_ignore_at_inference = ["cache", "past_key_values"]  # noqa: RUF012 (transformers class attribute; 5.24 name, older name)

    # --- decoder (Qwen2) ---
    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    attention_dropout: float = 0.0
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False
    use_cache: bool = True
    pad_token_id: int | None = 151643
    bos_token_id: int | None = 151643
    eos_token_id: int | list[int] | None = 151645
    # --- image expert ---
    expert_gate: str = "sigmoid"
    # --- patch embedding and image geometry ---
    patch_size: int = 14
    patch_dim: int = 1024
    image_size: int = 672
    size_multiple: int = 28
    image_mean: list[float] | None = None
    image_std: list[float] | None = None
    # --- learnable queries and alignment ---
    clip_dim: int = 1024
    fine_grid: int = 8
    coarse_grid: int = 6
    align_loss_weight: float = 1.0
    # --- released-code quirks (module docstring) ---
    queries_frozen_in_stage1: bool = True
    align_head_frozen: bool = True
    align_position_shift: int = 1

    def __post_init__(self, **kwargs):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.image_mean is None:
            self.image_mean = list(CLIP_MEAN)
        if self.image_std is None:
            self.image_std = list(CLIP_STD)
        super().__post_init__(**kwargs)
        self.validate_breen()

    def validate_breen(self) -> None:
        """Fail fast, naming the field, on inconsistent settings."""

        def need(ok: bool, field: str, why: str) -> None:
            if not ok:
                raise ValueError(f"BreenConfig.{field}: {why}")

        need(
            self.num_attention_heads % self.num_key_value_heads == 0,
            "num_key_value_heads",
            "must divide num_attention_heads",
        )
        need(self.expert_gate in ("sigmoid", "none"), "expert_gate", "must be 'sigmoid' or 'none'")
        need(self.align_position_shift in (0, 1), "align_position_shift", "must be 0 or 1")
        need(
            self.size_multiple % (2 * self.patch_size) == 0,
            "size_multiple",
            "must be a multiple of 2 * patch_size (centred images must start on a patch boundary)",
        )
        need(self.image_size % self.size_multiple == 0, "image_size", "must be a multiple of size_multiple")
        need(len(self.image_mean) == 3 and len(self.image_std) == 3, "image_mean", "needs 3 channels")

    # ------------------------------------------------------------------ derived sizes
    @property
    def num_fine_queries(self) -> int:
        return self.fine_grid**2

    @property
    def num_coarse_queries(self) -> int:
        return self.coarse_grid**2

    @property
    def num_queries(self) -> int:
        return self.num_fine_queries + self.num_coarse_queries

    @property
    def patch_grid(self) -> int:
        """Tokens per side of the full canvas (672 / 14 = 48)."""
        return self.image_size // self.patch_size

    def image_token_grid(self, width: int, height: int) -> tuple[int, int]:
        """(rows, cols) of image tokens for a `width` x `height` image.

        `breen.geometry.letterbox_size` with ``image_size`` and ``size_multiple`` (the teacher's rule with
        the model's numbers): the long side becomes `image_size`, the short side is rounded *up* to a
        multiple of `size_multiple`. Square -> 48x48 = 2304 tokens; 4:3 landscape -> 36 rows x 48 cols.
        """
        w_px, h_px = letterbox_size(width, height, self.image_size, self.size_multiple)
        return h_px // self.patch_size, w_px // self.patch_size

    # ------------------------------------------------------------------ parameter counts
    def param_counts(self) -> dict[str, int]:
        """Analytic parameter counts per component, plus ``stored`` and ``active`` totals.

        ``active`` = parameters a text token passes through (`ACTIVE_COMPONENTS`): embeddings, attention,
        norms, *one* expert and its gate per layer, final norm, lm_head (the image expert, patch embedding,
        queries and alignment head are excluded; an image token swaps the embedding row for the patch
        embedding instead).
        `BreenForCausalLM.num_params` counts the same from real tensors.
        """
        h, i, v = self.hidden_size, self.intermediate_size, self.vocab_size
        q_out = self.num_attention_heads * self.head_dim
        kv_out = self.num_key_value_heads * self.head_dim
        attention = (h * q_out + q_out) + 2 * (h * kv_out + kv_out) + q_out * h
        expert = 3 * h * i
        n = self.num_hidden_layers
        counts = {
            "embed_tokens": v * h,
            "lm_head": 0 if self.tie_word_embeddings else v * h,
            "attention": n * attention,
            "norms": n * 2 * h + h,
            "text_experts": n * expert,
            "image_experts": n * expert,
            "text_gates": n * h,
            "image_gates": n * h,
            "patch_embed": 3 * self.patch_size**2 * self.patch_dim + (self.patch_dim * h + h) + (h * h + h),
            "queries": self.num_queries * h,
            "align_head": 2 * self.clip_dim + self.clip_dim * h,
        }
        counts["stored"] = sum(counts.values())
        counts["active"] = sum(counts[c] for c in ACTIVE_COMPONENTS)
        return counts

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token (forward + backward) for an MFU estimate.

        6 * N, with N the active parameters that do matmuls (active minus the embedding lookup; lm_head
        counted), plus the attention score/value term 12 * layers * heads * head_dim * seq_len (PaLM
        appendix B convention, causal masking not discounted).
        """
        counts = self.param_counts()
        n_matmul = counts["active"] - counts["embed_tokens"]
        if self.tie_word_embeddings:
            n_matmul += self.vocab_size * self.hidden_size  # the tied lm_head still does a matmul
        attn = 12 * self.num_hidden_layers * self.num_attention_heads * self.head_dim * seq_len
        return 6.0 * n_matmul + attn

    # ------------------------------------------------------------------ constructors
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> BreenConfig:
        """A named preset ("qwen2.5-7b", "mid", "tiny"), with field overrides."""
        if name not in _PRESETS:
            raise ValueError(f"unknown BREEN preset {name!r}; choose one of {sorted(_PRESETS)}")
        return cls(**{**_PRESETS[name], **overrides})

    @classmethod
    def from_qwen2_config(cls, qwen: dict[str, Any] | PreTrainedConfig, **overrides: Any) -> BreenConfig:
        """Decoder fields from a Hugging Face Qwen2 config (dict or object); vision fields from overrides.

        Rejects Qwen2 configs that use sliding-window attention (BREEN uses full attention everywhere).
        """
        q = qwen.to_dict() if isinstance(qwen, PreTrainedConfig) else dict(qwen)
        if q.get("model_type") not in (None, "qwen2"):
            raise ValueError(f"expected a qwen2 config, got model_type={q.get('model_type')!r}")
        if q.get("use_sliding_window"):
            raise ValueError("Qwen2 config: use_sliding_window=True is not supported by BREEN")
        rope = q.get("rope_parameters") or q.get("rope_scaling") or {}
        if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
            raise ValueError(f"Qwen2 config: rope type {rope.get('rope_type')!r} is not supported")
        theta = rope.get("rope_theta", q.get("rope_theta", 10000.0))
        fields = {
            k: q[k]
            for k in (
                "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "hidden_act", "max_position_embeddings", "rms_norm_eps",
                "attention_dropout", "initializer_range", "tie_word_embeddings", "pad_token_id",
                "bos_token_id", "eos_token_id",
            )
            if k in q
        }  # fmt: skip
        fields["rope_theta"] = float(theta)
        if fields.get("num_key_value_heads") is None:
            fields["num_key_value_heads"] = fields["num_attention_heads"]
        return cls(**{**fields, **overrides})

    def qwen2_config_dict(self) -> dict[str, Any]:
        """The matching Hugging Face Qwen2 config fields (for building the reference model in tests)."""
        return {
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": self.hidden_act,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "tie_word_embeddings": self.tie_word_embeddings,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "use_sliding_window": False,
        }


_PRESETS: dict[str, dict[str, Any]] = {
    "qwen2.5-7b": {},  # the class defaults are the released model
    "mid": {
        "vocab_size": 151936,
        "hidden_size": 896,
        "intermediate_size": 4864,
        "num_hidden_layers": 24,
        "num_attention_heads": 14,
        "num_key_value_heads": 2,
        "tie_word_embeddings": True,
    },
    "tiny": {
        "vocab_size": 512,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 4096,
        "pad_token_id": 0,
        "bos_token_id": 0,
        "eos_token_id": 2,
        "patch_dim": 32,
        "image_size": 56,
        "clip_dim": 32,
    },
}


def describe_counts(config: BreenConfig) -> str:
    """One-line human summary of stored and active parameter counts."""
    c = config.param_counts()
    return f"stored {c['stored'] / 1e9:.3f}B, active per token {c['active'] / 1e9:.3f}B"
