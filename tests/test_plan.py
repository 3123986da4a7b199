"""Capacity planner (`jobs/plan.py`): the formulas, the scaling laws, the rates file and the CLI output.

Run:  .venv/bin/python -m pytest tests/test_plan.py
"""

from __future__ import annotations

import itertools
import json
import math

import pytest

from breen.config import BreenConfig
from jobs import plan
from jobs.plan import Assumptions

FAST_INGEST = {**plan.DEFAULT_RATES, "ingest_samples_per_s_per_core": 1e9}  # GPU-bound phases


def phases(**kw) -> dict[str, plan.Phase]:
    return {p.name: p for p in plan.plan(Assumptions(**kw))}


def test_teacher_gpu_hours_from_flops():
    a = Assumptions(pairs=13e6, gpus=64, gpu_type="h100", rates=dict(FAST_INGEST))
    expected = 13e6 * 382e9 / (989e12 * a.teacher_mfu) / 3600
    p = phases(pairs=13e6, gpus=64, gpu_type="h100", rates=dict(FAST_INGEST))["teacher"]
    assert p.gpu_hours == pytest.approx(expected, rel=1e-12)
    assert p.wall_s == pytest.approx(expected * 3600 / 64, rel=1e-12)
    assert plan.teacher_gpu_seconds(a) == pytest.approx(expected * 3600, rel=1e-12)
    assert p.bound == "GPU"


def test_training_flops_from_breen_config():
    a = Assumptions(pairs=13e6, image_tokens=1728, caption_tokens=30, sft_text_tokens=300, sft_samples=1e6)
    per_token = BreenConfig.preset("qwen2.5-7b").flops_per_token
    assert plan.stage_flops(a, "stage1") == pytest.approx(13e6 * 4 / 13 * 1858 * per_token(1858))
    assert plan.stage_flops(a, "stage2") == pytest.approx(13e6 * 9 / 13 * 1858 * per_token(1858))
    assert plan.stage_flops(a, "stage3") == pytest.approx(1e6 * 2128 * per_token(2128))
    # about 6 x 7.6B active parameters per token
    assert 6 * 7.0e9 < per_token(1858) < 6 * 7.6e9 + 3e9
    p = phases(pairs=13e6, image_tokens=1728, caption_tokens=30, rates=dict(FAST_INGEST))["stage1"]
    assert p.gpu_hours == pytest.approx(plan.stage_flops(a, "stage1") / (989e12 * 0.35) / 3600)


@pytest.mark.parametrize("stage", plan.STAGES)
def test_doubling_gpus_halves_training_wall_time(stage):
    one = phases(gpus=64, rates=dict(plan.DEFAULT_RATES))[stage]
    two = phases(gpus=128, rates=dict(plan.DEFAULT_RATES))[stage]
    assert two.wall_s == pytest.approx(one.wall_s / 2)
    assert two.gpu_hours == pytest.approx(one.gpu_hours)  # same work, twice the devices
    assert one.gpus == (32 if stage == "stage3" else 64)


def test_cpu_steps_scale_with_cores_and_rates():
    a = Assumptions(pairs=1e6, cpu_cores=100, ingress_gbps=1e6)  # not bandwidth-bound
    p = {x.name: x for x in plan.plan(a)}
    downloaded = 1e6 / (0.9 * 0.9) * 0.9
    assert p["download"].wall_s == pytest.approx(downloaded / (50 * 100))
    # the captions step (500 rows/s per core by default) runs first, then the filter (100)
    assert p["filter"].wall_s == pytest.approx(downloaded / (500 * 100) + downloaded / (100 * 100))
    assert p["download"].cpu_hours == pytest.approx(100 * p["download"].wall_s / 3600)
    double = {x.name: x for x in plan.plan(Assumptions(pairs=1e6, cpu_cores=200, ingress_gbps=1e6))}
    assert double["filter"].wall_s == pytest.approx(p["filter"].wall_s / 2)
    # a thin pipe makes the download network-bound
    slow = {x.name: x for x in plan.plan(Assumptions(pairs=1e6, cpu_cores=100, ingress_gbps=0.1))}
    assert slow["download"].bound == "network"
    assert slow["download"].wall_s == pytest.approx(downloaded * 250e3 * 8 / 0.1e9)


def test_ingest_bound_is_reported():
    slow = {**plan.DEFAULT_RATES, "ingest_samples_per_s_per_core": 0.01}
    p = phases(rates=slow)["stage1"]
    assert p.bound == "CPU ingest" and any("WARNING" in n for n in p.notes)


def test_storage_counts_images_once_features_and_checkpoints():
    a = Assumptions(pairs=1e6, image_kb=100)
    p = {x.name: x for x in plan.plan(a)}
    # images are stored once, by download; the training shards hold features + text + the image reference
    assert p["download"].storage_bytes == pytest.approx(a.downloaded * 100e3)
    assert p["teacher"].storage_bytes == pytest.approx(1e6 * (100 * 1024 * 2 + plan.ROW_METADATA_BYTES))
    assert p["filter"].storage_bytes < 0.01 * p["download"].storage_bytes
    counts = BreenConfig.preset("qwen2.5-7b").param_counts()
    full = 2 * counts["stored"] + 12 * (counts["stored"] - counts["align_head"])
    assert plan.checkpoint_bytes(a, "stage2") == pytest.approx(full)
    assert plan.checkpoint_bytes(a, "stage1") < plan.checkpoint_bytes(a, "stage2")  # frozen LLM in stage 1
    assert 150e9 < full < 260e9  # the ~240 GB of DESIGN.md section 8


def test_timeline_runs_phases_back_to_back():
    ps = plan.plan(Assumptions())
    spans = plan.timeline(ps)
    assert [s[0] for s in spans] == list(plan.PHASES)
    for (_, _, end), (_, start, _) in itertools.pairwise(spans):
        assert start == end
    assert spans[-1][2] == pytest.approx(sum(p.wall_s for p in ps))


def test_rates_file(tmp_path):
    path = tmp_path / "rates.json"
    path.write_text(json.dumps({"filter_rows_per_s_per_core": 250, "_source": "bench on host X"}))
    rates, sources = plan.load_rates(path)
    assert rates["filter_rows_per_s_per_core"] == 250
    assert rates["download_images_per_s_per_core"] == plan.DEFAULT_RATES["download_images_per_s_per_core"]
    assert (
        sources["filter_rows_per_s_per_core"].startswith("measured")
        and "host X" in sources["filter_rows_per_s_per_core"]
    )
    assert sources["download_images_per_s_per_core"].startswith("default")
    assert plan.load_rates(tmp_path / "missing.json")[0] == plan.DEFAULT_RATES
    path.write_text(json.dumps({"filter_rows_per_sec_per_core": 1}))
    with pytest.raises(ValueError, match="unknown rate"):
        plan.load_rates(path)
    path.write_text(json.dumps({"filter_rows_per_s_per_core": 0}))
    with pytest.raises(ValueError, match="positive"):
        plan.load_rates(path)


def test_bad_assumptions_fail_fast():
    with pytest.raises(ValueError, match="gpu-type"):
        plan.plan(Assumptions(gpu_type="tpu"))
    with pytest.raises(ValueError, match="mfu"):
        plan.plan(Assumptions(mfu=1.5))
    assert plan.plan(Assumptions(gpu_type="tpu", gpu_peak_flops=400e12))  # explicit peak works


def test_cli_prints_every_phase_and_assumption_and_writes_chart(tmp_path, capsys):
    rates = tmp_path / "rates.json"
    rates.write_text(json.dumps({"download_images_per_s_per_core": 40}))
    out = tmp_path / "plan"
    argv = ["--pairs", "13e6", "--gpus", "64", "--gpu-type", "h100", "--rates", str(rates), "--out", str(out)]
    assert plan.main(argv) == 0
    text = capsys.readouterr().out
    for name in (*plan.PHASES, "total"):
        assert f"\n{name}" in text
    for word in ("MFU", "382 GFLOP", "tokens per sample", "peak", "download_ok", "GB", "TB", "Assumptions"):
        assert word in text, word
    for key in plan.DEFAULT_RATES:
        assert f"rate {key}" in text
    assert "rate download_images_per_s_per_core = 40: measured" in text
    assert (out / "timeline.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    doc = json.loads((out / "plan.json").read_text())
    assert [p["name"] for p in doc["phases"]] == list(plan.PHASES)
    total_gpu_h = doc["total"]["gpu_hours"]
    assert 500 < total_gpu_h < 3000, total_gpu_h  # order of 10^3 H100-hours (reference section 2)
    assert math.isclose(doc["total"]["wall_s"], doc["timeline"][-1]["end_s"])


def test_cli_rejects_unknown_gpu(tmp_path, capsys):
    assert (
        plan.main(["--gpu-type", "tpu", "--rates", str(tmp_path / "none.json"), "--out", str(tmp_path)]) == 2
    )
    assert "gpu-type" in capsys.readouterr().err


def test_defaults_follow_the_recipe_and_the_training_config():
    from jobs.config import CheckpointSection

    a = Assumptions()
    assert a.download_ok == 0.8 and a.sft_samples == 4e6  # img2dataset's 77-81%; BREEN's 4M SFT samples
    assert a.checkpoints == CheckpointSection().keep_last == 3
    assert Assumptions(keep_checkpoints=1).checkpoints == 1
    text = "\n".join(plan.describe(a))
    for source in plan.SOURCES.values():
        assert source in text, source
    assert "given" in "\n".join(plan.describe(Assumptions(download_ok=0.7, sft_samples=1e6)))


def test_sft_teacher_and_conversion_are_on_the_timeline():
    a = Assumptions()
    p = {x.name: x for x in plan.plan(a)}
    assert (
        p["sft_teacher"].gpu_hours
        == pytest.approx(
            a.sft_samples * plan.CLIP_L14_336_FLOPS_PER_IMAGE / (a.peak * a.teacher_mfu) / 3600, rel=0.01
        )
        or p["sft_teacher"].bound == "CPU decode"
    )
    assert p["sft_teacher"].storage_bytes > a.sft_samples * a.sft_sample_kb * 1e3
    counts = BreenConfig.preset(a.preset).param_counts()
    assert p["convert"].storage_bytes == 2 * counts["stored"]
    assert p["convert"].wall_s == pytest.approx((p["convert"].storage_bytes + 15.23e9) / 0.5e9, rel=0.01)
    assert p["stage3"].storage_bytes == pytest.approx(
        3 * plan.checkpoint_bytes(a, "stage3") + 2 * counts["stored"]
    )


def test_object_storage_bounds_each_phase_by_its_traffic_over_the_nodes_bandwidth(capsys):
    volume, bucket = phases(rates=FAST_INGEST), phases(rates=FAST_INGEST, storage="bucket")
    a = Assumptions(rates=FAST_INGEST, storage="bucket")
    for name in plan.PHASES:
        moved, nodes = plan.storage_traffic(a, name)
        floor = moved * 8 / (nodes * a.bucket_gbps_per_node * 1e9)
        assert math.isclose(bucket[name].wall_s, max(volume[name].wall_s, floor)), name
        assert bucket[name].storage_bytes == volume[name].storage_bytes  # the same bytes, elsewhere
    # stage 1 reads every sample's image, features and text once, on its 8 GPU nodes
    moved, nodes = plan.storage_traffic(a, "stage1")
    assert nodes == 8 and math.isclose(
        moved, a.stage_samples("stage1") * (a.image_kb * 1e3 + plan.FEATURE_BYTES_PER_IMAGE + plan.ROW_METADATA_BYTES))
    # a slow store becomes the bound, and the hours follow the longer wall time
    slow = phases(rates=FAST_INGEST, storage="bucket", bucket_gbps_per_node=0.01)
    assert slow["stage1"].bound == "bucket" and slow["stage1"].wall_s > volume["stage1"].wall_s
    assert math.isclose(slow["stage1"].gpu_hours / slow["stage1"].wall_s, volume["stage1"].gpu_hours / volume["stage1"].wall_s)
    assert any("uploads in" in n and "asynchronous" in n for n in bucket["stage2"].notes)
    assert plan.main(["--storage", "bucket", "--out", "/tmp/breen-plan-bucket"]) == 0
    text = capsys.readouterr().out
    assert "request costs negligible" in text and "Gbit/s per node" in text
    with pytest.raises(ValueError, match="storage"):
        plan.plan(Assumptions(storage="nfs"))
