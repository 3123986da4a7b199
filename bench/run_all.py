"""Every benchmark, one table; the measured per-core CPU rates go to `bench/rates.json` for `jobs.plan`.

CPU mode (default; about 15 minutes on 2 cores): each benchmark runs in its own process, baseline and
ours side by side (see each module's docstring):

  download        `bench.download`        ours / plain img2dataset, images/s          goal >= 0.95
  teacher         `bench.teacher`         ours / bare open_clip loop, images/s        goal >= 0.95
  train step      `bench.train_overhead`  Ray Train + DeepSpeed / bare torch, s/step  goal <= 1.10
  ingest          `bench.train_overhead`  ingest / consumption, samples/s             goal >= 5
                                          (again with the shards in an S3 bucket: a local moto_server)
  padding waste   `bench.packing`         packed (ours) vs padded, demo corpus        goal < 5%
  filter          `bench.rates`           filter rules / bare PIL decode, rows/s      goal >= 0.7
  rates           `bench.rates`           filter rows/s and ViT-L-14-336 images/s on one core

The demo corpus comes from `make demo` (runs/demo); when it is missing, its data preparation runs first.
`bench/rates.json` gets download (ours / processes), filter, teacher (ViT-L, CPU) and ingest per-core rates
with the machine and commit they were measured on.

GPU mode (``--gpu``; one H100): teacher ViT-L-14-336 in bf16 (ours vs bare loop, images/s and MFU against
382 GFLOP/image), training step tokens/s and MFU on the ``mid`` preset (packed vs padded), padding waste.
Without a CUDA device it says so and exits 0.

Run:  python -m bench.run_all [--quick] [--no-rates-file]
      python -m bench.run_all --gpu
Exit status 1 when a goal is missed (the table says which).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RATES_FILE = ROOT / "bench" / "rates.json"
DEMO = ROOT / "runs" / "demo"
VIT_L_GFLOP = 382.0  # forward FLOPs per 336-px image of ViT-L/14 (577 tokens, 24 layers)


def bench(module: str, *args: str) -> dict:
    """Run `python -m bench.<module> ... --json F` in its own process and return F."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        cmd = [sys.executable, "-m", f"bench.{module}", *args, "--json", str(out)]
        print(f"\n$ {' '.join(cmd[1:-2])}", flush=True)
        subprocess.run(cmd, check=True, cwd=ROOT)
        return json.loads(out.read_text())


def ensure_demo() -> None:
    if (DEMO / "shards").exists() and (DEMO / "sft_shards").exists():
        return
    print("demo corpus missing: running its data preparation (pipelines/configs/demo.yaml)", flush=True)
    subprocess.run([sys.executable, "-m", "pipelines.prepare", "--config", "pipelines/configs/demo.yaml"],
                   check=True, cwd=ROOT)  # fmt: skip


def row(name: str, baseline: str, ours: str, ratio: str, goal: str, ok: bool) -> tuple:
    return (name, baseline, ours, ratio, goal, "ok" if ok else "MISSED")


def print_table(rows: list[tuple]) -> None:
    head = ("benchmark", "baseline", "ours", "ratio", "goal", "")
    widths = [max(len(str(r[i])) for r in [head, *rows]) for i in range(len(head))]
    for r in [head, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()  # fmt: skip
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def per_core_rates(download: dict, rates: dict, packing: dict) -> dict[str, float]:
    """The `jobs.plan` rates file's entries from the download, rates and packing benchmark results."""
    out = {
        "download_images_per_s_per_core": round(download["ours"] / download["processes"], 2),
        "filter_rows_per_s_per_core": round(rates["filter_rows_per_s_per_core"], 1),
        "captions_rows_per_s_per_core": round(rates["captions_rows_per_s_per_core"], 1),
        "ingest_samples_per_s_per_core": round(packing["ingest_samples_per_s_per_core"], 1),
    }
    if "teacher_images_per_s_per_core_cpu" in rates:  # absent with --quick (no ViT-L run)
        out["teacher_images_per_s_per_core_cpu"] = round(rates["teacher_images_per_s_per_core_cpu"], 4)
    return out


def cpu_mode(args) -> int:
    ensure_demo()
    cores = os.cpu_count() or 2
    quick = args.quick
    dl = bench("download", "--images", "150" if quick else "300", "--repeats", "1" if quick else "2")
    te = bench("teacher", "--images", "64" if quick else "192", "--repeats", "1" if quick else "2")
    tr = bench("train_overhead", "--bucket", *(["--steps", "8", "--warmup", "2", "--hidden", "320"] if quick else []))
    pk = bench("packing")
    rt = bench("rates", *(["--no-vit-l"] if quick else []))

    rows = [
        row("download (images/s)", f"{dl['baseline']:.1f}", f"{dl['ours']:.1f}", f"{dl['ratio']:.3g}", ">= 0.95",
            dl["ratio"] >= 0.95),
        row("teacher CPU (images/s)", f"{te['baseline']:.2f}", f"{te['ours']:.2f}", f"{te['ratio']:.3g}", ">= 0.95",
            te["ratio"] >= 0.95),
        row("train step (s/step)", f"{tr['baseline_step_s']:.3f}", f"{tr['ours_step_s']:.3f}", f"{tr['step_time_ratio']:.3g}",
            "<= 1.10", tr["step_time_ratio"] <= 1.10),
        row("ingest/consumption (samples/s)", f"{tr['consumption_samples_per_s']:.2f}",
            f"{tr['ingest_samples_per_s']:.1f}", f"{tr['ingest_over_consumption']:.3g}", ">= 5",
            tr["ingest_over_consumption"] >= 5),
        row("ingest from an S3 bucket/consumption", f"{tr['consumption_samples_per_s']:.2f}",
            f"{tr['bucket_ingest_samples_per_s']:.1f}", f"{tr['bucket_ingest_over_consumption']:.3g}", ">= 5",
            tr["bucket_ingest_over_consumption"] >= 5),
        row("padding waste (demo corpus)", f"{pk['padded_waste']:.1%}", f"{pk['packed_waste']:.2%}",
            "", "< 5%", pk["packed_waste"] < 0.05),
        row("filter / bare decode (rows/s)", f"{rt['bare_decode_rows_per_s']:.1f}",
            f"{rt['filter_rows_per_s_per_core']:.1f}", f"{rt['filter_vs_bare_decode']:.3g}", ">= 0.7",
            rt["filter_vs_bare_decode"] >= 0.7),
    ]  # fmt: skip
    rates = per_core_rates(dl, rt, pk)
    print("\n== CPU benchmarks ==")
    print_table(rows)
    print("\nper-core CPU rates: " + ", ".join(f"{k} = {v}" for k, v in rates.items()))
    if not args.no_rates_file:
        rates["_source"] = (f"bench.run_all{' --quick' if quick else ''}, {cores} CPU cores, {platform.machine()}, "
                            f"{datetime.date.today()}, commit {git_commit()}")  # fmt: skip
        RATES_FILE.write_text(json.dumps(rates, indent=2) + "\n")
        print(f"wrote {RATES_FILE.relative_to(ROOT)} (read by python -m jobs.plan)")
    return 0 if all(r[-1] == "ok" for r in rows) else 1


def gpu_mode(args) -> int:
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    if not has_gpu:
        print(
            "GPU mode: no CUDA device is visible (torch.cuda.is_available() is False); GPU benchmarks skipped."
        )
        return 0
    from jobs.metrics import peak_tflops

    peak = peak_tflops(None, True)
    cpus = str(os.cpu_count() or 8)
    te = bench("teacher", "--device", "cuda", "--model", "ViT-L-14-336", "--images", str(args.gpu_images),
               "--batch-size", "256", "--threads", cpus, "--repeats", "1")  # fmt: skip
    te_mfu = te["ours"] * VIT_L_GFLOP * 1e9 / (peak * 1e12)
    ts = bench("train_step", "--preset", "mid", "--device", "cuda")
    pk = bench("packing")
    rows = [
        row("teacher ViT-L bf16 (images/s)", f"{te['baseline']:.0f}", f"{te['ours']:.0f}", f"{te['ratio']:.3g}", ">= 0.95",
            te["ratio"] >= 0.95),
        row("teacher images/s per GPU", "", f"{te['ours']:.0f}", "", ">= 1150", te["ours"] >= 1150),
        row("teacher MFU", "", f"{te_mfu:.1%}", "", "report", True),
        row("train step mid tokens/s (padded->packed)", f"{ts['padded']['tokens_per_s']:,.0f}",
            f"{ts['packed']['tokens_per_s']:,.0f}", f"{ts['speedup_packed_over_padded']:.3g}", ">= 1", ts["speedup_packed_over_padded"] >= 1),
        row("train step mid MFU (packed)", f"{ts['padded']['mfu']:.1%}", f"{ts['packed']['mfu']:.1%}",
            "", "report", True),
        row("padding waste (synthetic, mid)", f"{ts['padded']['padding_waste']:.1%}",
            f"{ts['packed']['padding_waste']:.2%}", "", "< 5%",
            ts["packed"]["padding_waste"] < 0.05),
        row("padding waste (demo corpus)", f"{pk['padded_waste']:.1%}", f"{pk['packed_waste']:.2%}",
            "", "< 5%", pk["packed_waste"] < 0.05),
    ]  # fmt: skip
    print(
        f"\n== GPU benchmarks ({ts['device']}, peak {peak:.0f} TFLOP/s bf16, {ts['attn_implementation']}) =="
    )
    print_table(rows)
    return 0 if all(r[-1] == "ok" for r in rows) else 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true", help="run the GPU benchmarks (skips without a CUDA device)")
    ap.add_argument("--quick", action="store_true", help="smaller CPU runs (about 6 minutes; noisier)")
    ap.add_argument("--gpu-images", type=int, default=4096, help="teacher images in GPU mode")
    ap.add_argument("--no-rates-file", action="store_true", help=f"do not write {RATES_FILE.name}")
    args = ap.parse_args()
    sys.exit(gpu_mode(args) if args.gpu else cpu_mode(args))


if __name__ == "__main__":
    main()
