"""Checkpoint completeness and fallback (`jobs.checkpoint`), on real folders, without training.

- A folder with every rank's completion marker (`write_marker`) is complete; a truncated file, a missing
  file, a deleted marker or a marker of another world size is named (`checkpoint_problem`), and a file
  of the right size but other content is named by the rank that reads it (`verify_files`).
- `fall_back` on a run folder whose Ray Train snapshot (written with Ray's own state model) lists three
  checkpoints, the newest torn: the torn one is reported by name and moved aside, the snapshot is
  rewritten to point at the newest complete one, and Ray Train 2.60's own `CheckpointManager` loads the
  rewritten snapshot (with the torn folder gone, the original snapshot is what Ray refuses as "corrupted
  run directory"). The same on an S3 bucket (`s3_server`). No complete checkpoint: a clear error and
  nothing changed.

The end-to-end case (a real run, a torn ZeRO shard, the rerun's weights) is in tests/test_train_e2e.py.
Run:  .venv/bin/python -m pytest tests/test_checkpoint.py
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest

from breen.settings import ConfigError
from breen.storage import Store
from jobs import checkpoint as ck
from jobs import config as jc
from jobs.checkpoint import TrainState, check_same_scale


def fake_rank_part(root: Path, rank: int, world: int, step: int) -> Path:
    """What one rank writes into its own folder (real files, sizes like a tiny run's), marker last."""
    local = root / f"rank{rank}"
    (local / "zero").mkdir(parents=True)
    (local / "zero" / f"zero_pp_rank_{rank}_mp_rank_00_model_states.pt").write_bytes(os.urandom(3000 + rank))
    (local / "zero" / f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt").write_bytes(os.urandom(5000 + rank))
    (local / "rng").mkdir()
    (local / "rng" / f"rank-{rank:05d}.json").write_text("{}")
    if rank == 0:
        (local / ck.STATE_FILE).write_text(json.dumps({"step": step}))
        (local / ck.MODEL_DIR).mkdir()
        (local / ck.MODEL_DIR / "config.json").write_text("{}")
    ck.write_marker(local, rank=rank, world_size=world, step=step)
    return local


def merged_checkpoint(folder: Path, world: int = 2, step: int = 3) -> Path:
    """Every rank's part merged into `folder`, as Ray Train merges the ranks' uploads."""
    parts = folder.parent.parent / ".parts" / folder.parent.name / folder.name  # outside the run folder
    for rank in range(world):
        local = fake_rank_part(parts, rank, world, step)
        for p in local.rglob("*"):
            if p.is_file():
                dest = folder / p.relative_to(local)
                dest.parent.mkdir(parents=True, exist_ok=True)
                dest.write_bytes(p.read_bytes())
    return folder


SHARD = "zero/zero_pp_rank_1_mp_rank_00_optim_states.pt"


def test_a_complete_checkpoint_passes_and_each_kind_of_tear_is_named(tmp_path):
    good = merged_checkpoint(tmp_path / "step-0000003")
    assert ck.checkpoint_problem(good) is None
    for rank in (0, 1):
        ck.verify_files(good, rank, name=good.name)  # sizes and sha256 of what each rank reads

    truncated = merged_checkpoint(tmp_path / "truncated")
    with open(truncated / SHARD, "r+b") as f:
        f.truncate(1234)
    assert ck.checkpoint_problem(truncated) == f"{truncated}: {SHARD} is 1234 bytes, expected 5001"

    missing = merged_checkpoint(tmp_path / "missing")
    (missing / SHARD).unlink()
    assert (
        ck.checkpoint_problem(missing)
        == f"{missing}: {SHARD} is missing (listed in complete/rank-00001.json)"
    )

    no_marker = merged_checkpoint(tmp_path / "no-marker")
    (no_marker / "complete" / "rank-00001.json").unlink()
    assert (
        ck.checkpoint_problem(no_marker)
        == f"{no_marker}: no completion marker complete/rank-00001.json (rank 1 of 2)"
    )
    legacy = merged_checkpoint(tmp_path / "legacy")
    for m in (legacy / "complete").iterdir():
        m.unlink()
    assert "no completion marker complete/rank-00000.json" in ck.checkpoint_problem(legacy)

    wider = merged_checkpoint(tmp_path / "wider")  # rank 1's marker from a run of another world size
    marker = json.loads((wider / "complete" / "rank-00001.json").read_text())
    (wider / "complete" / "rank-00001.json").write_text(json.dumps({**marker, "world_size": 4}))
    assert "does not belong to rank 1 of 2" in ck.checkpoint_problem(wider)

    # Same size, other content: only the rank that reads the file can tell (sha256), and it names it.
    flipped = merged_checkpoint(tmp_path / "flipped")
    data = bytearray((flipped / SHARD).read_bytes())
    data[100] ^= 0xFF
    (flipped / SHARD).write_bytes(bytes(data))
    assert ck.checkpoint_problem(flipped) is None
    ck.verify_files(flipped, 0, name="flipped")  # rank 0 does not read rank 1's shard
    with pytest.raises(ck.CheckpointCorrupt) as err:
        ck.verify_files(flipped, 1, name="flipped")
    assert str(err.value).startswith(f"flipped: {SHARD} has sha256 ") and "(corrupt)" in str(err.value)
    back = pickle.loads(pickle.dumps(err.value))  # it travels from a Ray Train worker to the driver
    assert isinstance(back, ck.CheckpointCorrupt) and back.name == "flipped" and str(back) == str(err.value)


def write_ray_snapshot(run_dir: Store, names: list[str]) -> None:
    """Ray Train's snapshot listing checkpoints `names` (oldest first), serialised by Ray's own model."""
    import ray
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import (
        _CheckpointManagerState,
        _TrainingResultState,
    )

    results = [_TrainingResultState(checkpoint_dir_name=n, metrics={"step": int(n[-7:])}) for n in names]
    state = _CheckpointManagerState(
        ray_version=ray.__version__, checkpoint_results=results, checkpoint_report_indices=list(range(len(names))),
        latest_checkpoint_result=results[-1], pending_training_results=[], pending_validation_specs=[],
        current_report_index=len(names), validated_checkpoint_dir_names=[],
        timed_out_validation_checkpoint_dir_names=[], failed_validation_checkpoint_dir_names=[],
    )  # fmt: skip
    (run_dir / ck.RAY_SNAPSHOT).write_bytes(state.json().encode())


def ray_loads(run_dir: Store) -> str | None:
    """The latest checkpoint folder Ray Train 2.60's CheckpointManager restores from the run's snapshot."""
    from ray.train import CheckpointConfig
    from ray.train.v2._internal.execution.checkpoint.checkpoint_manager import CheckpointManager
    from ray.train.v2._internal.execution.storage import StorageContext

    storage = StorageContext(
        run_dir.parent.path, run_dir.name, None if run_dir.local else run_dir.fs, read_only=True
    )
    latest = CheckpointManager(CheckpointConfig(num_to_keep=3), storage).latest_checkpoint_result
    return None if latest is None else Path(latest.checkpoint.path).name


def run_with_torn_latest(run_dir: Store, local: Path) -> None:
    """step-3 and step-6 complete, step-9 with a truncated ZeRO shard; Ray's snapshot lists all three."""
    for step in (3, 6, 9):
        merged_checkpoint(local / ck.checkpoint_name(step), step=step)
    with open(local / "step-0000009" / SHARD, "r+b") as f:
        f.truncate(100)
    if not run_dir.local:
        run_dir.upload_dir(local)
    write_ray_snapshot(run_dir, ["step-0000003", "step-0000006", "step-0000009"])


@pytest.mark.parametrize("where", ["local", "s3"])
def test_fall_back_sets_the_torn_latest_aside_and_ray_restores_the_previous_one(where, tmp_path, request):
    from ray.train.v2._internal.exceptions import CheckpointManagerInitializationError

    local = tmp_path / "run"
    if where == "local":
        run_dir = Store.at(local)
    else:
        endpoint = request.getfixturevalue("s3_server")
        run_dir = Store.at(f"s3://breen-test/fallback-{os.getpid()}/run", endpoint_override=endpoint)
        local = tmp_path / "upload"
    run_with_torn_latest(run_dir, local)
    assert ray_loads(run_dir) == "step-0000009"  # Ray itself would restore the torn one
    lines: list[str] = []
    assert ck.fall_back(run_dir, log=lines.append) == "step-0000006"
    assert lines[0] == f"torn checkpoint: {run_dir / 'step-0000009'}: {SHARD} is 100 bytes, expected 5001"
    assert lines[1].startswith(f"  moved aside to {run_dir}/torn-step-0000009-")
    assert lines[-1] == f"resuming from {run_dir / 'step-0000006'}, the newest complete checkpoint"
    assert ck.registered_checkpoints(run_dir) == ["step-0000006", "step-0000003"]
    assert ray_loads(run_dir) == "step-0000006"  # Ray accepts the rewritten record
    assert ck.latest_checkpoint(run_dir)[1] == {"step": 6}
    aside = [d for d in run_dir.dirs() if d.name.startswith("torn-step-0000009-")]
    assert len(aside) == 1 and not (run_dir / "step-0000009").is_dir()
    assert (aside[0] / SHARD).exists() and "100 bytes" in (aside[0] / "TORN.json").read_json()["problem"]
    assert ck.fall_back(run_dir, log=lines.append) == "step-0000006" and len(lines) == 3  # nothing more to do

    # A registered checkpoint whose folder was deleted by hand: Ray refuses the run folder; fall_back
    # forgets it and Ray loads again.
    (run_dir / "step-0000003").delete()
    with pytest.raises(CheckpointManagerInitializationError, match="corrupted run directory"):
        ray_loads(run_dir)
    assert ck.fall_back(run_dir, log=lines.append) == "step-0000006"
    assert lines[-2] == f"checkpoint {run_dir / 'step-0000003'} registered but gone: forgotten"
    assert ray_loads(run_dir) == "step-0000006" and ck.registered_checkpoints(run_dir) == ["step-0000006"]


def test_no_complete_checkpoint_left_fails_clearly_and_changes_nothing(tmp_path):
    run_dir = Store.at(tmp_path / "run")
    merged_checkpoint(tmp_path / "run" / "step-0000003", step=3)
    (tmp_path / "run" / "step-0000003" / "complete" / "rank-00000.json").unlink()
    write_ray_snapshot(run_dir, ["step-0000003"])
    before = (tmp_path / "run" / ck.RAY_SNAPSHOT).read_bytes()
    with pytest.raises(ck.NoCompleteCheckpoint) as err:
        ck.fall_back(run_dir, log=print)
    msg = str(err.value)
    assert "no complete checkpoint left" in msg and "no completion marker complete/rank-00000.json" in msg
    assert f"Delete {run_dir}" in msg and "model.init_from" in msg
    assert (tmp_path / "run" / ck.RAY_SNAPSHOT).read_bytes() == before
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == [ck.RAY_SNAPSHOT, "step-0000003"]
    assert ck.fall_back(Store.at(tmp_path / "fresh")) is None  # no snapshot: a fresh start


def test_check_same_scale():
    cfg = jc.build_config("stage1", "cpu")
    state = TrainState(num_workers=2, micro_batch_size=2, global_batch_size=8)
    check_same_scale(state, cfg, world=2)
    with pytest.raises(ConfigError, match=r"scale\.num_workers.*\(4, 2, 8\).*\(2, 2, 8\)"):
        check_same_scale(state, cfg, world=4)


