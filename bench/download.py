"""Download throughput: our download step vs plain img2dataset, side by side on the same URL list.

A synthetic corpus is served from 127.0.0.1; both sides fetch the same URL list, resize to long
side <= 672 (never upscaling), re-encode JPEG q95 and write Parquet:
  baseline  `img2dataset.download(...)` with its multiprocessing distributor, N processes;
  ours      `pipelines.download.run` on a local Ray: one Ray task per shard (N in parallel), URL
            vetting, decode guard, accounting, markers and manifest.
Prints images/s for both (successful images over wall time; best of `--repeats` alternating runs)
and the ratio (goal >= 0.95).

Run:  python -m bench.download [--images 300] [--processes 2]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def baseline(url_list: Path, out: Path, processes: int, threads: int, per_shard: int) -> float:
    from img2dataset import download

    t0 = time.perf_counter()
    download(
        url_list=str(url_list), image_size=672, output_folder=str(out), processes_count=processes,
        resize_mode="keep_ratio_largest", resize_only_if_bigger=True, encode_quality=95, encode_format="jpg",
        output_format="parquet", input_format="parquet", url_col="url", caption_col="caption",
        thread_count=threads, number_sample_per_shard=per_shard, extract_exif=False, timeout=5,
        compute_hash="sha256", distributor="multiprocessing", enable_wandb=False,
    )  # fmt: skip
    seconds = time.perf_counter() - t0
    ok = sum(json.loads(p.read_text())["successes"] for p in out.glob("*_stats.json"))
    return ok / seconds


def ours(url_list: Path, out: Path, processes: int, threads: int, per_shard: int) -> float:
    from pipelines import download
    from pipelines.config import PrepareConfig

    cfg = PrepareConfig(output_dir=str(out))
    cfg.input.urls = [str(url_list)]
    d = cfg.download
    d.rows_per_shard, d.threads_per_shard, d.timeout_s, d.allow_private = per_shard, threads, 5, ["127.0.0.1"]
    d.cpus_per_shard = 1.0
    t0 = time.perf_counter()
    manifest = download.run(cfg)
    return manifest["counts"]["kept"] / (time.perf_counter() - t0)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=300)
    ap.add_argument("--processes", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--threads", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=2, help="alternating runs per side; the best counts")
    ap.add_argument("--json", default=None)
    return ap


def run(args) -> dict:
    """Both sides, alternating; returns {"baseline", "ours", "ratio", "runs", ...} (images/s)."""
    from pipelines import synthetic
    from pipelines.raystart import init_ray

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = synthetic.make_corpus(tmp / "site", n_images=args.images, seed=1)
        with synthetic.serve(tmp / "site") as server:
            url_list = tmp / "urls.parquet"
            n = synthetic.write_url_list(corpus, server.base_url, url_list, "parquet")
            per_shard = -(-n // (args.processes * 2))  # 2 shards per process on both sides
            init_ray(None, num_cpus=args.processes)
            bases, mines = [], []
            for r in range(args.repeats):  # alternate so both sides see the same machine load
                bases.append(
                    baseline(url_list, tmp / f"baseline{r}", args.processes, args.threads, per_shard)
                )
                mines.append(ours(url_list, tmp / f"ours{r}", args.processes, args.threads, per_shard))
    base, mine = max(bases), max(mines)
    return {"urls": n, "processes": args.processes, "threads": args.threads, "baseline": base, "ours": mine,
            "ratio": mine / base, "runs": {"baseline": bases, "ours": mines}}  # fmt: skip


def main() -> None:
    args = parser().parse_args()
    res = run(args)
    runs = res["runs"]
    print(f"\nruns (images/s): baseline {[round(b, 1) for b in runs['baseline']]}, "
          f"ours {[round(m, 1) for m in runs['ours']]}")  # fmt: skip
    print(
        f"download: {res['urls']} URLs from 127.0.0.1, {args.processes} processes x {args.threads} threads each side"
    )
    print(f"  baseline (plain img2dataset):  {res['baseline']:8.2f} images/s")
    print(f"  ours (Ray download step):      {res['ours']:8.2f} images/s")
    print(f"  ratio ours/baseline: {res['ratio']:.3f}  (goal >= 0.95)")
    if args.json:
        Path(args.json).write_text(json.dumps(res))


if __name__ == "__main__":
    main()
