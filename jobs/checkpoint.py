"""Checkpoints (ZeRO-3 shards + client state through ``ray.train.report``) and the stage-end export.

A checkpoint is one folder in Ray Train's storage (``<output_dir>/<name>/step-NNNNNNN/``), merged by Ray
from what every rank wrote into its own temporary folder::

    zero/zero_pp_rank_R_mp_rank_00_{model,optim}_states.pt   DeepSpeed ZeRO-3 shards of rank R
    latest, zero_to_fp32.py                                  DeepSpeed bookkeeping (rank 0)
    rng/rank-RRRRR.json                                      RNG states of rank R
    train_state.json                                         client state (rank 0), human-readable
    train_config.json                                        the resolved TrainConfig
    model/                                                   BreenConfig + tokenizer (to rebuild the model)
    complete/rank-RRRRR.json                                 completion marker of rank R, written last

Completeness. Ray merges the ranks' folders (each uploads its own, in no fixed file order), so no one
file can be written last for the whole checkpoint. Each rank writes, after everything else in its folder,
``complete/rank-R.json`` listing every file it wrote with its size and sha256, plus the world size
(`write_marker`). A checkpoint is complete when the markers of ranks 0..W-1 exist and every file they
list is there with the listed size (`checkpoint_problem`: one listing plus W small reads, no data read);
each rank checks the sha256 of the files it reads before restoring (`verify_files`), and a file DeepSpeed
cannot load is an error naming it (`restore_checkpoint`). Either failure is a `CheckpointCorrupt`.

Fallback (`fall_back`, on every start and restart of a run, before Ray Train reads its record): a torn
latest checkpoint is reported by name, its folder moved aside to ``torn-step-NNNNNNN-<time>/`` (a name
Ray never reads) and Ray Train's record (``checkpoint_manager_snapshot.json``, which Ray 2.60 refuses to
load when a folder it lists is gone) rewritten without it, so the run resumes from the newest complete
checkpoint. With no complete checkpoint left the run fails (`NoCompleteCheckpoint`) and nothing on disk
is changed: starting over from ``model.init_from`` is the user's decision (delete the run folder).

Client state (`TrainState`): optimizer step, samples and tokens seen, data position (global stream
position = step x global batch), rejected-sample counts by reason, and the scale it was written with. The
learning-rate schedule is a pure function of the step, so restoring the step restores the scheduler.
Weights and optimizer moments live in the ZeRO shards; ``deepspeed.utils.zero_to_fp32`` consolidates them
offline. Ray keeps the last ``checkpoint.keep_last`` checkpoints. Restoring never unpickles code: the ZeRO
files are read with ``torch.load(weights_only=True)`` and a two-class allowlist (`weights_only_loads`).

Export (stage end): the consolidated weights, gathered on rank 0 one module at a time, saved in Hugging
Face layout (``config.json`` + safetensors) with the tokenizer and processor, ``train_config.json`` and
``breen_stage.json``: `BreenForCausalLM.from_pretrained`, `breen.generate` and the next stage load it, and
so do transformers' Auto classes, after `import breen` or with ``trust_remote_code=True`` (`breen.hf`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import pickle
import random
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from breen.settings import ConfigError
from breen.storage import Store

if TYPE_CHECKING:
    from jobs.config import TrainConfig

ZERO_TAG = "zero"
STATE_FILE = "train_state.json"
MODEL_DIR = "model"
RAY_SNAPSHOT = "checkpoint_manager_snapshot.json"  # Ray Train V2's record of registered checkpoints
MARKER_DIR = "complete"  # complete/rank-RRRRR.json: each rank's completion marker (see the module docstring)
TORN_PREFIX = "torn-"  # torn checkpoints are moved aside to torn-<name>-<time>/ (Ray never reads them)


class CheckpointCorrupt(RuntimeError):
    """A checkpoint that is torn or cannot be read. Args: (message naming the file, checkpoint folder
    name such as ``step-0000009``); picklable, so a Ray Train worker can raise it to the driver."""

    def __init__(self, message: str, name: str = ""):
        super().__init__(message, name)
        self.message, self.name = message, name

    def __str__(self) -> str:
        return self.message


class NoCompleteCheckpoint(RuntimeError):
    """The run has registered checkpoints but none of them is complete."""


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


def check_same_scale(state: TrainState, cfg: TrainConfig, world: int) -> None:
    """A resume must keep the scale the checkpoint was written with (its data position counts global batches)."""
    s = cfg.scale
    now = (world, s.micro_batch_size, s.global_batch_size)
    then = (state.num_workers, state.micro_batch_size, state.global_batch_size)
    if now != then:
        raise ConfigError(
            f"scale.num_workers/micro_batch_size/global_batch_size = {now} but the checkpoint was written "
            f"with {then}: resume with the same scale, or start a new run from an export (model.init_from)"
        )


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
    world_size: int = 1,
) -> str:
    """Every rank: write this rank's part of the checkpoint into a fresh local folder, its completion
    marker last (`write_marker`), and return it (the caller reports it with ``ray.train.report``; Ray
    merges the ranks' folders)."""
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
    write_marker(local, rank=rank, world_size=world_size, step=state.step)
    return local


# ----------------------------------------------------------------------------- completeness
def marker_path(rank: int) -> str:
    return f"{MARKER_DIR}/rank-{rank:05d}.json"


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def write_marker(local: str | Path, *, rank: int, world_size: int, step: int) -> None:
    """Last write of a rank's checkpoint part: ``complete/rank-R.json`` in local folder `local`, listing
    every file of the folder (relative path -> bytes, sha256; one more read of each file just written)."""
    local = Path(local)
    files = {
        p.relative_to(local).as_posix(): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(local.rglob("*"))
        if p.is_file()
    }
    marker = {"rank": rank, "world_size": world_size, "step": step, "files": files}
    out = local / marker_path(rank)
    out.parent.mkdir(exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(marker, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, out)


def _read_markers(folder: Store, listing: dict[str, int]) -> tuple[list[dict[str, Any]], str | None]:
    """(every rank's marker, None) of checkpoint `folder`, or ([], what is missing or unreadable)."""
    first = marker_path(0)
    if first not in listing:
        return [], f"{folder}: no completion marker {first} (the checkpoint is torn, or older than markers)"
    markers = []
    world = None
    rank = 0
    while world is None or rank < world:
        name = marker_path(rank)
        if name not in listing:
            return [], f"{folder}: no completion marker {name} (rank {rank} of {world})"
        try:
            marker = (folder / name).read_json()
            world = int(marker["world_size"]) if world is None else world
            files = marker["files"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            return [], f"{folder}: {name} is unreadable ({type(err).__name__}: {err})"
        if (
            int(marker.get("rank", -1)) != rank
            or int(marker["world_size"]) != world
            or not isinstance(files, dict)
        ):
            return [], f"{folder}: {name} does not belong to rank {rank} of {world}"
        markers.append(marker)
        rank += 1
    return markers, None


def checkpoint_problem(folder: str | Path | Store) -> str | None:
    """None when checkpoint `folder` (local or on an object store) is complete: every rank's marker is
    there and every file it lists exists with the listed size; else what is wrong, naming the file
    (``<folder>: <file> is 123 bytes, expected 456``). Cheap: one listing and the markers, no data read."""
    folder = Store.at(folder)
    listing = folder.sizes()
    if not listing:
        return f"{folder}: the checkpoint folder is missing or empty"
    markers, problem = _read_markers(folder, listing)
    if problem:
        return problem
    for marker in markers:
        for rel, want in sorted(marker["files"].items()):
            if rel not in listing:
                return f"{folder}: {rel} is missing (listed in {marker_path(marker['rank'])})"
            if listing[rel] != want["bytes"]:
                return f"{folder}: {rel} is {listing[rel]} bytes, expected {want['bytes']}"
    return None


def verify_files(directory: str | Path, rank: int, name: str = "") -> None:
    """Every rank, before restoring from local folder `directory`: the files this rank reads (those of its
    own marker, and rank 0's files outside ``zero/``: model config, tokenizer, client state) have their
    listed size and sha256; else `CheckpointCorrupt` naming the file (`name`: the checkpoint's folder
    name, for the driver's fallback)."""
    directory = Path(directory)
    where = f"{name or directory}"
    markers = {}
    for r in sorted({0, rank}):
        path = directory / marker_path(r)
        try:
            markers[r] = json.loads(path.read_text())["files"]
        except (OSError, ValueError, KeyError) as err:
            raise CheckpointCorrupt(
                f"{where}: completion marker {marker_path(r)} unreadable: {err}", name
            ) from None
    wanted = dict(markers[rank])
    wanted.update({rel: v for rel, v in markers[0].items() if not rel.startswith(f"{ZERO_TAG}/")})
    for rel, want in sorted(wanted.items()):
        path = directory / rel
        if not path.is_file():
            raise CheckpointCorrupt(f"{where}: {rel} is missing", name)
        size = path.stat().st_size
        if size != want["bytes"]:
            raise CheckpointCorrupt(f"{where}: {rel} is {size} bytes, expected {want['bytes']}", name)
        got = sha256_file(path)
        if got != want["sha256"]:
            raise CheckpointCorrupt(
                f"{where}: {rel} has sha256 {got[:16]}..., its marker says {want['sha256'][:16]}... (corrupt)",
                name,
            )


# ----------------------------------------------------------------------------- Ray Train's record
def _snapshot(run_dir: Store) -> dict[str, Any] | None:
    try:
        return (run_dir / RAY_SNAPSHOT).read_json()
    except (OSError, ValueError):  # FileNotFoundError included
        return None


def registered_checkpoints(run_dir: str | Path | Store) -> list[str]:
    """Folder names of the run's checkpoints registered in Ray Train's snapshot, newest first."""
    snap = _snapshot(Store.at(run_dir)) or {}
    results = snap.get("checkpoint_results") or []
    order = snap.get("checkpoint_report_indices") or list(range(len(results)))
    pairs = sorted(zip(order, (r["checkpoint_dir_name"] for r in results), strict=True), reverse=True)
    return [name for _, name in pairs]


def _drop_from_snapshot(run_dir: Store, names: set[str]) -> None:
    """Rewrite Ray Train's snapshot without the checkpoints `names` (its latest: the newest one left)."""
    snap = _snapshot(run_dir)
    if snap is None:
        return
    keep = [i for i, r in enumerate(snap["checkpoint_results"]) if r["checkpoint_dir_name"] not in names]
    snap["checkpoint_results"] = [snap["checkpoint_results"][i] for i in keep]
    snap["checkpoint_report_indices"] = [snap["checkpoint_report_indices"][i] for i in keep]
    results, specs = snap.get("pending_training_results", []), snap.get("pending_validation_specs", [])
    pending = [(r, v) for r, v in zip(results, specs, strict=True) if r["checkpoint_dir_name"] not in names]
    snap["pending_training_results"] = [r for r, _ in pending]
    snap["pending_validation_specs"] = [spec for _, spec in pending]
    for key in ("validated_checkpoint_dir_names", "timed_out_validation_checkpoint_dir_names",
                "failed_validation_checkpoint_dir_names"):  # fmt: skip
        if key in snap:
            snap[key] = [n for n in snap[key] if n not in names]
    if snap["checkpoint_results"]:
        newest = max(range(len(keep)), key=lambda i: snap["checkpoint_report_indices"][i])
        snap["latest_checkpoint_result"] = snap["checkpoint_results"][newest]
    else:
        snap["latest_checkpoint_result"] = None
    (run_dir / RAY_SNAPSHOT).write_bytes(json.dumps(snap).encode())


def _move_aside(folder: Store, problem: str) -> Store:
    """Move torn checkpoint `folder` to ``torn-<name>-<UTC time>/`` beside it, with a ``TORN.json`` saying
    why (local: one rename; object store: a server-side copy and delete per object)."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    dest = folder.parent / f"{TORN_PREFIX}{folder.name}-{stamp}"
    if folder.local:
        os.replace(folder.path, dest.path)
    else:
        for rel in sorted(folder.sizes()):
            folder.fs.move(f"{folder.path}/{rel}", f"{dest.path}/{rel}")
        folder.delete()  # the empty "directory" objects pyarrow leaves behind
    (dest / "TORN.json").write_json({"checkpoint": folder.name, "problem": problem, "moved": stamp})
    return dest


def fall_back(run_dir: str | Path | Store, log=print, torn: dict[str, str] | None = None) -> str | None:
    """Before Ray Train starts (or restarts) the run: make its latest registered checkpoint a complete one.

    Checks the registered checkpoints newest first (`checkpoint_problem`); every newer torn one is reported
    through `log` by name and moved aside, registered ones whose folder is gone are forgotten, and Ray
    Train's snapshot is rewritten to match, so that Ray restores the newest complete checkpoint. Returns its
    folder name, or None when the run has no registered checkpoint (a fresh start). Raises
    `NoCompleteCheckpoint` (changing nothing) when checkpoints are registered but none is complete.
    `torn`: {folder name: problem} of checkpoints already known to be torn (a rank's `CheckpointCorrupt`:
    a sha256 mismatch or a load error, which the cheap check cannot see)."""
    run_dir = Store.at(run_dir)
    names = registered_checkpoints(run_dir)
    if not names:
        return None
    known, torn = dict(torn or {}), {}
    good = None
    for name in names:
        problem = known.get(name) or checkpoint_problem(run_dir / name)
        if problem is None:
            good = name
            break
        torn[name] = problem
    if good is None:
        details = "\n  ".join(torn.values())
        raise NoCompleteCheckpoint(
            f"{run_dir}: no complete checkpoint left:\n  {details}\nDelete {run_dir} (or choose another run "
            "name) to start the run over from model.init_from."
        )
    gone = {n for n in names[names.index(good) + 1 :] if not (run_dir / n).is_dir()}
    for name, problem in torn.items():
        log(f"torn checkpoint: {problem}")
        if (run_dir / name).is_dir():
            log(f"  moved aside to {_move_aside(run_dir / name, problem)}")
    for name in sorted(gone):
        log(f"checkpoint {run_dir / name} registered but gone: forgotten")
    if torn or gone:
        _drop_from_snapshot(run_dir, set(torn) | gone)
        log(f"resuming from {run_dir / good}, the newest complete checkpoint")
    return good


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
def weights_only_loads(engine, name: str = "") -> Iterator[None]:
    """While active, every file DeepSpeed's ``engine.load_checkpoint`` reads is unpickled with
    ``torch.load(weights_only=True)`` and the `zero3_safe_globals` allowlist, never as full pickles
    (DeepSpeed 0.19's ``TorchCheckpointEngine.load`` turns weights_only off): a checkpoint
    file holding any other global (a pickle that would run code) is refused with an UnpicklingError.

    How: all of ``load_checkpoint``'s reads (model states, the ZeRO optimizer shards, the state-dict
    loader) go through ``engine.checkpoint_engine.load``; for the duration of the block that method is
    shadowed on this engine's instance only (saving and other engines are untouched) and restored after.
    The universal-checkpoint path, which unpickles full pickles with its own direct loads, is refused.
    A file that fails to load for another reason (truncated, not a torch file) is a `CheckpointCorrupt`
    naming it (`name`: the checkpoint's folder name).
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
            try:
                return torch.load(path, map_location=map_location, weights_only=True)
            except pickle.UnpicklingError:
                raise  # a refused global (a pickle that would run code): not a torn file
            except Exception as err:  # e.g. "PytorchStreamReader failed reading zip archive": name the file
                raise CheckpointCorrupt(f"{name or path}: {Path(path).parent.name}/{Path(path).name} cannot be "
                                        f"loaded: {type(err).__name__}: {err}", name) from err  # fmt: skip

    ckpt_engine.load = load  # instance attribute: shadows TorchCheckpointEngine.load
    try:
        yield
    finally:
        del ckpt_engine.load


def restore_checkpoint(engine, directory: str | Path, rank: int, name: str = "") -> TrainState:
    """Every rank: load ZeRO shards + optimizer state, the client state and this rank's RNG.

    The DeepSpeed files are unpickled with ``weights_only=True`` (see `weights_only_loads`); everything
    else is JSON. `name`: the checkpoint's folder name, carried by a `CheckpointCorrupt`."""
    with weights_only_loads(engine, name):
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
            remote = Store(
                checkpoint.filesystem,
                checkpoint.path,
                f"{checkpoint.filesystem.type_name}://{checkpoint.path}",
            )
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

    from breen.hf import save_hf_files
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
    save_hf_files(tmp, model_config, tokenizer)  # processor + tokenizer, remote code, auto_map
    (tmp / "train_config.json").write_text(json.dumps(train_config, indent=2, sort_keys=True) + "\n")
    stage_info = {"produced_by": "jobs.train", "stage": state.stage, **state.to_dict()}
    (tmp / "breen_stage.json").write_text(json.dumps(stage_info, indent=2, sort_keys=True) + "\n")
