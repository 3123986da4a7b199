"""Data preparation at growing scale: per-step cost per row, worker memory, bytes written, and the
near-duplicate pass alone on millions of hashes.

Part 1, the whole preparation (download -> captions -> filter -> teacher into shards) on synthetic corpora
of `--rows` images (default 1k and 10k) served from 127.0.0.1 by a local HTTP server, on an embedded Ray:
small JPEGs (160x120, each a distinct random colour grid, so dedup keeps most; 2% exact copies and 2%
re-encoded near copies so it has work), English captions, the tiny teacher of the demo. Per step it prints
rows/s, the highest RSS seen in one Ray worker (sampled every 0.2 s), and the bytes the step wrote; then
the bytes written by the whole preparation over the bytes of the training set (the training shards plus
the image bytes they reference), and, between the smallest and the largest corpus, the cost per row of
every step (goal: within 1.2x, i.e. linear).

Part 2, `pipelines.dedup.near_duplicates` alone (one process, no Ray) on `--hashes` random 64-bit hashes
(default 1M and 13M) of which 1% share one 16-bit band value (a hot bucket of different images): seconds
and peak memory (goal for 13M on 2 cores: under 15 minutes and 8 GB).

Run:  python -m bench.scale [--rows 1000 10000] [--hashes 1e6 13e6] [--json bench/scale.json]
      python -m bench.scale --rows 100000 --hashes      (the 100k run: about an hour on 2 cores)
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

CONFIGS = Path(__file__).resolve().parent.parent / "pipelines" / "configs"
HOT_FRACTION = 0.01


# ----------------------------------------------------------------------------- corpus


def make_corpus(root: Path, n: int, seed: int = 0) -> list[dict[str, str]]:
    """`n` small JPEGs under `root/img/` and their URL-list rows (url filled in later)."""
    from PIL import Image

    from pipelines.synthetic import english_caption

    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    originals: list[bytes] = []
    for i in range(n):
        kind = rng.random()
        if originals and kind < 0.02:  # exact copy of an earlier image
            data = originals[int(rng.integers(len(originals)))]
        else:
            grid = rng.integers(0, 256, (6, 8, 3), np.uint8)
            img = Image.fromarray(grid).resize((160, 120), Image.Resampling.BILINEAR)
            buf = io.BytesIO()
            img.save(buf, "JPEG", quality=70 if kind < 0.04 else 90)  # 0.02-0.04: a near copy's look-alike
            data = buf.getvalue()
            originals.append(data)
        name = f"img/{i:07d}.jpg"
        (root / name).write_bytes(data)
        rows.append({"path": name, "caption": english_caption(rng)})
    return rows


class RssSampler:
    """Highest RSS of any Ray worker process while it runs (sampled every `every` seconds)."""

    def __init__(self, every: float = 0.2) -> None:
        self.every, self.peak, self._stop = every, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        while not self._stop.is_set():
            for p in psutil.process_iter(["name", "cmdline", "memory_info"]):
                try:
                    name = p.info["name"] or ""
                    cmd = " ".join(p.info["cmdline"] or [])
                    if name.startswith("ray::") or "default_worker.py" in cmd:
                        self.peak = max(self.peak, p.info["memory_info"].rss)
                except (psutil.Error, TypeError, AttributeError):
                    continue
            self._stop.wait(self.every)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def training_set_bytes(out: Path) -> tuple[int, int]:
    """(bytes of the training-shard files, bytes of the images they reference)."""
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    from breen import shard_format as sf

    files = sorted((out / "shards").glob("part-*.parquet"))
    shard_bytes = sum(f.stat().st_size for f in files)
    image_bytes = 0
    for f in files:
        t = pq.read_table(f, columns=[sf.IMAGE_SHARD, sf.IMAGE_ROW])
        root = sf.images_dir(f)
        for shard in set(t.column(sf.IMAGE_SHARD).to_pylist()) - {None}:
            rows = t.filter(pc.equal(t.column(sf.IMAGE_SHARD), shard)).column(sf.IMAGE_ROW).to_numpy()
            images = sf.read_rows(root / f"{shard}.parquet", [sf.IMAGE], rows).column(sf.IMAGE)
            image_bytes += int(pc.sum(pc.binary_length(images)).as_py() or 0)
    return shard_bytes, image_bytes


def run_preparation(n: int, work: Path) -> dict[str, Any]:
    """The whole pre-training preparation on an `n`-image corpus; per-step figures."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines import graph, raystart, synthetic
    from pipelines.config import load_config

    root = work / f"rows-{n}"
    t0 = time.perf_counter()
    rows = make_corpus(root / "corpus", n)
    made = time.perf_counter() - t0
    out = root / "out"
    cfg_path = root / "scale.yaml"
    with synthetic.serve(root / "corpus") as server:
        urls = root / "urls.parquet"
        pq.write_table(pa.table({"url": [f"{server.base_url}/{r['path']}" for r in rows],
                                 "caption": [r["caption"] for r in rows]}), urls)  # fmt: skip
        cfg_path.write_text(f"""
output_dir: {out}
input: {{urls: [{urls}]}}
ray: {{num_cpus: 4}}
download: {{rows_per_shard: 1000, threads_per_shard: 16, timeout_s: 10, allow_private: ["127.0.0.1"], cpus_per_shard: 1}}
filter: {{preset: datacomp-basic, min_short_side: 100, near_dup_max_distance: 3, num_actors: 2, cpus_per_actor: 1}}
captions: {{num_actors: 2, cpus_per_actor: 0.5}}
teacher: {{model_config: {CONFIGS / "tiny-vit.json"}, random_init_seed: 0, batch_size: 32, num_actors: 2,
          cpus_per_actor: 1}}
shards: {{rows_per_file: 1024}}
""")
        cfg = load_config(cfg_path)
        raystart.init_ray(cfg.ray.address, cfg.ray.num_cpus)
        steps = {}
        for step in graph.chain("pretrain"):
            with RssSampler() as rss:
                t = time.perf_counter()
                manifest = graph.runner(step)(cfg)
                seconds = time.perf_counter() - t
            counts = manifest["counts"]
            steps[step.name] = {"rows_in": counts["rows_in"], "kept": counts["kept"], "seconds": round(seconds, 2),
                                "rows_per_s": round(counts["rows_in"] / seconds, 1),
                                "worker_peak_rss_mb": round(rss.peak / 2**20), "bytes": dir_bytes(out / step.name)}  # fmt: skip
    written = sum(s["bytes"] for s in steps.values())
    shard_bytes, image_bytes = training_set_bytes(out)
    return {"rows": n, "corpus_seconds": round(made, 1), "steps": steps, "bytes_written": written,
            "training_shard_bytes": shard_bytes, "referenced_image_bytes": image_bytes,
            "bytes_ratio": round(written / (shard_bytes + image_bytes), 3)}  # fmt: skip


# ----------------------------------------------------------------------------- near duplicates alone


def hashes_run(n: int) -> dict[str, Any]:
    """`near_duplicates` on n random hashes with a hot bucket (runs in this process)."""
    import resource

    from pipelines import dedup

    rng = np.random.default_rng(0)
    hashes = rng.integers(0, 2**63, size=n, dtype=np.uint64) * np.uint64(2) + rng.integers(
        0, 2, n, dtype=np.uint64
    )
    hot = rng.choice(n, int(n * HOT_FRACTION), replace=False)
    hashes[hot] = (hashes[hot] & np.uint64(0x0000FFFFFFFFFFFF)) | np.uint64(0xABCD << 48)
    near = rng.choice(n, n // 50, replace=False)  # 2% planted near copies of another row (1-3 bits off)
    flips = np.uint64(1) << rng.integers(0, 64, near.size).astype(np.uint64)
    hashes[near] = hashes[rng.integers(0, n, near.size)] ^ flips
    t0 = time.perf_counter()
    rows, _, _ = dedup.near_duplicates(hashes, 3)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"hashes": n, "hot_bucket_rows": int(hot.size), "near_duplicates": int(rows.size),
            "seconds": round(seconds, 1), "peak_rss_gb": round(peak / 2**30, 2)}  # fmt: skip


def hashes_in_subprocess(n: int) -> dict[str, Any]:
    """`hashes_run` in a fresh process, so its peak memory is its own."""
    out = subprocess.run([sys.executable, "-m", "bench.scale", "--hashes-child", str(n)], capture_output=True,
                         text=True, check=True)  # fmt: skip
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- main


def linearity(small: dict[str, Any], large: dict[str, Any]) -> dict[str, float]:
    """Cost per row at the large corpus over cost per row at the small one, per step."""
    return {name: round((s["seconds"] / s["rows_in"]) / (small["steps"][name]["seconds"] / small["steps"][name]["rows_in"]), 2)
            for name, s in large["steps"].items()}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, nargs="*", default=[1000, 10000])
    parser.add_argument("--hashes", type=float, nargs="*", default=[1e6, 13e6])
    parser.add_argument("--json", default=None, help="write the figures to this file")
    parser.add_argument("--hashes-child", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.hashes_child is not None:
        print(json.dumps(hashes_run(args.hashes_child)))
        return 0
    result: dict[str, Any] = {"preparation": [], "near_duplicates": []}
    ok = True
    with tempfile.TemporaryDirectory(prefix="breen-scale-") as tmp:
        for n in args.rows:
            r = run_preparation(n, Path(tmp))
            result["preparation"].append(r)
            print(f"\n== preparation, {n:,} rows (corpus made in {r['corpus_seconds']} s) ==")
            print(
                f"{'step':<10} {'rows in':>8} {'kept':>8} {'seconds':>8} {'rows/s':>8} {'worker RSS MB':>14} {'MB written':>11}"
            )
            for name, s in r["steps"].items():
                print(f"{name:<10} {s['rows_in']:>8,} {s['kept']:>8,} {s['seconds']:>8.1f} {s['rows_per_s']:>8.1f} "
                      f"{s['worker_peak_rss_mb']:>14,} {s['bytes'] / 1e6:>11.2f}")  # fmt: skip
            good = r["bytes_ratio"] <= 1.5
            ok &= good
            print(f"bytes written {r['bytes_written'] / 1e6:.2f} MB / training set {(r['training_shard_bytes'] + r['referenced_image_bytes']) / 1e6:.2f} MB "
                  f"(shards {r['training_shard_bytes'] / 1e6:.2f} + referenced images {r['referenced_image_bytes'] / 1e6:.2f}) "
                  f"= {r['bytes_ratio']:.2f}x  (goal <= 1.5x) {'ok' if good else 'MISSED'}")  # fmt: skip
    if len(result["preparation"]) >= 2:
        small, large = result["preparation"][0], result["preparation"][-1]
        lin = linearity(small, large)
        result["linearity"] = {"small": small["rows"], "large": large["rows"], "cost_per_row_ratio": lin}
        print(f"\n== cost per row at {large['rows']:,} rows / at {small['rows']:,} rows (goal <= 1.2) ==")
        for name, x in lin.items():
            ok &= x <= 1.2
            print(f"{name:<10} {x:>6.2f}  {'ok' if x <= 1.2 else 'MISSED'}")
    for n in args.hashes:
        r = hashes_in_subprocess(int(n))
        result["near_duplicates"].append(r)
        good = r["seconds"] <= 900 and r["peak_rss_gb"] <= 8
        ok &= good if r["hashes"] >= 13_000_000 else True
        print(f"\nnear duplicates alone: {r['hashes']:,} hashes (hot bucket {r['hot_bucket_rows']:,} rows): "
              f"{r['seconds']} s, peak {r['peak_rss_gb']} GB, {r['near_duplicates']:,} near duplicates")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
