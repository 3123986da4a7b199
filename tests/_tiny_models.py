"""Offline tiny models for tests: the byte-level BPE tokenizer with the Qwen special tokens (the demo's,
`jobs.tiny.tiny_tokenizer`, imported here), the `tiny` BREEN config matching it, a tiny random
`Qwen2ForCausalLM`, a saved Hugging Face Qwen2 directory, and hidden states of a forward.

Nothing is downloaded. Tests import it as `from tests._tiny_models import ...` (`tests` is a package; pytest
puts the repository root on sys.path).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from breen.config import BreenConfig
from jobs.tiny import tiny_tokenizer  # the one tiny tokenizer (the demo's): tests and demo share a vocabulary


def tiny_config(**overrides) -> BreenConfig:
    """The `tiny` preset (its pad/eos ids match `tiny_tokenizer`), with field overrides."""
    return BreenConfig.preset("tiny", **overrides)


def tiny_qwen2(config: BreenConfig | None = None, seed: int = 0):
    """A random `transformers.Qwen2ForCausalLM` with the decoder shapes of `config` (default tiny)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    config = config or tiny_config()
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(Qwen2Config(**config.qwen2_config_dict()))
    with torch.no_grad():  # non-zero biases so the conversion test checks them
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0.0, 0.02)
            layer.input_layernorm.weight.normal_(1.0, 0.1)
            layer.post_attention_layernorm.weight.normal_(1.0, 0.1)
    return model.eval()


def save_tiny_qwen2_dir(path: str | Path, config: BreenConfig | None = None, seed: int = 0) -> Path:
    """Save a tiny random Qwen2 (safetensors) and the tiny tokenizer to `path`; return the path."""
    path = Path(path)
    tiny_qwen2(config, seed).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def png_bytes(width: int, height: int, seed: int = 0) -> bytes:
    """A random RGB PNG of the given size, encoded."""
    rng = np.random.default_rng(seed)
    img = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def tiny_batch(config: BreenConfig | None = None, tokenizer=None, seed: int = 0) -> dict[str, torch.Tensor]:
    """A padded batch of `tiny_samples`."""
    from breen.data import collate

    config = config or tiny_config()
    return collate(tiny_samples(config, tokenizer, seed), pad_token_id=config.pad_token_id)


def tiny_samples(config: BreenConfig | None = None, tokenizer=None, seed: int = 0) -> list[dict]:
    """Three encoded samples: plain caption with image and targets (square), stage-3 chat with image and
    targets (portrait), and a text-only chat sample (no queries, no targets)."""
    from breen.data import encode_sample

    config = config or tiny_config()
    tokenizer = tokenizer or tiny_tokenizer()
    rng = np.random.default_rng(seed)

    def targets():
        return {
            "fine": rng.standard_normal((config.num_fine_queries, config.clip_dim)).astype(np.float16),
            "coarse": rng.standard_normal((config.num_coarse_queries, config.clip_dim)).astype(np.float16),
        }

    chat = [
        {"from": "human", "value": "<image>\nWhat is in the image?"},
        {"from": "gpt", "value": "A cat on a red sofa."},
    ]
    text_only = [{"from": "human", "value": "Describe a dog."}, {"from": "gpt", "value": "Two dogs run."}]
    samples = [
        encode_sample(
            tokenizer, config, text="A photo of a cat.", image=png_bytes(64, 64, seed), **targets()
        ),
        encode_sample(tokenizer, config, text=chat, image=png_bytes(30, 60, seed + 1), **targets()),
        encode_sample(tokenizer, config, text=text_only),
    ]
    return samples


def forward_with_hidden(model, **batch):
    """(output, final normed hidden states [B, L, H]) of ``model(**batch)``: the decoder's output, caught by
    a forward hook (the forward returns no hidden states; gradients flow through the returned tensor)."""
    seen = []
    handle = model.model.register_forward_hook(lambda _module, _args, out: seen.append(out))
    try:
        out = model(**batch)
    finally:
        handle.remove()
    return out, seen[0]
