"""The benchmarks' own machinery (not their timings: those are read from `python -m bench.run_all`):
GPU mode skips cleanly without a GPU, the packed/padded training-step bench trains the same thing, the
padding-waste bench on real training shards, and the rates file `jobs.plan` reads."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from bench import packing, run_all, train_step
from jobs import plan

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_mode_skips_without_a_gpu():
    out = subprocess.run([sys.executable, "-m", "bench.run_all", "--gpu"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "no CUDA device is visible" in out.stdout and "skipped" in out.stdout


def test_train_step_bench_packed_and_padded_train_the_same_thing():
    args = argparse.Namespace(preset="tiny", device="cpu", micro_batch=4, steps=3, warmup=1, json=None)
    r = train_step.run(args)
    assert r["max_loss_diff"] < 1e-4 and len(r["packed"]["losses"]) == 3
    assert r["packed"]["padding_waste"] < 0.05 < r["padded"]["padding_waste"]
    assert r["packed"]["tokens_per_s"] > 0 and r["packed"]["mfu"] > 0


def test_packing_bench_on_training_shards(tmp_path):
    from jobs.tiny import write_tiny_shards

    shards = write_tiny_shards(tmp_path / "shards", 48, clip_dim=32, rows_per_file=16, image_sides=(256, 672))
    args = argparse.Namespace(data=[f"{shards}:8"], image_size=672, json=None)
    r = packing.run(args)
    (s,) = r["sets"]
    assert s["samples"] + s["rejected"] == 48 and s["tokens_max"] > s["tokens_min"]
    assert r["packed_waste"] < 0.01 < r["padded_waste"]
    assert r["ingest_samples_per_s_per_core"] > 0


def test_rates_written_by_run_all_are_read_by_the_planner(tmp_path):
    rates = run_all.per_core_rates(
        {"ours": 120.0, "processes": 2},
        {"filter_rows_per_s_per_core": 32.5, "captions_rows_per_s_per_core": 800.0, "teacher_images_per_s_per_core_cpu": 0.2},
        {"ingest_samples_per_s_per_core": 118.8},
    )  # fmt: skip
    assert set(rates) == set(plan.DEFAULT_RATES)
    path = tmp_path / "rates.json"
    path.write_text(json.dumps({**rates, "_source": "test"}))
    loaded, sources = plan.load_rates(path)
    assert loaded["download_images_per_s_per_core"] == 60.0 and loaded["filter_rows_per_s_per_core"] == 32.5
    assert all(v.startswith("measured") for v in sources.values())


def test_free_port_never_hands_out_a_port_twice():
    # The two-node test picks eight ports before Ray binds any; two equal picks failed a CI run
    # ("metrics_export is trying to use a port number 42521 that is used by other components").
    from bench.s3server import free_port

    ports = [free_port() for _ in range(3000)]
    assert len(set(ports)) == len(ports)
