"""BREEN model package: plain PyTorch + transformers, no ray or deepspeed.

- `breen.config`: `BreenConfig` with presets ("qwen2.5-7b", "mid", "tiny"), sentinel ids, parameter counts.
- `breen.model`: `BreenForCausalLM` (patch embedding, queries, Qwen2 decoder with image expert, losses).
- `breen.data`: sample -> model inputs (`encode_sample`, `encode_prompt`), `collate`, `SampleRejected`.
- `breen.convert`: Qwen2 checkpoint -> BREEN (`python -m breen.convert`).
- `breen.stages`: `set_trainable(model, stage)`, `param_groups(model, stage, lrs)`.
- `breen.generate`: greedy decoding (`python -m breen.generate`).
- `breen.processing`: `BreenProcessor` (tokenizer + image preprocessing + prompt layout, for transformers).
- `breen.hf`: Auto-class registration and the remote-code files of an export.

Submodules are imported on first use, so `import breen` stays cheap. It registers BREEN with
transformers' ``AutoConfig`` / ``AutoModelForCausalLM`` / ``AutoProcessor`` when those load (`breen.hf`),
without importing torch or transformers itself.
"""

import importlib

from breen import hf as _hf

_LAZY = {
    "BreenConfig": "breen.config",
    "BreenForCausalLM": "breen.model",
    "encode_sample": "breen.data",
    "collate": "breen.data",
    "SampleRejected": "breen.data",
    "set_trainable": "breen.stages",
    "param_groups": "breen.stages",
    "BreenProcessor": "breen.processing",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'breen' has no attribute {name!r}")


_hf.install()
