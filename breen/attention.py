"""Choice of the attention backend: the one guarded import of the GPU kernel.

`default_attn_implementation()` returns ``"flash_attention_2"`` when the `flash-attn` package (the `gpu`
extra) imports and CUDA is available, otherwise ``"sdpa"`` (PyTorch scaled-dot-product attention) and
logs the fallback once. `BreenForCausalLM` calls it when no implementation was requested; pass
``attn_implementation="sdpa"`` (or "eager") to `from_pretrained` / the config to override.
Flash attention needs bf16/fp16 weights; SDPA works in any dtype and on CPU.
"""

from __future__ import annotations

import functools
import logging

import torch

logger = logging.getLogger(__name__)


@functools.cache
def default_attn_implementation() -> str:
    """Best available attention implementation name for transformers' attention interface."""
    try:
        import flash_attn  # noqa: F401  (the `gpu` extra)
    except ImportError as err:
        reason = f"flash-attn not importable ({err.__class__.__name__})"
    else:
        if torch.cuda.is_available():
            return "flash_attention_2"
        reason = "flash-attn installed but CUDA is not available"
    logger.info("BREEN attention: %s; using PyTorch SDPA", reason)
    return "sdpa"
