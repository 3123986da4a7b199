"""Teacher throughput: our Ray Data teacher step vs a bare open_clip inference loop, side by side.

Both compute the same targets (CLIP-mean letterbox to 336, last-block patch grid, 8x8/6x6 pooling)
over the same images in the same process run, with the same total CPU threads:
  baseline  a plain PyTorch loop: decode + letterbox + forward in batches, `torch` using N threads;
  ours      `pipelines.teacher` on a local Ray: Parquet in -> actor pool (N actors x 1 thread) ->
            Parquet out with fixed-shape float16 tensors, markers, stats.
Prints images/s for both (best of `--repeats` alternating runs) and the ratio ours/baseline
(goal >= 0.95).

The default model is a mid-size ViT with the ViT-L/14-336 patch grid (so a CPU run takes about a
minute); `--model ViT-L-14-336` measures the real teacher (about 5 s/image/core on CPU).

Run:  python -m bench.teacher [--images 96] [--width 384] [--layers 6] [--threads 2]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")


def make_images(n: int, seed: int = 0) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        w, h = int(rng.integers(300, 672)), int(rng.integers(300, 672))
        small = rng.integers(0, 255, (12, 12, 3), np.uint8)
        buf = io.BytesIO()
        Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def baseline(images: list[bytes], cfg, batch_size: int, threads: int) -> float:
    """Bare loop: images/s."""
    import torch

    from pipelines.teacher import build_teacher, decode, features

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model, _, _ = build_teacher(cfg)
    for start in range(0, len(images), batch_size):
        pix = np.stack([decode(b) for b in images[start : start + batch_size]])
        features(model, pix, "cpu")
    return len(images) / (time.perf_counter() - t0)


def ours(images: list[bytes], cfg, batch_size: int, actors: int, work: Path) -> float:
    """The teacher step on local Ray: images/s (Ray already started)."""
    import pyarrow as pa

    from pipelines import common
    from pipelines.config import PrepareConfig

    src = work / "captions"
    per = -(-len(images) // (actors * 2))  # 2 shards per actor
    for s, start in enumerate(range(0, len(images), per)):
        chunk = images[start : start + per]
        table = pa.table({"key": [f"{start + i:06d}" for i in range(len(chunk))], "image": chunk})
        empty = common.with_reason(table.select(["key"]).slice(0, 0), [], [])
        common.write_shard(src, common.shard_name(s), table, empty, table.num_rows)
    pcfg = PrepareConfig(output_dir=str(work))
    pcfg.teacher = cfg
    pcfg.teacher.batch_size = batch_size
    pcfg.teacher.num_actors = actors
    pcfg.teacher.cpus_per_actor = 1.0
    from pipelines.teacher import run

    t0 = time.perf_counter()
    run(pcfg)
    return len(images) / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=96)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="total CPU threads for each side")
    ap.add_argument("--model", default=None, help="open_clip model name (default: a mid-size ViT config)")
    ap.add_argument("--width", type=int, default=384)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--repeats", type=int, default=2, help="alternating runs per side; the best counts")
    ap.add_argument("--json", default=None, help="also write the result as JSON here")
    args = ap.parse_args()

    from pipelines.common import init_ray
    from pipelines.config import TeacherConfig

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if args.model:
            cfg = TeacherConfig(model=args.model, random_init_seed=0)
        else:
            path = tmp / "bench-vit.json"
            path.write_text(json.dumps({
                "embed_dim": 256,
                "vision_cfg": {"image_size": 336, "layers": args.layers, "width": args.width, "head_width": 64,
                               "patch_size": 14},
                "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
            }))  # fmt: skip
            cfg = TeacherConfig(model_config=str(path), random_init_seed=0)
        images = make_images(args.images)
        init_ray(None, num_cpus=args.threads + 1)
        import dataclasses

        bases, mines = [], []
        for r in range(args.repeats):  # alternate so both sides see the same machine load
            bases.append(baseline(images, dataclasses.replace(cfg), args.batch_size, args.threads))
            mines.append(ours(images, dataclasses.replace(cfg), args.batch_size, args.threads, tmp / f"run{r}"))
    base, mine = max(bases), max(mines)
    ratio = mine / base
    print(f"\nruns (images/s): baseline {[round(b, 2) for b in bases]}, ours {[round(m, 2) for m in mines]}")
    name = args.model or f"ViT(width={args.width}, layers={args.layers}, 336px/14)"
    print(f"teacher {name}, {args.images} images, {args.threads} CPU threads each side")
    print(f"  baseline (bare open_clip loop): {base:8.2f} images/s")
    print(f"  ours (Ray Data teacher step):   {mine:8.2f} images/s")
    print(f"  ratio ours/baseline: {ratio:.3f}  (goal >= 0.95)")
    if args.json:
        Path(args.json).write_text(json.dumps({"baseline": base, "ours": mine, "ratio": ratio}))


if __name__ == "__main__":
    main()
