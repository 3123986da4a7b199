"""Reliability: training checkpoints load only through ``torch.load(weights_only=True)``.

`jobs.checkpoint.restore_checkpoint` (what every Ray Train worker calls on a restart) loads DeepSpeed's
ZeRO-3 files with ``weights_only=True`` and an explicit allowlist (`jobs.checkpoint.zero3_safe_globals`)
instead of DeepSpeed 0.19's ``torch.load(weights_only=False)``. Checked on a real checkpoint, written by
a real single-rank ZeRO-3 engine (CPU, gloo) built the way `jobs.train` builds it:

(a) it restores: weights, optimizer moments (the next step matches the run that wrote the checkpoint),
    client state; every ``torch.load`` of the restore passed ``weights_only=True``; the allowlist is
    exactly the set of non-tensor globals the checkpoint files hold (not one class more);
(b) a checkpoint whose model-states or optimizer-states file holds a pickle that would run code is
    refused (UnpicklingError naming the global) and the code never runs; as a control, DeepSpeed's own
    ``engine.load_checkpoint`` (``weights_only=False``) on the same file does run it (it only writes a
    marker file in the test's temporary folder);
(c) the completion marker (written last) lists every file the rank wrote, and a truncated ZeRO file is
    a `CheckpointCorrupt` naming the file and the checkpoint (DeepSpeed alone says only "PytorchStreamReader
    failed reading zip archive").

DeepSpeed runs in a child process (its own process group and accelerator settings), ~20 s.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import free_port

pytestmark = pytest.mark.reliability
REPO = Path(__file__).resolve().parent.parent


class _RunsCode:
    """Unpickling this calls ``exec``: it writes a marker file (the proof that code ran)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"import pathlib; pathlib.Path({str(self.marker)!r}).write_text('pwned')",))


def _engine(init: Path, cfg, seed: int):
    """A ZeRO-3 engine as `jobs.train.run_worker` builds it (model, trainable set, param groups, AdamW)."""
    import deepspeed
    import torch

    from breen.config import BreenConfig
    from breen.stages import param_groups, set_trainable
    from jobs.deepspeed_config import deepspeed_config
    from jobs.model_init import build_model
    from jobs.train import make_optimizer

    torch.manual_seed(seed)
    model_config = BreenConfig.from_pretrained(init)
    ds_config = deepspeed_config(cfg, model_config.hidden_size)
    model = build_model(cfg, model_config, init, ds_config, 0)
    set_trainable(model, cfg.stage)
    groups = param_groups(model, cfg.stage, cfg.optim.lrs, cfg.optim.weight_decay)
    optimizer = make_optimizer(cfg, groups)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    return engine, model_config


def _step(engine, batch) -> float:
    import torch

    torch.manual_seed(1234)
    loss = engine(**batch).loss
    engine.backward(loss)
    engine.step()
    return float(loss)


def _weights(engine) -> dict:
    import deepspeed

    out = {}
    for name, p in engine.module.named_parameters():
        with deepspeed.zero.GatheredParameters([p]):
            out[name] = p.detach().clone()
    return out


def _differing(a: dict, b: dict) -> list[str]:
    import torch

    return sorted(k for k in a if not torch.equal(a[k], b[k]))


def child(work: str) -> None:
    """Runs in a fresh process: write a real checkpoint, restore it, try the poisoned copies."""
    os.environ.update(DS_ACCELERATOR="cpu", MASTER_ADDR="127.0.0.1", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
                      LOCAL_WORLD_SIZE="1")  # fmt: skip
    import torch
    import torch.distributed as dist

    from jobs import checkpoint
    from jobs.config import build_config
    from jobs.tiny import save_tiny_breen, tiny_tokenizer
    from tests._tiny_models import tiny_batch

    work_dir = Path(work)
    dist.init_process_group("gloo", rank=0, world_size=1)
    cfg = build_config("stage1", "cpu")
    result: dict = {}

    # The run that writes the checkpoint: 2 steps, save, then a 3rd step (the reference).
    engine_a, model_config = _engine(save_tiny_breen(work_dir / "init-a", seed=0), cfg, seed=0)
    batch = tiny_batch(model_config)
    _step(engine_a, batch)
    _step(engine_a, batch)
    state = checkpoint.TrainState(step=2, samples_seen=6, stage=cfg.stage, rejected={"too_long": 1})
    saved = Path(checkpoint.save_checkpoint(engine_a, state, rank=0, train_config={}, model_config=model_config,
                                            tokenizer=tiny_tokenizer(), scratch=str(work_dir)))  # fmt: skip
    at_save = _weights(engine_a)
    result["loss_a"] = _step(engine_a, batch)
    after_a = _weights(engine_a)
    files = sorted(str(p.relative_to(saved)) for p in (saved / checkpoint.ZERO_TAG).glob("*.pt"))
    result["files"] = files
    result["globals"] = {f: torch.serialization.get_unsafe_globals_in_checkpoint(saved / f) for f in files}
    result["allowlist"] = [f"{c.__module__}.{c.__qualname__}" for c in checkpoint.zero3_safe_globals()]

    # (a) A fresh engine from other weights restores it; every torch.load is weights_only=True.
    engine_b, _ = _engine(save_tiny_breen(work_dir / "init-b", seed=1), cfg, seed=1)
    calls: list = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs.get("weights_only", "default"))
        return real_load(*args, **kwargs)

    result["differs_before"] = len(_differing(at_save, _weights(engine_b))) > 0
    torch.load = spy
    try:
        restored = checkpoint.restore_checkpoint(engine_b, saved, rank=0)
    finally:
        torch.load = real_load
    result["load_calls"] = calls
    result["state"] = restored.to_dict()
    result["weights_differ_after_restore"] = _differing(at_save, _weights(engine_b))
    result["loss_b"] = _step(engine_b, batch)
    result["weights_differ_after_next_step"] = _differing(after_a, _weights(engine_b))
    result["checkpoint_engine_load_restored"] = "load" not in vars(engine_b.checkpoint_engine)

    # (b) Poisoned copies: the model-states file (read first) or the optimizer-states file (read after
    # the model states loaded fine) holds a pickle that runs code when unpickled.
    result["poisoned"] = {}
    for f in files:
        bad = work_dir / f"poisoned-{Path(f).stem}"
        shutil.copytree(saved, bad)
        marker = work_dir / f"pwned-{Path(f).stem}"
        torch.save({"module": _RunsCode(marker), "ds_version": "0.19.8"}, bad / f)
        try:
            checkpoint.restore_checkpoint(engine_b, bad, rank=0)
            outcome = "loaded"
        except Exception as e:
            outcome = f"{type(e).__module__}.{type(e).__name__}: {e}"
        result["poisoned"][f] = {"outcome": outcome, "code_ran": marker.exists()}
    # Control: DeepSpeed's own load (weights_only=False) of the same poisoned file runs the payload, so
    # (b) shows what the restore path prevents, not a file that would have failed anyway.
    control = work_dir / f"poisoned-{Path(files[0]).stem}"
    marker = work_dir / "pwned-control"
    torch.save({"module": _RunsCode(marker), "ds_version": "0.19.8"}, control / files[0])
    try:
        engine_b.load_checkpoint(str(control), tag=checkpoint.ZERO_TAG)
    except Exception:
        pass
    result["control_code_ran"] = marker.exists()

    # (c) The completion marker, written last, lists every file; a truncated shard fails to load with an
    # error naming it (a CheckpointCorrupt: the driver falls back to an older checkpoint).
    result["marker_problem"] = checkpoint.checkpoint_problem(saved)
    result["marker_files"] = sorted(json.loads((saved / checkpoint.marker_path(0)).read_text())["files"])
    result["saved_files"] = sorted(str(p.relative_to(saved)) for p in saved.rglob("*") if p.is_file())
    torn = work_dir / "torn"
    shutil.copytree(saved, torn)
    with open(torn / files[0], "r+b") as f:
        f.truncate(os.path.getsize(torn / files[0]) // 2)
    try:
        checkpoint.restore_checkpoint(engine_b, torn, rank=0, name="step-0000002")
        result["torn"] = "loaded"
    except checkpoint.CheckpointCorrupt as e:
        result["torn"] = {"message": str(e), "name": e.name}
    (work_dir / "result.json").write_text(json.dumps(result, indent=1, default=str))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def restore_result(tmp_path_factory) -> dict:
    work = tmp_path_factory.mktemp("ckpt")
    env = {**os.environ, "PYTHONPATH": str(REPO), "MASTER_PORT": str(free_port()), "DS_ACCELERATOR": "cpu",
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    env.pop("RANK", None)
    proc = subprocess.run(
        [sys.executable, "-c", f"from tests.test_reliability_checkpoint import child; child({str(work)!r})"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    out = work / "result.json"
    assert proc.returncode == 0 and out.exists(), (proc.stdout[-3000:], proc.stderr[-6000:])
    return json.loads(out.read_text())


def test_a_real_zero3_checkpoint_restores_through_weights_only_loads(restore_result):
    r = restore_result
    kinds = {k for f in r["files"] for k in ("model_states", "optim_states") if k in f}
    assert kinds == {"model_states", "optim_states"}, r["files"]
    # Every file DeepSpeed read was unpickled with weights_only=True (model states + optimizer shard).
    assert len(r["load_calls"]) >= len(r["files"]), r["load_calls"]
    assert all(w is True for w in r["load_calls"]), r["load_calls"]
    # Everything came back: the weights, the optimizer moments (the next step is identical) and the state.
    assert r["differs_before"], "engine B started from the same weights: the restore would prove nothing"
    assert r["weights_differ_after_restore"] == [], r["weights_differ_after_restore"][:5]
    assert r["weights_differ_after_next_step"] == [], r["weights_differ_after_next_step"][:5]
    assert r["loss_a"] == r["loss_b"]
    state = r["state"]
    assert (state["step"], state["samples_seen"], state["rejected"]) == (2, 6, {"too_long": 1}), state
    assert r["checkpoint_engine_load_restored"], "the weights-only load must not outlive the restore"


def test_the_allowlist_is_exactly_what_zero3_checkpoints_hold(restore_result):
    """Not one class more than needed (and none missing): each allowed class is plain data."""
    r = restore_result
    needed = sorted({g for gs in r["globals"].values() for g in gs})
    assert needed == sorted(r["allowlist"]), (r["globals"], r["allowlist"])


def test_a_checkpoint_pickle_that_runs_code_is_refused_without_running_it(restore_result):
    poisoned = restore_result["poisoned"]
    assert len(poisoned) == len(restore_result["files"]) >= 2
    for f, p in poisoned.items():
        assert not p["code_ran"], f"{f}: the pickled payload ran"
        assert p["outcome"].startswith("_pickle.UnpicklingError"), (f, p["outcome"])
        assert "Weights only load failed" in p["outcome"], (f, p["outcome"])
        assert "Unsupported global: GLOBAL exec" in p["outcome"], (f, p["outcome"])
    assert restore_result["control_code_ran"], "control: DeepSpeed's own load should have run the payload"


def test_the_marker_lists_every_file_and_a_truncated_shard_is_named(restore_result):
    r = restore_result
    assert r["marker_problem"] is None
    assert r["marker_files"] == [f for f in r["saved_files"] if f != "complete/rank-00000.json"]
    torn = r["torn"]
    assert isinstance(torn, dict) and torn["name"] == "step-0000002", torn
    model = next(f for f in r["files"] if "model_states" in f)
    assert torn["message"].startswith(f"step-0000002: {model} cannot be loaded: RuntimeError: "), torn
    assert "PytorchStreamReader failed reading zip archive" in torn["message"], torn
