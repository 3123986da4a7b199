"""Per-core CPU rates the capacity planner needs that no side-by-side benchmark gives: the filter's per-row
checks and the real teacher (CLIP ViT-L/14-336, fp32) on one CPU core.

- filter: `pipelines.filter.RowRules` (header check, decode, perceptual hash, caption cleaning, language
  id) over the demo's downloaded shards in this process, one core; the language detectors are built before
  timing (once per actor in the step). The global dedup and the split are not included (a few ms/shard).
- teacher: ViT-L-14-336 with random weights (same FLOPs as the released weights), `torch` on one thread,
  decode + letterbox + forward + pooling of `--vit-images` images; model construction not timed.

Run:  python -m bench.rates [--download-dir runs/demo/download] [--vit-images 2] [--no-vit-l] [--json F]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def filter_rate(download_dir: Path, config: Path) -> dict:
    import pyarrow.parquet as pq

    from pipelines.config import load_config
    from pipelines.filter import RowRules, index_table

    files = sorted(download_dir.glob("part-*.parquet"))
    if not files:
        raise SystemExit(f"bench.rates: no part-*.parquet in {download_dir} (run `make demo` first)")
    cfg = load_config(config)
    rules = RowRules(cfg.filter, cfg.captions)
    rules.language("A warm-up caption in English to build the detector.")
    rules.language("Une légende en français.")  # builds the accurate detector too
    tables = [pq.read_table(f) for f in files]
    t0 = time.perf_counter()
    rows = sum(index_table(t, f.stem, rules).num_rows for t, f in zip(tables, files, strict=True))
    seconds = time.perf_counter() - t0
    return {"rows": rows, "seconds": seconds, "filter_rows_per_s_per_core": rows / seconds}


def vit_l_rate(images: int) -> dict:
    import numpy as np
    import torch

    from bench.teacher import make_images
    from pipelines.config import TeacherConfig
    from pipelines.teacher import build_teacher, decode, features

    torch.set_num_threads(1)
    model, _, _ = build_teacher(TeacherConfig(model="ViT-L-14-336", random_init_seed=0))
    data = make_images(images)
    features(model, decode(data[0])[None], "cpu")  # warm-up (allocator, kernels)
    t0 = time.perf_counter()
    features(model, np.stack([decode(b) for b in data]), "cpu")
    seconds = time.perf_counter() - t0
    return {"vit_l_images": images, "vit_l_seconds": seconds, "teacher_images_per_s_per_core_cpu": images / seconds}


def run(args) -> dict:
    out = filter_rate(Path(args.download_dir), Path(args.config))
    if not args.no_vit_l:
        out |= vit_l_rate(args.vit_images)
    return out


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--download-dir", default="runs/demo/download")
    ap.add_argument("--config", default="pipelines/configs/demo.yaml", help="filter settings come from here")
    ap.add_argument("--vit-images", type=int, default=2)
    ap.add_argument("--no-vit-l", action="store_true", help="skip the ViT-L-14-336 CPU measurement")
    ap.add_argument("--json", default=None)
    return ap


def main() -> None:
    args = parser().parse_args()
    res = run(args)
    print(f"filter: {res['rows']} rows in {res['seconds']:.2f} s = {res['filter_rows_per_s_per_core']:.1f} rows/s "
          "on one core")  # fmt: skip
    if "vit_l_seconds" in res:
        print(f"teacher ViT-L-14-336 fp32: {res['vit_l_images']} images in {res['vit_l_seconds']:.1f} s = "
              f"{res['teacher_images_per_s_per_core_cpu']:.3f} images/s on one core")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
