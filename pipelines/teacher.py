"""Teacher step: CLIP ViT-L/14-336 targets for every kept image, written straight into the training shards.

Reads:  the kept rows of `<output_dir>/filter/` (their keys), for those keys the `image`, `width` and
        `height` of `<output_dir>/download/` and the cleaned `caption` of `<output_dir>/captions/`
        (`pipelines.graph` declares it; `run_sft`, which `python -m pipelines.sft_import` runs after
        the import: the rows of `sft_import/`, text-only ones included).
Writes: `<output_dir>/shards/` (`sft_shards/`): training shards in the `breen.shard_format` layout,
        `part-NNNNN.parquet` with `shards.rows_per_file` rows each (the last file, and a file with a
        row the teacher could not decode, hold fewer): key, image_shard + image_row (a reference to the
        image bytes in `download/`, which are never copied), width, height, caption | conversations,
        fine (64 x D) and coarse (36 x D) float16 `fixed_shape_tensor` (null for text-only rows);
        `rejected/` with reason decode_error, or teacher_non_finite (features with a nan or inf, e.g.
        an activation beyond float16's 65504: never written as a target); Parquet metadata and `manifest.json` record the teacher
        name, the weights sha256, the preprocessing version and the image dataset.

Order is deterministic: upstream shard order, then key order within each shard. Output file j holds
the upstream rows [j*R, (j+1)*R); each file is one actor call that reads only its slices. If the
upstream row counts change, the plan changes and the old files are removed.

Targets (see `breen/teacher.py`): image letterboxed to 336x336 (`teacher.preprocess`), output of
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

Run:  python -m pipelines.teacher --config pipelines/configs/demo.yaml           (pre-training shards)
      ray job submit --working-dir . -- python -m pipelines.teacher --config my.yaml
"""

from __future__ import annotations

import hashlib
import io
import json
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

from breen import shard_format as sf
from breen.settings import ConfigError
from breen.storage import Store, fetch_file
from breen.teacher import PREPROCESS_VERSION, last_block_grid, letterbox, pool_targets
from pipelines import cli, fingerprint, graph, layout, raystart, runner
from pipelines.config import PrepareConfig, TeacherConfig, from_dict, output_fields, to_dict

TEACHER_NON_FINITE = "teacher_non_finite"  # reason: a row whose features hold a nan or inf

# ----------------------------------------------------------------------------- the teacher model


def teacher_identity(cfg: TeacherConfig, endpoint: str | None = None) -> tuple[str, str]:
    """(model name, weights id) without building the model."""
    name = Path(cfg.model_config).stem if cfg.model_config else cfg.model
    if cfg.weights:
        return name, "sha256:" + layout.sha256_file(fetch_file(cfg.weights, "teacher.weights", endpoint))
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
                          f"torch.load(weights_only=True): {layout.error_detail(e)}") from None  # fmt: skip


def resolve_device(cfg: TeacherConfig) -> str:
    import torch

    if cfg.device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return cfg.device


def decode(image: bytes, preprocess: str = PREPROCESS_VERSION) -> np.ndarray:
    from PIL import Image

    with Image.open(io.BytesIO(image)) as im:
        return letterbox(im, preprocess)


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


class TeacherWorker(runner.ShardWorker):
    """One actor = one model replica; builds whole training-shard files in fixed-size batches."""

    def __init__(self, in_dir: Store, out_dir: Store, step: str, cfg: dict, identity: tuple[str, str],
                 endpoint: str | None = None) -> None:  # fmt: skip
        super().__init__(in_dir, out_dir)
        self.cfg: TeacherConfig = from_dict(TeacherConfig, cfg, "teacher")
        if self.cfg.weights:  # on an object store: fetched once per node
            self.cfg.weights = str(fetch_file(self.cfg.weights, "teacher.weights", endpoint))
        self.sources = Sources(self.in_dir.parent, step)
        self.plan = (self.out_dir / PLAN).read_json()["files"]
        self.device = resolve_device(self.cfg)
        self.model, self.name, self.weights_id = build_teacher(self.cfg, self.device, tuple(identity))
        self.dim = self.model.visual.transformer.width
        threads = self.cfg.decode_threads
        self.decode_threads = threads if threads >= 0 else (max(1, round(self.cfg.cpus_per_actor))
                                                            if self.device == "cuda" else 0)  # fmt: skip

    def process(self, name: str) -> dict[str, Any]:
        t0 = time.monotonic()
        table = self.sources.rows(self.plan[name])
        kept, rejected = teacher_table(
            table, self.model, self.dim, self.cfg.batch_size, self.device, self.decode_threads,
            self.cfg.prefetch_batches, self.cfg.preprocess,
        )  # fmt: skip
        kept = kept.drop_columns([sf.IMAGE])
        meta = {sf.META_TEACHER: self.name, sf.META_TEACHER_WEIGHTS: self.weights_id,
                sf.META_PREPROCESS: self.cfg.preprocess, sf.META_IMAGES: self.sources.images_rel}  # fmt: skip
        seconds = time.monotonic() - t0
        return layout.write_shard(self.out_dir, name, kept, rejected, table.num_rows,
                                  {"seconds": round(seconds, 3), "device": self.device}, metadata=meta,
                                  inputs=self.sources.files(self.plan[name]))  # fmt: skip


class Sources:
    """The upstream columns of a training-shard step, gathered by key (see `pipelines.graph`)."""

    def __init__(self, root: Store, step: str) -> None:
        info = graph.step(step)
        self.rows_dir = root / info.rows_from
        self.images_dir = root / graph.image_store(step)
        self.text_dir, self.text_columns = graph.text_source(step)
        self.text_dir = root / self.text_dir
        self.images_rel = self.images_dir.relative_to_dir(root / step)

    def files(self, slices: list[tuple[str, int, int]]) -> list[Store]:
        """The upstream files `rows(slices)` reads."""
        dirs = dict.fromkeys([self.rows_dir, self.images_dir, self.text_dir])
        return [d / f"{shard}.parquet" for shard, _, _ in slices for d in dirs]

    def rows(self, slices: list[tuple[str, int, int]]) -> pa.Table:
        """key, image (bytes, to compute features; not written), image_shard, image_row, width, height and
        the text columns of the upstream rows in `slices` ((shard, offset, length), in order)."""
        parts = []
        for shard, offset, length in slices:
            keys = layout.read_table(self.rows_dir / f"{shard}.parquet", columns=[sf.KEY]).column(sf.KEY)
            keys = keys.slice(offset, length)
            path = self.images_dir / f"{shard}.parquet"
            image_columns = [sf.IMAGE, sf.WIDTH, sf.HEIGHT]
            same = self.text_dir == self.images_dir  # SFT: text and images in one dataset, read once
            images, pos = sf.read_by_key(
                path, keys, image_columns + (list(self.text_columns) if same else [])
            )
            text = (
                images
                if same
                else sf.read_by_key(self.text_dir / f"{shard}.parquet", keys, self.text_columns)[0]
            )
            has = images.column(sf.IMAGE).is_valid()
            cols = {
                sf.KEY: keys,
                sf.IMAGE: images.column(sf.IMAGE),
                sf.IMAGE_SHARD: pc.if_else(has, shard, pa.scalar(None, pa.string())),
                sf.IMAGE_ROW: pc.if_else(has, pa.array(pos, pa.int32()), pa.scalar(None, pa.int32())),
                sf.WIDTH: images.column(sf.WIDTH).cast(pa.int32()),
                sf.HEIGHT: images.column(sf.HEIGHT).cast(pa.int32()),
                **{c: text.column(c) for c in self.text_columns},
            }
            parts.append(pa.table({k: cols[k] for k in sf.COLUMNS if k in cols}))
        return layout.concat(parts)


def _decode_or_error(image: bytes, preprocess: str) -> np.ndarray | str:
    try:
        return decode(image, preprocess)
    except Exception as e:
        return layout.error_detail(e)


def decoded_batches(
    images: list, todo: list[int], batch_size: int, threads: int = 0, prefetch: int = 2,
    preprocess: str = PREPROCESS_VERSION,
) -> Iterator[tuple[list[int], list[np.ndarray], dict[int, str]]]:  # fmt: skip
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
            yield gather(rows, [_decode_or_error(images[i], preprocess) for i in rows])
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="teacher-decode") as pool:
        pending: deque = deque()
        for n, rows in enumerate(batches, start=1):
            pending.append((rows, [pool.submit(_decode_or_error, images[i], preprocess) for i in rows]))
            while pending and (len(pending) > prefetch or n == len(batches)):  # drain after the last
                rows0, futures = pending.popleft()
                yield gather(rows0, [f.result() for f in futures])


def non_finite(fine: np.ndarray, coarse: np.ndarray) -> dict[int, str]:
    """{row: detail} for the rows of a batch (fine [B, 64, D], coarse [B, 36, D]) with a nan or inf."""
    bad_f = (~np.isfinite(fine)).sum(axis=(1, 2))
    bad_c = (~np.isfinite(coarse)).sum(axis=(1, 2))
    return {int(i): f"non-finite teacher features: {bad_f[i]} of {fine[i].size} fine and {bad_c[i]} of "
                    f"{coarse[i].size} coarse values are nan or inf" for i in np.flatnonzero(bad_f + bad_c)}  # fmt: skip


def teacher_table(
    table: pa.Table, model, dim: int, batch_size: int, device: str, decode_threads: int = 0,
    prefetch: int = 2, preprocess: str = PREPROCESS_VERSION,
) -> tuple[pa.Table, pa.Table]:  # fmt: skip
    """Append `fine`/`coarse` to every row with a decodable image and finite features (null image -> null
    features); the other rows are rejected (`decode_error`, `TEACHER_NON_FINITE`)."""
    images = table.column("image").to_pylist()
    n = len(images)
    fine = np.zeros((n, 64, dim), np.float16)
    coarse = np.zeros((n, 36, dim), np.float16)
    has_image = np.array([img is not None for img in images], bool)
    problems: dict[int, tuple[str, str]] = {}  # row -> (reason, detail)
    todo = [i for i in range(n) if has_image[i]]
    for idx, pix, errs in decoded_batches(images, todo, batch_size, decode_threads, prefetch, preprocess):
        problems.update((i, ("decode_error", e)) for i, e in errs.items())
        if idx:
            f, c = features(model, np.stack(pix), device)
            fine[idx], coarse[idx] = f, c
            problems.update((idx[j], (TEACHER_NON_FINITE, d)) for j, d in non_finite(f, c).items())
    bad = np.zeros(n, bool)
    bad[list(problems)] = True
    ok = pa.array(~bad, pa.bool_())
    out = table.append_column(sf.FINE, sf.tensor_array(fine, has_image)).append_column(
        sf.COARSE, sf.tensor_array(coarse, has_image)
    )
    kept = out.filter(ok)
    rows = sorted(problems)
    rejected = layout.with_reason(
        table.filter(pc.invert(ok)).drop_columns(["image"]),
        [problems[i][0] for i in rows],
        [problems[i][1] for i in rows],
    )
    return kept, rejected


# ----------------------------------------------------------------------------- the step

PLAN = "_plan.json"


def plan(counts: list[tuple[str, int]], rows_per_file: int) -> list[list[tuple[str, int, int]]]:
    """Upstream (shard, rows) -> per output file a list of (shard, offset, length) slices."""
    files: list[list[tuple[str, int, int]]] = []
    current: list[tuple[str, int, int]] = []
    room = rows_per_file
    for name, n in counts:
        offset = 0
        while offset < n:
            take = min(room, n - offset)
            current.append((name, offset, take))
            offset += take
            room -= take
            if room == 0:
                files.append(current)
                current, room = [], rows_per_file
    if current:
        files.append(current)
    return files


def write_plan(out: Store, step: str, counts: list[list[Any]], rows_per_file: int) -> dict[str, list]:
    """The file plan (`_plan.json`); a plan that changed (upstream counts, rows_per_file) clears `out`."""
    files = {layout.shard_name(j): s for j, s in enumerate(plan(counts, rows_per_file))}
    record = {"upstream": counts, "rows_per_file": rows_per_file, "files": files}
    path = out / PLAN
    exists = path.exists()
    if exists and path.read_json() != json.loads(json.dumps(record)):
        print(f"[{step}] upstream row counts changed since the last run: rebuilding all training shards",
              flush=True)  # fmt: skip
        fingerprint.clear(out)
        exists = False
    out.mkdir()
    if not exists:
        path.write_json(record)
    return files


def check_preprocess(out: Store, finished: list[str], preprocess: str) -> None:
    """Finished files made with another canvas rule cannot be resumed with this one: fail, naming both."""
    for name in finished[:1] + finished[-1:]:
        meta = layout.read_schema(out / f"{name}.parquet").metadata or {}
        made = meta.get(sf.META_PREPROCESS.encode(), b"").decode()
        if made != preprocess:
            raise ConfigError(
                f"teacher.preprocess: {out / name}.parquet was made with {sf.META_PREPROCESS}={made!r}, the "
                f"config asks for {preprocess!r}; set teacher.preprocess: {made} to finish that dataset, or "
                "prepare into a new output_dir"
            )


def run_training_shards(cfg: PrepareConfig, step: str) -> dict[str, Any]:
    """Teacher features for the rows of `step`'s upstream, written as training shards."""
    info = graph.step(step)
    rows_dir = cfg.out / info.rows_from
    names = layout.require_dataset(rows_dir, info.rows_from)
    t = cfg.teacher
    if t.weights:  # first: before hashing it and before any actor starts
        check_weights(str(fetch_file(t.weights, "teacher.weights", cfg.storage.endpoint_override)))
    name, weights_id = teacher_identity(t, cfg.storage.endpoint_override)
    external = {"teacher": [name, weights_id]}
    if t.model_config:
        external["teacher_model_config"] = layout.sha256_file(t.model_config)
    config = {"teacher": output_fields(t), "shards": output_fields(cfg.shards)}
    with runner.open_step(cfg, step, config, external) as output:
        return _run(cfg, output, step, names, (name, weights_id))


def _run(cfg: PrepareConfig, output: Any, step: str, names: list[str], identity: tuple[str, str]
         ) -> dict[str, Any]:  # fmt: skip
    import ray

    info, t = graph.step(step), cfg.teacher
    rows_dir, out = cfg.out / info.rows_from, output.dataset
    name, weights_id = identity
    counts = [[s["shard"], s["kept"]] for s in layout.read_stats(rows_dir, names)]
    files = write_plan(out, step, counts, cfg.shards.rows_per_file)
    todo = runner.todo_shards(output, list(files))
    check_preprocess(out, [n for n in files if n not in todo], t.preprocess)
    if todo:
        raystart.init_ray(cfg.ray.address, cfg.ray.num_cpus)
        gpus = ray.cluster_resources().get("GPU", 0) if t.device != "cpu" else 0
        num_gpus = t.num_gpus_per_actor if gpus else 0.0
        print(f"[{step}] teacher on {len(todo)} of {len(files)} files, {t.num_actors} actor(s), "
              f"{'GPU' if num_gpus else 'CPU'}", flush=True)  # fmt: skip
        kwargs = {"in_dir": rows_dir, "out_dir": out, "step": step, "cfg": to_dict(t),
                  "identity": (name, weights_id), "endpoint": cfg.storage.endpoint_override}  # fmt: skip
        runner.run_shards(step, todo, TeacherWorker, kwargs,
                          num_actors=t.num_actors, num_cpus=t.cpus_per_actor, num_gpus=num_gpus)  # fmt: skip
    else:
        print(f"[{step}] nothing to do: all {len(files)} files are finished", flush=True)
    schema = layout.read_schema(out / f"{layout.shard_name(0)}.parquet") if files else None
    if t.random_init_seed is not None and schema is not None:
        weights_id = schema.metadata[sf.META_TEACHER_WEIGHTS.encode()].decode()
    sources = Sources(cfg.out, step)
    inputs = [
        layout.dataset_input(d) for d in dict.fromkeys([rows_dir, sources.images_dir, sources.text_dir])
    ]
    return runner.finish_step(
        output, inputs, {"teacher": to_dict(t), "shards": to_dict(cfg.shards)},
        extra={"teacher": {"name": name, "weights": weights_id, "preprocess": t.preprocess},
               "images": sources.images_rel,
               "schema": {f.name: str(f.type) for f in schema} if schema else {}},
    )  # fmt: skip


def run(cfg: PrepareConfig) -> dict[str, Any]:
    """The pre-training shards (`shards/`)."""
    return run_training_shards(cfg, graph.TRAINING["pretrain"])


def run_sft(cfg: PrepareConfig) -> dict[str, Any]:
    """The SFT shards (`sft_shards/`)."""
    return run_training_shards(cfg, graph.TRAINING["sft"])


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    return cli.step_main(__doc__, run, ("shards",), argv)


if __name__ == "__main__":
    sys.exit(main())
