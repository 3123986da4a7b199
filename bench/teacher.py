"""Teacher throughput: our Ray Data teacher step vs a bare open_clip inference loop, side by side.

Both compute the same targets (letterbox to 336, last-block patch grid, 8x8/6x6 pooling)
over the same images in the same run, with the same total CPU threads, and both are timed from a cold
Python process to the last feature:
  baseline  a fresh `python` process running a plain PyTorch loop (import torch + open_clip, build the
            model, decode + letterbox + forward in batches), `torch` using N threads; wall time of the
            whole process;
  ours      `pipelines.teacher` on a running local Ray (as a step submitted to a cluster): Parquet in ->
            N fresh actors x 1 thread (each imports and builds its model) -> Parquet out with
            fixed-shape float16 tensors, markers, stats and manifest.
Prints images/s for both (best of `--repeats` alternating runs) and the ratio ours/baseline
(goal >= 0.95).

The default model is a mid-size ViT with the ViT-L/14-336 patch grid (so a CPU run takes a few
minutes); `--model ViT-L-14-336` measures the real teacher (about 5 s/image/core on CPU).
`--device cuda` runs both sides on the GPU (bf16 autocast, pinned memory, decode threads ahead of the
model in ours) with one actor.

Run:  python -m bench.teacher [--images 192] [--width 384] [--layers 6] [--threads 2] [--device cpu]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import subprocess
import sys
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


def baseline_child(images_file: str, cfg_file: str, batch_size: int, threads: int, device: str) -> None:
    """The bare loop, run as `python -m bench.teacher --child ...` (a fresh process)."""
    import pyarrow.parquet as pq
    import torch

    from pipelines.config import TeacherConfig, from_dict
    from pipelines.teacher import build_teacher, decode, features

    torch.set_num_threads(threads)
    images = pq.read_table(images_file).column("image").to_pylist()
    model, _, _ = build_teacher(
        from_dict(TeacherConfig, json.loads(Path(cfg_file).read_text()), "teacher"), device
    )
    for start in range(0, len(images), batch_size):
        pix = np.stack([decode(b) for b in images[start : start + batch_size]])
        features(model, pix, device)


def baseline(
    images: list[bytes], cfg, batch_size: int, threads: int, work: Path, device: str = "cpu"
) -> float:
    """Bare loop in a fresh process: images/s over the process's wall time."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pipelines.config import to_dict

    work.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"image": images}), work / "images.parquet")
    (work / "teacher.json").write_text(json.dumps(to_dict(cfg)))
    cmd = [sys.executable, "-m", "bench.teacher", "--child", str(work / "images.parquet"), str(work / "teacher.json"),
           "--batch-size", str(batch_size), "--threads", str(threads), "--device", device]  # fmt: skip
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    return len(images) / (time.perf_counter() - t0)


def ours(
    images: list[bytes], cfg, batch_size: int, actors: int, work: Path, device: str = "cpu", cpus: int = 1
) -> float:
    """The teacher step on local Ray: images/s (Ray already started)."""
    from pipelines.config import PrepareConfig
    from pipelines.synthetic import write_teacher_inputs

    per = -(-len(images) // (actors * 2))  # 2 shards per actor
    keys = [f"{i:06d}" for i in range(len(images))]
    write_teacher_inputs(work, [[(k, "a picture", img) for k, img in zip(keys[a : a + per], images[a : a + per],
                                                                          strict=True)]
                                for a in range(0, len(images), per)])  # fmt: skip
    pcfg = PrepareConfig(output_dir=str(work))
    pcfg.teacher = cfg
    pcfg.teacher.batch_size = batch_size
    pcfg.teacher.num_actors = actors
    # CPU: N actors x 1 thread; GPU: one actor with every CPU (its decode threads feed the GPU)
    pcfg.teacher.cpus_per_actor = 1.0 if device == "cpu" else float(cpus)
    pcfg.teacher.device = device
    pcfg.shards.rows_per_file = per  # one training shard per input shard, as before
    from pipelines.teacher import run

    t0 = time.perf_counter()
    run(pcfg)
    return len(images) / (time.perf_counter() - t0)


def teacher_config(args, tmp: Path):
    from pipelines.config import TeacherConfig

    if args.model:
        return TeacherConfig(model=args.model, random_init_seed=0)
    path = tmp / "bench-vit.json"
    path.write_text(json.dumps({
        "embed_dim": 256,
        "vision_cfg": {"image_size": 336, "layers": args.layers, "width": args.width, "head_width": 64,
                       "patch_size": 14},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 1},
    }))  # fmt: skip
    return TeacherConfig(model_config=str(path), random_init_seed=0)


def run(args) -> dict:
    """Both sides, alternating; returns {"baseline", "ours", "ratio", "runs"} (images/s)."""
    import dataclasses

    from pipelines.raystart import init_ray

    gpu = args.device == "cuda"
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        cfg = teacher_config(args, tmp)
        images = make_images(args.images)
        init_ray(None, num_cpus=args.threads + 1)
        bases, mines = [], []
        for r in range(args.repeats):  # alternate so both sides see the same machine load
            bases.append(baseline(images, dataclasses.replace(cfg), args.batch_size, args.threads,
                                  tmp / f"base{r}", args.device))  # fmt: skip
            actors = 1 if gpu else args.threads
            mines.append(ours(images, dataclasses.replace(cfg), args.batch_size, actors, tmp / f"run{r}",
                              args.device, args.threads))  # fmt: skip
    base, mine = max(bases), max(mines)
    name = args.model or f"ViT(width={args.width}, layers={args.layers}, 336px/14)"
    return {"model": name, "images": args.images, "threads": args.threads, "device": args.device,
            "baseline": base, "ours": mine, "ratio": mine / base, "runs": {"baseline": bases, "ours": mines}}  # fmt: skip


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=192)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument(
        "--threads", type=int, default=os.cpu_count() or 2, help="total CPU threads for each side"
    )
    ap.add_argument("--model", default=None, help="open_clip model name (default: a mid-size ViT config)")
    ap.add_argument("--width", type=int, default=384)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--repeats", type=int, default=2, help="alternating runs per side; the best counts")
    ap.add_argument("--json", default=None, help="also write the result as JSON here")
    ap.add_argument("--child", nargs=2, metavar=("IMAGES", "CONFIG"), help=argparse.SUPPRESS)
    return ap


def main() -> None:
    args = parser().parse_args()
    if args.child:
        baseline_child(*args.child, args.batch_size, args.threads, args.device)
        return
    res = run(args)
    print(f"\nruns (images/s): baseline {[round(b, 2) for b in res['runs']['baseline']]}, "
          f"ours {[round(m, 2) for m in res['runs']['ours']]}")  # fmt: skip
    print(
        f"teacher {res['model']}, {args.images} images, {args.threads} CPU threads each side, {args.device}"
    )
    print(f"  baseline (bare open_clip loop, fresh process): {res['baseline']:8.2f} images/s")
    print(f"  ours (Ray Data teacher step):                  {res['ours']:8.2f} images/s")
    print(f"  ratio ours/baseline: {res['ratio']:.3f}  (goal >= 0.95)")
    if args.json:
        Path(args.json).write_text(json.dumps(res))


if __name__ == "__main__":
    main()
