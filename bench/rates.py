"""Per-core CPU rates the capacity planner needs that no side-by-side benchmark gives: the filter's per-row
checks, the captions step's cleaning and the real teacher (CLIP ViT-L/14-336, fp32) on one CPU core.

- filter: `pipelines.filter.RowRules` (header check, the hash's decode, perceptual hash, language id,
  caption rules) over the demo's filter input (cleaned captions and their stored images) in this process,
  one core, side by side with a bare loop that fully decodes the same images with PIL (goal: ratio >=
  0.7), and where the filter's time goes; the language detector is loaded before timing (once per actor in
  the step). The global dedup and the split are not included (a few ms/shard).
- teacher: ViT-L-14-336 with random weights (same FLOPs as the released weights), `torch` on one thread,
  decode + letterbox + forward + pooling of `--vit-images` images; model construction not timed.

Run:  python -m bench.rates [--out-dir runs/demo] [--vit-images 2] [--no-vit-l] [--json F]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path


def _bare_decode(images: list[bytes]) -> None:
    """The baseline: decode every stored image with the same library, nothing else."""
    import io

    from PIL import Image

    for data in images:
        with Image.open(io.BytesIO(data)) as im:
            im.load()


def filter_profile(rules, images: list[bytes], captions: list[str]) -> dict[str, float]:
    """Milliseconds per row of each part of `RowRules.check`: header, the hash's decode (a reduced grey
    decode for JPEGs, `decode_for_hash`), the hash, language id, and the rest (size and caption rules);
    plus, for reference, a full RGB decode and the hash of it (what the filter did before)."""
    from pipelines.filter import decode_for_hash, phash
    from pipelines.guard import open_image

    parts = {"open + header": 0.0, "decode for hash": 0.0, "phash": 0.0, "language": 0.0, "rules": 0.0,
             "(full RGB decode + phash)": 0.0}  # fmt: skip
    for data, caption in zip(images, captions, strict=True):
        t0 = time.perf_counter()
        rules.check(data, caption)
        total = time.perf_counter() - t0
        t0 = time.perf_counter()
        im = open_image(data, rules.cfg.max_pixels)
        t1 = time.perf_counter()
        small = decode_for_hash(im)
        t2 = time.perf_counter()
        phash(small)
        t3 = time.perf_counter()
        if caption:
            rules.language(caption)
        t4 = time.perf_counter()
        im.close()
        with open_image(data, rules.cfg.max_pixels) as full:
            t5 = time.perf_counter()
            full.load()
            phash(full.convert("RGB"))
            parts["(full RGB decode + phash)"] += time.perf_counter() - t5
        parts["open + header"] += t1 - t0
        parts["decode for hash"] += t2 - t1
        parts["phash"] += t3 - t2
        parts["language"] += t4 - t3  # every caption here; check() skips it for rows rejected before
        parts["rules"] += max(0.0, total - (t4 - t0))  # the rest of check(): size, aspect and word rules
    return {k: round(1000 * v / len(images), 3) for k, v in parts.items()}


def filter_rate(out_dir: Path, config: Path, repeats: int = 9) -> dict:
    """The filter's per-row checks (`RowRules.check`, one core, this process) side by side with a bare decode
    loop over the same stored images; the best of `repeats` alternating runs of each (the demo corpus is
    0.5 s of work: fewer runs leave the ratio to the noise of a shared machine, 0.83-1.09 over 3 runs)."""
    import pyarrow.parquet as pq

    from breen.shard_format import read_by_key
    from pipelines.config import load_config
    from pipelines.filter import RowRules

    files = sorted((out_dir / "captions").glob("part-*.parquet"))
    if not files:
        raise SystemExit(f"bench.rates: no captions/part-*.parquet in {out_dir} (run `make demo` first)")
    cfg = load_config(config)
    rules = RowRules(cfg.filter)
    rules.language("A warm-up caption in English to build the detector.")
    images, captions = [], []
    for f in files:  # the filter's input: the cleaned captions and, for them, the stored images
        t = pq.read_table(f, columns=["key", "caption"])
        images += (
            read_by_key(out_dir / "download" / f.name, t.column("key"), ["image"])[0]
            .column("image")
            .to_pylist()
        )
        captions += t.column("caption").to_pylist()
    ours, bare = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        _bare_decode(images)
        bare.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for data, caption in zip(images, captions, strict=True):
            rules.check(data, caption)
        ours.append(time.perf_counter() - t0)
    n = len(images)
    return {"rows": n, "seconds": min(ours), "filter_rows_per_s_per_core": n / min(ours),
            "bare_decode_rows_per_s": n / min(bare), "filter_vs_bare_decode": min(bare) / min(ours),
            "filter_profile_ms_per_row": filter_profile(rules, images, captions)}  # fmt: skip


def captions_rate(out_dir: Path, config: Path, repeats: int = 3) -> dict:
    """The captions step's cleaning (`clean_table`) over the demo's downloaded captions, one core, best of
    `repeats` (the corpus is small: it is cleaned 20 times per run)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.captions import clean_table
    from pipelines.config import load_config

    cfg = load_config(config)
    table = pa.concat_tables(
        [
            pq.read_table(f, columns=["key", "caption"])
            for f in sorted((out_dir / "download").glob("part-*.parquet"))
        ]
    )
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(20):
            clean_table(table, cfg.captions)
        best = min(best, time.perf_counter() - t0)
    return {"captions_rows_per_s_per_core": 20 * table.num_rows / best}


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
    return {
        "vit_l_images": images,
        "vit_l_seconds": seconds,
        "teacher_images_per_s_per_core_cpu": images / seconds,
    }


def run(args) -> dict:
    out = filter_rate(Path(args.out_dir), Path(args.config)) | captions_rate(
        Path(args.out_dir), Path(args.config)
    )
    if not args.no_vit_l:
        out |= vit_l_rate(args.vit_images)
    return out


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--out-dir", default="runs/demo", help="a prepared output directory (download/, captions/)"
    )
    ap.add_argument("--config", default="pipelines/configs/demo.yaml", help="filter settings come from here")
    ap.add_argument("--vit-images", type=int, default=2)
    ap.add_argument("--no-vit-l", action="store_true", help="skip the ViT-L-14-336 CPU measurement")
    ap.add_argument("--json", default=None)
    return ap


def main() -> None:
    args = parser().parse_args()
    res = run(args)
    print(f"filter: {res['rows']} rows in {res['seconds']:.2f} s = {res['filter_rows_per_s_per_core']:.1f} rows/s "
          f"on one core; bare decode of the same images {res['bare_decode_rows_per_s']:.1f} rows/s; ratio "
          f"{res['filter_vs_bare_decode']:.2f} (goal >= 0.7)")  # fmt: skip
    print(
        "filter profile (ms per row): "
        + ", ".join(f"{k} {v}" for k, v in res["filter_profile_ms_per_row"].items())
    )
    if "vit_l_seconds" in res:
        print(f"teacher ViT-L-14-336 fp32: {res['vit_l_images']} images in {res['vit_l_seconds']:.1f} s = "
              f"{res['teacher_images_per_s_per_core_cpu']:.3f} images/s on one core")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
