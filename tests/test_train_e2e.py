"""Training end to end: Ray Train + real DeepSpeed ZeRO-3 (CPU, gloo), 2 workers, the tiny BREEN.

- The three stages chain on the demo data preparation's training shards (`prepared_demo`), each starting
  from the previous stage's export, and the final export answers `breen.generate`.
- After stage 1, every parameter outside the stage-1 trainable set is bitwise unchanged and every
  trainable one has changed.
- Kill-and-resume: a run stopped after 3 steps and relaunched gives the same per-step losses, the same
  validation values at the same steps (a separate held-out shard set, ``data.val_paths``, evaluated every
  2 steps) and the same final weights as an uninterrupted run (fixed seed, CPU); the resume is recorded
  in the run's config history and ``train_config.json`` stays the first record.
- Validation (`jobs.validation`): every stage of the chain holds out ``data.val_fraction`` of its rows
  and logs ``val/...`` values to metrics.jsonl and TensorBoard and sample generations to samples.jsonl.
- Torn checkpoints: a run stopped at step 9 (checkpoints 3, 6, 9) whose step-9 ZeRO shard is truncated
  and whose step-6 optimizer shard has one byte flipped (same size): the rerun names both (the first by
  size before Ray starts, the second by sha256 from the rank that reads it), falls back to step 3 and
  ends with the uninterrupted run's losses and weights.
- Config change on resume: refused before anything runs, listing each changed field (local and on S3),
  then allowed with ``--allow-config-change``, which trains with the new values and records the diff.
- A Ray Train worker killed (SIGKILL) in the middle of a stage: the worker group restarts from the
  latest checkpoint and the run ends with the same final weights as the uninterrupted run.
- A deterministic error (a TypeError) in the first step: reported once with its traceback, exit 1, no
  restart although `checkpoint.max_failures` allows three.
- Everything in a bucket (a real S3 API, `moto_server`): shards, Ray Train storage, checkpoints (uploaded
  asynchronously), metrics and export; a worker killed after a checkpoint resumes from the bucket with the
  uninterrupted run's losses and weights, and `breen.generate` answers from the exported ``s3://`` model.

Run:  .venv/bin/python -m pytest tests/test_train.py -m slow
"""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from breen.stages import STAGES
from breen.storage import Store, fetch_dir
from jobs import launch, train
from jobs.checkpoint import latest_checkpoint, registered_checkpoints
from jobs.config import CONFIG_DIR
from jobs.deepspeed_config import SHM_BUFFER_PREFIX
from jobs.tiny import write_tiny_shards
from tests.conftest import with_set

pytestmark = pytest.mark.slow
CPU = ["--profile", "cpu", "--num-cpus", "4"]


def losses(run_dir: Path | Store) -> dict[int, float]:
    """step -> loss from metrics.jsonl (a step logged twice, after a restart, must agree with itself)."""
    out: dict[int, float] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        assert out.setdefault(rec["step"], rec["loss"]) == rec["loss"], (
            f"step {rec['step']} redone differently"
        )
    return out


def val_records(run_dir: Path) -> dict[int, dict[str, float]]:
    """step -> the ``val/...`` values of that step (a step logged twice must agree with itself)."""
    out: dict[int, dict[str, float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        val = {k: v for k, v in rec.items() if k.startswith("val/")}
        if val:
            assert out.setdefault(rec["step"], val) == val, f"step {rec['step']} evaluated differently"
    return out


def weights(export: Path) -> dict[str, torch.Tensor]:
    files = sorted(export.glob("*.safetensors"))
    assert files, f"no safetensors in {export}"
    out: dict[str, torch.Tensor] = {}
    for f in files:
        out.update(load_file(f))
    return out


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    differ = [k for k in a if not torch.equal(a[k], b[k])]
    assert not differ, f"{len(differ)} tensors differ, e.g. {differ[:3]}"


# ----------------------------------------------------------------------------- the three stages
@pytest.fixture(scope="module")
def chained(prepared_demo, tmp_path_factory):
    cfg, _, _, _ = prepared_demo
    out = tmp_path_factory.mktemp("train") / "runs"
    argv = ["--stage", "all", "--data", str(cfg.out / "shards"), "--sft-data", str(cfg.out / "sft_shards"),
            "--init-from", "tiny", "--output-dir", str(out), *CPU, "--config", str(CONFIG_DIR / "demo.yaml"),
            *with_set("stage1.schedule.max_steps=6", "stage2.schedule.max_steps=3", "stage3.schedule.max_steps=3",
                      "data.val_fraction=0.2", "validation.every_steps=3", "validation.max_rows=8")]  # fmt: skip
    before = set(Path("/dev/shm").glob(f"{SHM_BUFFER_PREFIX}_*"))
    assert launch.main(argv) == 0
    left = set(Path("/dev/shm").glob(f"{SHM_BUFFER_PREFIX}_*")) - before
    assert not left, f"DeepSpeed's CPU all-reduce buffers left in /dev/shm: {sorted(map(str, left))}"
    return out


def test_three_stages_chain_and_the_export_answers_generate(chained):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from breen.generate import answer
    from breen.model import BreenForCausalLM
    from jobs.ingest import load_tokenizer

    previous = None
    for stage in STAGES:
        run = chained / stage
        config = json.loads((run / "train_config.json").read_text())
        assert config["stage"] == stage
        if previous is not None:  # each stage starts from the previous stage's export
            assert config["model"]["init_from"] == str(previous / "export")
        records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records] == list(range(1, len(records) + 1)) and records
        for r in records:
            for key in ("loss", "lm_loss", "align_fine", "align_coarse", "grad_norm", "samples_per_s",
                        "tokens_per_s", "mfu"):  # fmt: skip
                assert isinstance(r[key], float) and r[key] == r[key], (stage, key, r)  # finite, not NaN
            assert r["lr"] and all(v >= 0 for v in r["lr"].values())
        if stage != "stage3":  # captions: every sample carries CLIP targets
            assert all(r["align_fine"] > 0 and r["align_coarse"] > 0 for r in records)
        assert list((run / "tensorboard").rglob("events.out.tfevents.*")), f"no TensorBoard log in {run}"
        val = val_records(run)  # every 3 steps and at the end, on held-out rows
        assert sorted(val) == sorted({*range(3, len(records) + 1, 3), len(records)}), (stage, sorted(val))
        for v in val.values():
            assert v["val/rows"] == min(8, v["val/held_out"]) and v["val/lm_loss"] > 0, (stage, v)
            if stage != "stage3":
                assert v["val/align_fine"] > 0 and v["val/cos_fine"] == pytest.approx(1 - v["val/align_fine"])
        events = EventAccumulator(str(run / "tensorboard")).Reload()
        assert [(e.step, e.value) for e in events.Scalars("val/lm_loss")] == [
            (s, pytest.approx(v["val/lm_loss"])) for s, v in sorted(val.items())
        ]
        samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
        assert [s["step"] for s in samples] == [s for s in sorted(val) for _ in range(2)]
        assert all(isinstance(s["answer"], str) and s["key"] for s in samples)
        assert len(sorted(run.glob("step-*"))) <= 2, "checkpoint.keep_last=2 not honoured"
        assert (run / "export" / "config.json").exists()
        previous = run

    export = chained / "stage3" / "export"
    model = BreenForCausalLM.from_pretrained(export, attn_implementation="sdpa").eval()
    tokenizer = load_tokenizer(export)
    from PIL import Image

    image = Image.new("RGB", (64, 48), (200, 30, 30))
    first = answer(model, tokenizer, "What is in the picture?", image=image, max_new_tokens=8)
    again = answer(model, tokenizer, "What is in the picture?", image=image, max_new_tokens=8)
    assert isinstance(first, str) and first == again


def test_stage1_changes_exactly_the_trainable_set(chained):
    from breen.model import BreenForCausalLM
    from breen.stages import trainable_components

    config = json.loads((chained / "stage1" / "train_config.json").read_text())
    init = Path(config["model"]["init_from"])
    model = BreenForCausalLM.from_pretrained(init, attn_implementation="sdpa")
    chosen = set(trainable_components(model.config, "stage1"))
    trainable = {
        name for comp, params in model.component_params().items() if comp in chosen for name, _ in params
    }
    before, after = weights(init), weights(chained / "stage1" / "export")
    assert before.keys() == after.keys() and trainable and trainable < set(before)
    unchanged = sorted(k for k in trainable if torch.equal(before[k], after[k]))
    moved = sorted(k for k in set(before) - trainable if not torch.equal(before[k], after[k]))
    assert not unchanged, f"trainable parameters that did not change: {unchanged[:5]}"
    assert not moved, f"frozen parameters that changed: {moved[:5]}"
    print(
        f"\nstage 1: {len(trainable)} trainable tensors changed, {len(before) - len(trainable)} frozen unchanged"
    )


# ----------------------------------------------------------------------------- resume and failures
@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return write_tiny_shards(tmp_path_factory.mktemp("tiny-shards") / "shards", 96, clip_dim=64, seed=3)


def stage1_argv(shards: Path, out: Path, *extra: str) -> list[str]:
    return ["--stage", "stage1", "--data", str(shards), "--init-from", "tiny", "--output-dir", str(out), *CPU,
            *with_set("schedule.max_steps=12", "checkpoint.every_steps=3", "checkpoint.async_upload=false", *extra)]  # fmt: skip


@pytest.fixture(scope="module")
def val_shards(tmp_path_factory):
    """A separate held-out shard set (``data.val_paths``): evaluating it leaves the training rows as they are."""
    return write_tiny_shards(tmp_path_factory.mktemp("val-shards") / "shards", 10, clip_dim=64, seed=4)


def val_args(val_shards: Path) -> list[str]:
    return [f"data.val_paths={val_shards}", "validation.every_steps=2", "validation.max_rows=6"]


@pytest.fixture(scope="module")
def uninterrupted(shards, val_shards, tmp_path_factory, ray_local):
    out = tmp_path_factory.mktemp("uninterrupted")
    assert launch.main(stage1_argv(shards, out, *val_args(val_shards))) == 0
    return out / "stage1"


def test_stopped_and_resumed_run_matches_an_uninterrupted_one(shards, val_shards, uninterrupted, tmp_path):
    assert launch.main(stage1_argv(shards, tmp_path, *val_args(val_shards), "debug.stop_after_step=3")) == 0
    run = tmp_path / "stage1"
    assert sorted(losses(run)) == [1, 2, 3] and not (run / "export").exists()
    assert sorted(val_records(run)) == [2]
    first = (run / "train_config.json").read_text()
    assert launch.main(stage1_argv(shards, tmp_path, *val_args(val_shards))) == 0  # resumes at step 3
    want, got = losses(uninterrupted), losses(run)
    assert sorted(want) == list(range(1, 13))
    assert got == want, f"per-step losses differ:\n uninterrupted {want}\n resumed       {got}"
    want_val, got_val = val_records(uninterrupted), val_records(run)
    assert sorted(want_val) == list(range(2, 13, 2)) and all(v["val/rows"] == 6 for v in want_val.values())
    assert got_val == want_val, f"validation differs:\n uninterrupted {want_val}\n resumed       {got_val}"
    assert_same_weights(weights(uninterrupted / "export"), weights(run / "export"))
    history = [json.loads(p.read_text()) for p in sorted((run / "config_history").glob("*.json"))]
    assert [(h["resumed_from"], h["changes"]) for h in history] == [(None, []), ("step-0000003", [])]
    assert (run / "train_config.json").read_text() == first  # a resume never rewrites the first record


def test_a_torn_latest_checkpoint_falls_back_to_the_newest_complete_one(
    shards, uninterrupted, tmp_path, capsys
):
    keep = "checkpoint.keep_last=3"
    assert launch.main(stage1_argv(shards, tmp_path, keep, "debug.stop_after_step=9")) == 0
    run = tmp_path / "stage1"
    assert [p.name for p in sorted(run.glob("step-*"))] == ["step-0000003", "step-0000006", "step-0000009"]
    model0, optim1 = (
        "zero/zero_pp_rank_0_mp_rank_00_model_states.pt",
        "zero/zero_pp_rank_1_mp_rank_00_optim_states.pt",
    )
    size = (run / "step-0000009" / model0).stat().st_size
    with open(
        run / "step-0000009" / model0, "r+b"
    ) as f:  # torn: the latest checkpoint's ZeRO shard cut short
        f.truncate(size // 2)
    data = bytearray((run / "step-0000006" / optim1).read_bytes())  # bit rot: same size, one byte changed
    data[len(data) // 2] ^= 0xFF
    (run / "step-0000006" / optim1).write_bytes(bytes(data))
    capsys.readouterr()

    assert launch.main(stage1_argv(shards, tmp_path, keep)) == 0
    out = capsys.readouterr().out
    reported = [
        line
        for line in out.splitlines()
        if line.startswith("[stage1] ") and ("torn" in line or "resuming" in line)
    ]
    assert (
        f"[stage1] torn checkpoint: {run}/step-0000009: {model0} is {size // 2} bytes, expected {size}" in out
    )
    assert f"[stage1] torn checkpoint: rank 1: step-0000006: {optim1} has sha256 " in out
    assert f"[stage1] resuming from {run}/step-0000003, the newest complete checkpoint" in out
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [*range(1, 10), *range(4, 13)], steps  # the rerun started again after step 3
    assert losses(run) == losses(uninterrupted)  # every redone step equals its first run, and the reference
    assert_same_weights(weights(uninterrupted / "export"), weights(run / "export"))
    aside = sorted(p.name[: len("torn-step-0000006")] for p in run.glob("torn-*"))
    assert aside == ["torn-step-0000006", "torn-step-0000009"]
    registered = registered_checkpoints(run)  # Ray Train's record matches the disk
    assert registered and all((run / n).is_dir() and n.startswith("step-") for n in registered)
    with capsys.disabled():
        print(
            "\ntorn checkpoints reported by the rerun:\n  "
            + "\n  ".join(reported)
            + f"\nsteps logged: {steps}"
        )


def test_a_resume_with_a_changed_config_is_refused_then_allowed_and_recorded(
    shards, tmp_path, capsys, s3_server
):
    def argv(*extra: str) -> list[str]:
        return stage1_argv(shards, tmp_path, "schedule.max_steps=6", *extra)

    assert launch.main(argv("debug.stop_after_step=3")) == 0
    run = tmp_path / "stage1"
    first = (run / "train_config.json").read_text()
    changed = ["seed=1", "optim.lrs.patch_embed=0.375", "data.max_length=300", "checkpoint.keep_last=5"]
    lines = ["data.max_length: 4096 -> 300", "optim.lrs.patch_embed: 0.0004 -> 0.375", "seed: 0 -> 1"]
    capsys.readouterr()
    assert launch.main(argv(*changed)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"config error: resume of {run} with a changed config (vs {run}/config_history/0000.json):\n"
                          + "".join(f"  {line}\n" for line in lines)), err  # fmt: skip
    assert "pass --allow-config-change to continue with the new ones" in err
    assert sorted(p.name for p in (run / "config_history").iterdir()) == ["0000.json"]
    assert max(losses(run)) == 3 and (run / "train_config.json").read_text() == first

    bucket = Store.at(f"s3://breen-test/refuse-{os.getpid()}/runs", endpoint_override=s3_server)
    (bucket / "stage1").upload_dir(run)  # the same run folder, in a bucket
    remote = argv(*changed, f"storage.endpoint_override={s3_server}")
    remote[remote.index("--output-dir") + 1] = bucket.uri
    assert launch.main(remote) == 2
    err = capsys.readouterr().err
    assert (
        f"config error: resume of {bucket}/stage1 with a changed config (vs {bucket}/stage1/config_history/0000.json)"
        in err
    )
    assert all(f"\n  {line}\n" in err for line in lines), err
    assert [n for n in (bucket / "stage1" / "config_history").names()] == ["0000.json"]

    assert launch.main(argv(*changed, "--allow-config-change")) == 0
    out = capsys.readouterr().out
    assert f"[stage1] --allow-config-change: resuming {run} with a changed config" in out
    assert all(f"  {line}" in out for line in lines)
    history = [json.loads(p.read_text()) for p in sorted((run / "config_history").glob("*.json"))]
    assert [(h["resumed_from"], h["changes"]) for h in history] == [(None, []), ("step-0000003", lines)]
    assert history[1]["config"]["seed"] == 1 and history[1]["config"]["optim"]["lrs"]["patch_embed"] == 0.375
    assert (run / "train_config.json").read_text() == first  # the first record is never rewritten
    records = {r["step"]: r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())}
    assert sorted(records) == list(range(1, 7))
    for step, base in ((3, 4e-4), (4, 0.375)):  # the patch-embedding rate before and after the change
        want = base * train.lr_factor(step - 1, 6, 0.03)
        assert records[step]["lr"]["patch_embed"] == pytest.approx(want), (step, records[step]["lr"])


def train_workers() -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if "RayTrainWorker" in " ".join(p.info["cmdline"] or []):
                found.append(p)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def test_killed_worker_restarts_from_the_latest_checkpoint(shards, uninterrupted, tmp_path):
    run = tmp_path / "stage1"
    killed: list[int] = []
    registered: list[int] = []

    def kill_after_a_checkpoint() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and not killed:
            # Once Ray Train has registered a checkpoint (its controller collects reports every 2 s) and a
            # later step is logged, kill a worker: the restart must resume from that checkpoint.
            latest = latest_checkpoint(run)
            if latest is not None and max(losses(run)) > latest[1]["step"]:
                workers = train_workers()
                if workers:
                    victim = workers[-1]
                    os.kill(victim.pid, signal.SIGKILL)
                    killed.append(victim.pid)
                    registered.append(latest[1]["step"])
                    return
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_after_a_checkpoint, daemon=True)
    watcher.start()
    assert launch.main(stage1_argv(shards, tmp_path, "checkpoint.max_failures=1")) == 0
    watcher.join(timeout=5)
    assert killed, "no Ray Train worker was killed (the run ended first?)"
    text = (run / "metrics.jsonl").read_text().splitlines()
    steps = [json.loads(line)["step"] for line in text]
    back = [i for i in range(1, len(steps)) if steps[i] <= steps[i - 1]]
    assert back, f"no step ran twice: the run did not restart ({steps})"
    resumed_at = steps[back[0]] - 1
    assert resumed_at >= registered[0] > 0, (
        f"restarted from step {resumed_at}, not from a checkpoint ({steps})"
    )
    assert losses(run) == losses(uninterrupted)
    assert_same_weights(weights(uninterrupted / "export"), weights(run / "export"))
    print(
        f"\nworker {killed[0]} killed (checkpoint step {registered[0]} registered); restarted at step {resumed_at}; steps logged: {steps}"
    )


def test_a_deterministic_first_step_error_stops_at_once_without_restarts(shards, tmp_path, capsys):
    argv = stage1_argv(shards, tmp_path, "checkpoint.max_failures=3", "debug.error_at_step=0")
    assert launch.main(argv) == 1
    run = tmp_path / "stage1"
    assert (run / "debug-errors").read_text().splitlines() == ["step 0"], "the error was raised again"
    assert not (run / "metrics.jsonl").exists() or not (run / "metrics.jsonl").read_text().strip()
    err = capsys.readouterr().err
    assert "error: stage1: rank 0 failed before its first step, not restarted" in err
    assert "TypeError: debug.error_at_step=0: injected deterministic error on rank 0" in err
    assert "Traceback (most recent call last)" in err and "in maybe_fail" in err  # the real traceback


def test_stage1_on_s3_resumes_a_killed_worker_from_the_bucket(shards, uninterrupted, s3_server, tmp_path, capsys,
                                                               monkeypatch):  # fmt: skip
    from breen import generate

    bucket = Store.at("s3://breen-test/train-s3", endpoint_override=s3_server)
    bucket.joinpath("shards").upload_dir(shards)
    run = bucket / "runs" / "stage1"
    killed: list[int] = []

    def kill_after_a_checkpoint() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            latest = latest_checkpoint(run)  # Ray Train's snapshot, read from the bucket
            if latest is not None and 3 <= latest[1]["step"] < 9:
                workers = train_workers()
                if workers:
                    os.kill(workers[-1].pid, signal.SIGKILL)
                    killed.append(latest[1]["step"])
                    return
            time.sleep(0.05)

    watcher = threading.Thread(target=kill_after_a_checkpoint, daemon=True)
    watcher.start()
    argv = stage1_argv(Path("unused"), Path("unused"), "checkpoint.max_failures=1", "checkpoint.async_upload=true",
                       f"storage.endpoint_override={s3_server}")  # fmt: skip
    argv[argv.index("--data") + 1] = (bucket / "shards").uri
    argv[argv.index("--output-dir") + 1] = (bucket / "runs").uri
    assert launch.main(argv) == 0
    watcher.join(timeout=5)
    out = capsys.readouterr().out
    assert killed, "no Ray Train worker was killed (the run ended first?)"
    assert not (tmp_path / "s3:").exists() and not Path("s3:").exists()
    assert losses(run) == losses(uninterrupted)
    export = fetch_dir(run / "export", endpoint_override=s3_server)
    assert_same_weights(weights(uninterrupted / "export"), weights(export))
    assert [n for n in run.names() if n.startswith("step-")] == [] and len(run.dirs()) >= 2
    stalls = [float(m) for m in re.findall(r"step loop stalled ([0-9.]+) s \(async upload\)", out)]
    sync = [float(m) for m in re.findall(r"step loop stalled ([0-9.]+) s \(sync upload\)", out)]
    assert stalls and sync, out[-2000:]
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    generate.main(["--model", (run / "export").uri, "--prompt", "What is this?", "--max-new-tokens", "4"])
    with capsys.disabled():  # shown in every test run: the measured stall per checkpoint
        print(
            f"\nstage 1 on S3: worker killed after checkpoint step {killed[0]}; checkpoint stalls with async upload to the "
            f"bucket: {', '.join(f'{x:.2f}' for x in stalls)} s; the last (sync) one: {', '.join(f'{x:.2f}' for x in sync)} s"
        )
