"""Teacher step: CLIP ViT-L/14-336 targets for every kept image, computed once and cached.

Reads:  `<output_dir>/captions/` (or any dataset dir with `key` and `image` bytes; rows with a
        null image, e.g. text-only SFT records, pass through with null features).
Writes: `<output_dir>/teacher/part-NNNNN.parquet`: the input rows plus `fine` (64 x D) and `coarse`
        (36 x D) float16 tensors as Arrow `fixed_shape_tensor` columns (readable by plain pyarrow:
        `col.combine_chunks().to_numpy_ndarray()`); rows whose image cannot be decoded go to
        `rejected/` with reason decode_error. Parquet metadata and `manifest.json` record the
        teacher name, the weights sha256 and the preprocessing version.

Targets (see `breen/teacher.py`): image letterboxed to 336x336 on the CLIP-mean colour, output of
the last transformer block before the final LayerNorm with CLS dropped ([D, 24, 24]), average
pooled to 8x8 (`fine`) and 6x6 (`coarse`). A fixed pool of actors (one per GPU when the cluster
has GPUs) runs in bf16 autocast on GPU and fp32 on CPU; batches are fixed per shard so reruns
give bit-identical features on the same hardware. On GPU each actor decodes and letterboxes in
`teacher.decode_threads` threads (default: its CPUs) `teacher.prefetch_batches` batches ahead of the
model and copies each batch through pinned memory, so the GPU does not wait for JPEG decoding; give
the actors CPUs (`teacher.cpus_per_actor`, e.g. 12 per H100) to keep up with about 1,150 images/s.

The model comes from exactly one of: `teacher.weights` (a local open_clip checkpoint file,
loaded with safetensors or `torch.load(weights_only=True)`), `teacher.pretrained` (an open_clip
pretrained tag already in the local cache) or `teacher.random_init_seed` (tests and the demo).
`teacher.model_config` registers a custom open_clip JSON config (e.g. a tiny ViT); the model
name is then the file's stem.

Run:  python -m pipelines.teacher --config pipelines/configs/demo.yaml
      ray job submit --working-dir . -- python -m pipelines.teacher --config my.yaml
"""

from __future__ import annotations

import hashlib
import io
import os
import sys
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from breen.teacher import PREPROCESS_VERSION, last_block_grid, letterbox, pool_targets
from pipelines import common
from pipelines.config import ConfigError, PrepareConfig, TeacherConfig, from_dict, to_dict

STEP = "teacher"


# ----------------------------------------------------------------------------- Arrow tensors


def tensor_array(values: np.ndarray, valid: np.ndarray | None = None) -> pa.Array:
    """[N, R, D] array -> Arrow `fixed_shape_tensor` (float16) with optional nulls."""
    _, r, d = values.shape
    flat = pa.array(values.astype(np.float16, copy=False).reshape(-1))
    mask = None if valid is None else pa.array(~valid, pa.bool_())
    storage = pa.FixedSizeListArray.from_arrays(flat, r * d, mask=mask)
    return pa.ExtensionArray.from_storage(pa.fixed_shape_tensor(pa.float16(), [r, d]), storage)


def tensor_numpy(column: pa.ChunkedArray | pa.Array) -> np.ndarray:
    """Arrow `fixed_shape_tensor` column -> numpy [N, R, D] (null rows come back as NaN)."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if arr.null_count:
        shape = arr.type.shape
        storage = arr.storage.fill_null(pa.scalar([np.nan] * int(np.prod(shape)), arr.storage.type))
        return np.stack(storage.to_numpy(zero_copy_only=False)).reshape(-1, *shape).astype(np.float16)
    return arr.to_numpy_ndarray()


# ----------------------------------------------------------------------------- the teacher model


def teacher_identity(cfg: TeacherConfig) -> tuple[str, str]:
    """(model name, weights id) without building the model."""
    name = Path(cfg.model_config).stem if cfg.model_config else cfg.model
    if cfg.weights:
        return name, "sha256:" + common.sha256_file(cfg.weights)
    if cfg.pretrained:
        return name, f"open_clip-pretrained:{cfg.pretrained}"
    return name, f"random-init-seed:{cfg.random_init_seed}"


def build_teacher(cfg: TeacherConfig, device: str = "cpu", identity: tuple[str, str] | None = None):
    """Build the open_clip model (eval, frozen) and return (model, name, weights id).

    `identity` is `teacher_identity(cfg)` when the caller already has it (it hashes the weights
    file: the driver does that once instead of every actor).
    """
    import open_clip
    import torch

    if cfg.model_config:
        open_clip.add_model_config(cfg.model_config)
    name, weights_id = identity or teacher_identity(cfg)
    if cfg.random_init_seed is not None:
        torch.manual_seed(cfg.random_init_seed)
        model = open_clip.create_model(name, pretrained=None, device="cpu")
        h = hashlib.sha256()
        for k, v in sorted(model.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().numpy().tobytes())
        weights_id = f"{weights_id}:sha256:{h.hexdigest()}"
    else:  # safetensors, or torch.load(weights_only=True): never unpickles code
        model = open_clip.create_model(
            name, pretrained=cfg.weights or cfg.pretrained, device="cpu", weights_only=True
        )
    model = model.to(device).eval().requires_grad_(False)
    return model, name, weights_id


def check_weights(path: str) -> None:
    """Fail fast, naming the file, when weights cannot be loaded without unpickling code.

    Reads the safetensors header, or runs `torch.load(weights_only=True)` (memory-mapped for zip
    checkpoints, so a 1.7 GB file costs little), before any actor starts.
    """
    import zipfile

    try:
        if path.endswith(".safetensors"):
            from safetensors import safe_open

            with safe_open(path, "pt") as f:
                f.keys()
        else:
            import torch

            torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:
        raise ConfigError(f"teacher.weights: {path}: cannot be loaded as safetensors or with "
                          f"torch.load(weights_only=True): {common.error_detail(e)}") from None  # fmt: skip


def resolve_device(cfg: TeacherConfig) -> str:
    import torch

    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.device


def decode(image: bytes) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(image)) as im:
        return letterbox(im)


def features(model, pixels: np.ndarray, device: str) -> tuple[np.ndarray, np.ndarray]:
    """[B, 3, 336, 336] float32 -> (fine [B, 64, D], coarse [B, 36, D]) float16 numpy.

    On CUDA the batch goes through pinned memory with an asynchronous copy, and the ViT runs under bf16
    autocast (its attention is PyTorch's fused SDPA: open_clip calls it with need_weights=False).
    """
    import torch

    x = torch.from_numpy(pixels)
    x = x.pin_memory().to(device, non_blocking=True) if device == "cuda" else x.to(device)
    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=device == "cuda"):
        grid = last_block_grid(model.visual, x)  # [B, D, 24, 24]
    fine, coarse = pool_targets(grid)
    return fine.half().cpu().numpy(), coarse.half().cpu().numpy()


class TeacherWorker(common.ShardWorker):
    """One actor = one model replica; processes whole shards in fixed-size batches."""

    def __init__(self, in_dir: str, out_dir: str, cfg: dict, identity: tuple[str, str]) -> None:
        super().__init__(in_dir, out_dir)
        self.cfg: TeacherConfig = from_dict(TeacherConfig, cfg, "teacher")
        self.device = resolve_device(self.cfg)
        self.model, self.name, self.weights_id = build_teacher(self.cfg, self.device, tuple(identity))
        self.dim = self.model.visual.transformer.width
        threads = self.cfg.decode_threads
        self.decode_threads = threads if threads >= 0 else (max(1, round(self.cfg.cpus_per_actor))
                                                            if self.device == "cuda" else 0)  # fmt: skip

    def process(self, name: str) -> dict[str, Any]:
        t0 = time.monotonic()
        table = pq.read_table(self.in_dir / f"{name}.parquet")
        kept, rejected = teacher_table(
            table, self.model, self.dim, self.cfg.batch_size, self.device, self.decode_threads,
            self.cfg.prefetch_batches,
        )  # fmt: skip
        meta = {"breen.teacher": self.name, "breen.teacher_weights": self.weights_id,
                "breen.preprocess": PREPROCESS_VERSION}  # fmt: skip
        seconds = time.monotonic() - t0
        return common.write_shard(self.out_dir, name, kept, rejected, table.num_rows,
                                  {"seconds": round(seconds, 3), "device": self.device}, metadata=meta)  # fmt: skip


def _decode_or_error(image: bytes) -> np.ndarray | str:
    try:
        return decode(image)
    except Exception as e:
        return common.error_detail(e)


def decoded_batches(
    images: list, todo: list[int], batch_size: int, threads: int = 0, prefetch: int = 2
) -> Iterator[tuple[list[int], list[np.ndarray], dict[int, str]]]:
    """(row indices, letterboxed pixels, {row: decode error}) per batch of `todo`, in order.

    With `threads` > 0 a thread pool decodes the images of the next `prefetch` batches while the caller
    runs the model on the current one; the batches and their contents do not depend on `threads`.
    """
    batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]

    def gather(rows: list[int], results) -> tuple[list[int], list[np.ndarray], dict[int, str]]:
        idx, pix, errors = [], [], {}
        for i, r in zip(rows, results, strict=True):
            if isinstance(r, str):
                errors[i] = r
            else:
                idx.append(i)
                pix.append(r)
        return idx, pix, errors

    if threads <= 0:
        for rows in batches:
            yield gather(rows, [_decode_or_error(images[i]) for i in rows])
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="teacher-decode") as pool:
        pending: deque = deque()
        for n, rows in enumerate(batches, start=1):
            pending.append((rows, [pool.submit(_decode_or_error, images[i]) for i in rows]))
            while pending and (len(pending) > prefetch or n == len(batches)):  # drain after the last
                rows0, futures = pending.popleft()
                yield gather(rows0, [f.result() for f in futures])


def teacher_table(
    table: pa.Table, model, dim: int, batch_size: int, device: str, decode_threads: int = 0,
    prefetch: int = 2,
) -> tuple[pa.Table, pa.Table]:  # fmt: skip
    """Append `fine`/`coarse` to every row with a decodable image (null image -> null features)."""
    images = table.column("image").to_pylist()
    n = len(images)
    fine = np.zeros((n, 64, dim), np.float16)
    coarse = np.zeros((n, 36, dim), np.float16)
    has_image = np.array([img is not None for img in images], bool)
    errors: dict[int, str] = {}
    todo = [i for i in range(n) if has_image[i]]
    for idx, pix, errs in decoded_batches(images, todo, batch_size, decode_threads, prefetch):
        errors.update(errs)
        if idx:
            f, c = features(model, np.stack(pix), device)
            fine[idx], coarse[idx] = f, c
    bad = np.zeros(n, bool)
    bad[list(errors)] = True
    ok = pa.array(~bad, pa.bool_())
    out = table.append_column("fine", tensor_array(fine, has_image)).append_column(
        "coarse", tensor_array(coarse, has_image)
    )
    kept = out.filter(ok)
    rejected = common.with_reason(
        table.filter(pc.invert(ok)).drop_columns(["image"]),
        "decode_error",
        [errors[i] for i in sorted(errors)],
    )
    return kept, rejected


# ----------------------------------------------------------------------------- the step


def run_teacher(cfg: PrepareConfig, in_dir: Path, out: Path, produced_by: str) -> dict[str, Any]:
    """Run the teacher over one dataset dir (captions for pre-training, sft_import for SFT)."""
    import ray

    names = common.require_dataset(in_dir, produced_by)
    todo = [n for n in names if not common.done_marker(out, n).exists()]
    t = cfg.teacher
    if todo and t.weights:
        check_weights(t.weights)  # before hashing it and before any actor starts
    name, weights_id = teacher_identity(t)
    if todo:
        common.init_ray(cfg.ray.address, cfg.ray.num_cpus)
        gpus = ray.cluster_resources().get("GPU", 0) if t.device != "cpu" else 0
        num_gpus = t.num_gpus_per_actor if gpus else 0.0
        print(f"[{STEP}] {len(todo)} of {len(names)} shards to do, {t.num_actors} actor(s), "
              f"{'GPU' if num_gpus else 'CPU'}", flush=True)  # fmt: skip
        kwargs = {"in_dir": str(in_dir), "out_dir": str(out), "cfg": to_dict(t), "identity": (name, weights_id)}
        common.run_shards(STEP, todo, TeacherWorker, kwargs,
                          num_actors=t.num_actors, num_cpus=t.cpus_per_actor, num_gpus=num_gpus)  # fmt: skip
    if t.random_init_seed is not None and names:
        weights_id = pq.read_schema(out / f"{names[0]}.parquet").metadata[b"breen.teacher_weights"].decode()
    manifest = common.finish_step(
        out, STEP, [common.dataset_input(in_dir)], {"teacher": to_dict(t)},
        extra={"teacher": {"name": name, "weights": weights_id, "preprocess": PREPROCESS_VERSION}},
    )  # fmt: skip
    return manifest


def run(cfg: PrepareConfig) -> dict[str, Any]:
    return run_teacher(cfg, cfg.out / "captions", cfg.out / STEP, "captions")


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    return common.step_main(__doc__, run, argv)


if __name__ == "__main__":
    sys.exit(main())
