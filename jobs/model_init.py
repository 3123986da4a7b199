"""The model a training worker starts from (`jobs.train`): built directly in DeepSpeed's ZeRO-3 partitions,
or whole, with the weights of a Hugging Face safetensors directory.

Reads:  a BREEN model directory (``config.json`` + ``*.safetensors``, `breen.convert.safetensors_entries`:
        the one reader of safetensors checkpoints). Writes: nothing. Not run directly: each Ray Train worker
        calls `build_model` (``python -m jobs.train``); tests call it on a one-process group.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from jobs.config import TrainConfig


def build_model(cfg: TrainConfig, model_config, init_dir: Path | None, ds_config: dict[str, Any], rank: int):
    """The model, with weights from `init_dir` (or from the config only: a checkpoint fills them next).

    With ``model.zero_init`` the model is built inside ``deepspeed.zero.Init`` (each module partitioned
    across ranks as soon as it is built, so no rank holds a full copy) and the safetensors weights are
    copied in one tensor at a time (rank 0 reads, the gather/scatter distributes). Without it every
    rank loads the full model (`from_pretrained`) and DeepSpeed partitions it at initialisation.
    """
    import deepspeed
    import torch

    from breen.model import BreenForCausalLM

    dtype = torch.bfloat16 if cfg.scale.precision == "bf16" else torch.float32
    attn = cfg.model.attn_implementation
    if not cfg.model.zero_init:
        if init_dir is not None:
            model = BreenForCausalLM.from_pretrained(init_dir, dtype=dtype, attn_implementation=attn)
        else:
            model = BreenForCausalLM._from_config(model_config, dtype=dtype, attn_implementation=attn)
    else:
        from transformers.initialization import no_init_weights

        # No init rules: every weight is loaded next (the rules index full tensors, absent here). The dtype
        # comes from the DeepSpeed config: zero.Init(dtype=torch.float32) gives bf16 on CPU (DeepSpeed 0.19).
        with no_init_weights(), deepspeed.zero.Init(config_dict_or_path=ds_config):
            model = BreenForCausalLM._from_config(model_config, dtype=dtype, attn_implementation=attn)
        if model_config.tie_word_embeddings:
            model.tie_weights()
        if init_dir is not None:
            load_weights_zero3(model, init_dir, rank)
    model.config.use_cache = False
    return model


def load_weights_zero3(model, directory: Path, rank: int) -> None:
    """Copy a Hugging Face safetensors checkpoint into a ZeRO-3-partitioned model, tensor by tensor: every
    rank walks the same keys (`breen.convert.safetensors_entries`), rank 0 reads each tensor and the
    gather/scatter of ``GatheredParameters`` distributes it."""
    import deepspeed
    import torch

    from breen.convert import safetensors_entries

    params = dict(model.named_parameters(remove_duplicate=False))
    seen: set[str] = set()
    with torch.no_grad():
        try:
            for key, read in safetensors_entries(directory):
                if key not in params:
                    raise KeyError(f"model.init_from: unexpected weight {key!r} in {directory}")
                param = params[key]
                with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                    if rank == 0:
                        tensor = read()
                        if tuple(tensor.shape) != tuple(param.shape):
                            raise ValueError(f"{key}: shape {tuple(tensor.shape)} != {tuple(param.shape)}")
                        param.copy_(tensor.to(param.dtype))
                seen.add(key)
        except FileNotFoundError as err:
            raise FileNotFoundError(f"model.init_from: {err}") from None
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    missing = sorted(set(params) - seen - tied)
    if missing:
        raise KeyError(f"model.init_from: {directory} lacks {len(missing)} weights, e.g. {missing[:3]}")
