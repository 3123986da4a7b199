"""Checkpoints (ZeRO-3 shards + client state through ``ray.train.report``) and the stage-end export.

A checkpoint is one folder in Ray Train's storage (``<output_dir>/<name>/step-NNNNNNN/``), merged by Ray
from what every rank wrote into its own temporary folder::

    zero/zero_pp_rank_R_mp_rank_00_{model,optim}_states.pt   DeepSpeed ZeRO-3 shards of rank R
    latest, zero_to_fp32.py                                  DeepSpeed bookkeeping (rank 0)
    rng/rank-RRRRR.json                                      RNG states of rank R
    train_state.json                                         client state (rank 0), human-readable
    train_config.json                                        the resolved TrainConfig
    model/                                                   BreenConfig + tokenizer (to rebuild the model)

Client state (`TrainState`): optimizer step, samples and tokens seen, data position (global stream
position = step x global batch), rejected-sample counts by reason, and the scale it was written with. The
learning-rate schedule is a pure function of the step, so restoring the step restores the scheduler.
Weights and optimizer moments live in the ZeRO shards; ``deepspeed.utils.zero_to_fp32`` consolidates them
offline. Ray keeps the last ``checkpoint.keep_last`` checkpoints. Restoring never unpickles code: the ZeRO
files are read with ``torch.load(weights_only=True)`` and a two-class allowlist (`weights_only_loads`).

Export (stage end): the consolidated weights, gathered on rank 0 one module at a time, saved in Hugging
Face layout (``config.json`` + safetensors) with the tokenizer, ``train_config.json`` and
``breen_stage.json``: `BreenForCausalLM.from_pretrained`, `breen.generate` and the next stage load it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from breen.storage import Store

ZERO_TAG = "zero"
STATE_FILE = "train_state.json"
MODEL_DIR = "model"
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train V2's record of registered checkpoints


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    samples_seen: int = 0  # samples trained on (rejected ones excluded), all ranks
    tokens_seen: int = 0  # non-padding tokens (image + queries + text), all ranks
    data_position: int = 0  # global stream position consumed = step * global_batch_size
    rejected: dict[str, int] = field(default_factory=dict)  # samples left out, by reason
    stage: str = ""
    total_steps: int = 0
    num_workers: int = 0
    micro_batch_size: int = 0
    global_batch_size: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainState:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def checkpoint_name(step: int) -> str:
    return f"step-{step:07d}"


# ----------------------------------------------------------------------------- RNG
def rng_state() -> dict[str, Any]:
    import torch

    np_state = np.random.get_state()
    state = {
        "python": [list(x) if isinstance(x, tuple) else x for x in random.getstate()],
        "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
        "torch": torch.get_rng_state().tolist(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state().tolist()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    import torch

    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_state = state["numpy"]
    np.random.set_state((np_state[0], np.asarray(np_state[1], dtype=np.uint32), *np_state[2:]))
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(torch.tensor(state["cuda"], dtype=torch.uint8))


# ----------------------------------------------------------------------------- save / restore
def save_checkpoint(
    engine,
    state: TrainState,
    *,
    rank: int,
    train_config: dict[str, Any],
    model_config,
    tokenizer,
    scratch: str | None = None,
) -> str:
    """Every rank: write this rank's part of the checkpoint into a fresh local folder and return it
    (the caller reports it with ``ray.train.report``; Ray merges the ranks' folders)."""
    local = tempfile.mkdtemp(prefix=f"breen-ckpt-r{rank}-", dir=scratch)
    engine.save_checkpoint(local, tag=ZERO_TAG, client_state={"train_state": state.to_dict()})
    rng_dir = Path(local, "rng")
    rng_dir.mkdir(exist_ok=True)
    (rng_dir / f"rank-{rank:05d}.json").write_text(json.dumps(rng_state()))
    if rank == 0:
        Path(local, STATE_FILE).write_text(json.dumps(state.to_dict(), indent=2, sort_keys=True) + "\n")
        Path(local, "train_config.json").write_text(json.dumps(train_config, indent=2, sort_keys=True) + "\n")
        model_config.save_pretrained(Path(local, MODEL_DIR))
        tokenizer.save_pretrained(Path(local, MODEL_DIR))
    return local


def zero3_safe_globals() -> list[type]:
    """The only non-tensor, non-builtin classes a DeepSpeed ZeRO-3 checkpoint (ours: fp32 on CPU, bf16 on
    GPU, no fp16, no MoE) pickles, found with ``torch.serialization.get_unsafe_globals_in_checkpoint`` on
    real checkpoints (tests/test_reliability_checkpoint.py checks that the list is still exact):
    ``*_model_states.pt`` has none; ``*_optim_states.pt`` has the optimizer's ``zero_stage``
    (``ZeroStageEnum.weights``) and ``loss_scaler`` (a static ``LossScaler``: bf16 and fp32 never get the
    fp16 ``DynamicLossScaler``). Both are plain data: unpickling them sets attributes, it runs no code."""
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    return [LossScaler, ZeroStageEnum]


@contextlib.contextmanager
def weights_only_loads(engine) -> Iterator[None]:
    """While active, every file DeepSpeed's ``engine.load_checkpoint`` reads is unpickled with
    ``torch.load(weights_only=True)`` and the `zero3_safe_globals` allowlist, never as full pickles
    (DeepSpeed 0.19's ``TorchCheckpointEngine.load`` turns weights_only off): a checkpoint
    file holding any other global (a pickle that would run code) is refused with an UnpicklingError.

    How: all of ``load_checkpoint``'s reads (model states, the ZeRO optimizer shards, the state-dict
    loader) go through ``engine.checkpoint_engine.load``; for the duration of the block that method is
    shadowed on this engine's instance only (saving and other engines are untouched) and restored after.
    The universal-checkpoint path, which unpickles full pickles with its own direct loads, is refused.
    """
    import torch
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    ckpt_engine = engine.checkpoint_engine
    if type(ckpt_engine) is not TorchCheckpointEngine:
        raise RuntimeError(f"restore: unsupported DeepSpeed checkpoint engine {type(ckpt_engine).__name__} "
                           "(only TorchCheckpointEngine is loaded with weights_only=True)")  # fmt: skip
    if engine.load_universal_checkpoint():
        raise RuntimeError("restore: DeepSpeed universal checkpoints are not supported (DeepSpeed unpickles "
                           "them as full pickles)")  # fmt: skip
    allowed = zero3_safe_globals()

    def load(path: str, map_location=None):
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)

    ckpt_engine.load = load  # instance attribute: shadows TorchCheckpointEngine.load
    try:
        yield
    finally:
        del ckpt_engine.load


def restore_checkpoint(engine, directory: str | Path, rank: int) -> TrainState:
    """Every rank: load ZeRO shards + optimizer state, the client state and this rank's RNG.

    The DeepSpeed files are unpickled with ``weights_only=True`` (see `weights_only_loads`); everything
    else is JSON."""
    with weights_only_loads(engine):
        load_path, client = engine.load_checkpoint(
            str(directory), tag=ZERO_TAG, load_optimizer_states=True, load_lr_scheduler_states=False
        )
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint in {directory}")
    state = TrainState.from_dict(client["train_state"])
    rng_file = Path(directory, "rng", f"rank-{rank:05d}.json")
    if rng_file.exists():
        set_rng_state(json.loads(rng_file.read_text()))
    return state


@contextlib.contextmanager
def local_checkpoint(checkpoint, local_rank: int) -> Iterator[str | None]:
    """The Ray Train checkpoint as a local folder to read: its own folder on local disk; a remote one is
    downloaded once per node, under a file lock, and shared by the node's ranks (`Checkpoint.as_directory`
    lets a second process download again over files the first one is reading: seen as a truncated
    ``config.json`` when two ranks restarted from S3). On a normal exit the node's ranks meet at a barrier
    and local rank 0 removes the download."""
    import pyarrow.fs as pafs

    if checkpoint is None:
        yield None
        return
    if isinstance(checkpoint.filesystem, pafs.LocalFileSystem):
        yield checkpoint.path
        return
    import hashlib

    import filelock

    key = hashlib.sha256(f"{checkpoint.filesystem.type_name}:{checkpoint.path}".encode()).hexdigest()[:16]
    dest = Path(tempfile.gettempdir()) / f"breen-checkpoint-{key}"
    with filelock.FileLock(f"{dest}.lock"):
        if not (dest / ".complete").exists():
            shutil.rmtree(dest, ignore_errors=True)
            remote = Store(checkpoint.filesystem, checkpoint.path, f"{checkpoint.filesystem.type_name}://{checkpoint.path}")
            remote.download_dir(dest)
            (dest / ".complete").write_text(remote.uri + "\n")
    yield str(dest)
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # every rank of the node has read it
    if local_rank == 0:
        shutil.rmtree(dest, ignore_errors=True)


def latest_checkpoint(run_dir: str | Path | Store) -> tuple[Store, dict[str, Any]] | None:
    """(folder, reported metrics) of the run's latest registered checkpoint, from Ray Train's snapshot
    (the one Ray restores on a restart or rerun), or None. The run folder may be on an object store."""
    run_dir = Store.at(run_dir)
    try:
        latest = (run_dir / RAY_SNAPSHOT).read_json().get("latest_checkpoint_result")
    except (OSError, ValueError):  # FileNotFoundError included
        return None
    if not latest:
        return None
    folder = run_dir / latest["checkpoint_dir_name"]
    return (folder, latest.get("metrics") or {}) if folder.is_dir() else None


# ----------------------------------------------------------------------------- export
def export_model(
    engine,
    out_dir: str | Path | Store,
    *,
    rank: int,
    model_config,
    tokenizer,
    train_config: dict[str, Any],
    state: TrainState,
) -> None:
    """Collective (every rank): gather the full weights on rank 0 and write a Hugging Face directory.

    On local disk it is written under a temporary name and renamed into place, so a reader never sees
    half an export; on an object store it is written in a local temporary folder and uploaded with
    ``config.json`` last (a reader that finds ``config.json`` finds the whole export).
    """
    state_dict = engine._zero3_consolidated_16bit_state_dict()  # rank 0: full weights on CPU, else None
    if rank != 0:
        return
    out = Store.at(out_dir)
    if not out.local:
        with tempfile.TemporaryDirectory(prefix="breen-export-") as local:
            _write_export(Path(local), state_dict, model_config, tokenizer, train_config, state)
            out.delete()  # an older export (no file of it may survive into the new one)
            out.upload_dir(local, last=("config.json",))
        return
    out_dir = Path(out.path)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    _write_export(tmp, state_dict, model_config, tokenizer, train_config, state)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)


def _write_export(tmp: Path, state_dict, model_config, tokenizer, train_config: dict[str, Any],
                  state: TrainState) -> None:  # fmt: skip
    """The Hugging Face directory of `state_dict` in local folder `tmp`."""
    import torch

    from breen.model import BreenForCausalLM

    with torch.device("meta"):
        model = BreenForCausalLM(model_config)
    if model_config.tie_word_embeddings:
        state_dict.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state_dict, strict=False, assign=True)
    missing = [k for k in missing if not (model_config.tie_word_embeddings and k == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"export: missing {missing[:3]} / unexpected {unexpected[:3]} weights")
    model.tie_weights()
    model.save_pretrained(tmp, safe_serialization=True)
    tokenizer.save_pretrained(tmp)
    (tmp / "train_config.json").write_text(json.dumps(train_config, indent=2, sort_keys=True) + "\n")
    stage_info = {"produced_by": "jobs.train", "stage": state.stage, **state.to_dict()}
    (tmp / "breen_stage.json").write_text(json.dumps(stage_info, indent=2, sort_keys=True) + "\n")
