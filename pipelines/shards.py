"""Shards step: teacher output -> training shards with a fixed number of rows per file.

Reads:  `<output_dir>/teacher/` (pre-training) or `<output_dir>/sft_teacher/` (SFT), all shards.
Writes: `<output_dir>/shards/` (or `sft_shards/`): `part-NNNNN.parquet` with exactly
        `shards.rows_per_file` rows (the last file may hold fewer), one row per sample with
        everything a training step needs and nothing else:
          key, image (bytes, long side <= 672), width, height, caption | conversations,
          fine [64, D] and coarse [36, D] float16 (`fixed_shape_tensor`);
        stats and markers per file; `manifest.json` with the teacher identity, the schema and counts.

Order is deterministic: upstream shard order, then key order within each shard. Output file j
holds global rows [j*R, (j+1)*R); each file is built by its own Ray task from the slices of the
upstream shards it covers, so the step is parallel and resumable. If the upstream row counts
change, the plan changes and the old files are removed.

Run:  python -m pipelines.shards --config pipelines/configs/demo.yaml
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from pipelines import common
from pipelines.config import PrepareConfig

STEP = "shards"
TRAIN_COLUMNS = ["key", "image", "width", "height", "caption", "conversations", "fine", "coarse"]
TEACHER_META = (b"breen.teacher", b"breen.teacher_weights", b"breen.preprocess")


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


def build_file(in_dir: str, out_dir: str, name: str, slices: list[tuple[str, int, int]]) -> dict[str, Any]:
    """Write one training shard from its upstream slices (runs in a Ray task)."""
    out = Path(out_dir)
    if common.done_marker(out, name).exists():
        return json.loads(common.stats_path(out, name).read_text())
    t0 = time.monotonic()
    parts, meta = [], {}
    for shard, offset, length in slices:
        path = Path(in_dir) / f"{shard}.parquet"
        schema = pq.read_schema(path)
        columns = [c for c in TRAIN_COLUMNS if c in schema.names]
        parts.append(pq.read_table(path, columns=columns).slice(offset, length))
        meta = {k.decode(): schema.metadata[k].decode() for k in TEACHER_META if k in (schema.metadata or {})}
    table = common.concat(parts)
    empty = common.with_reason(table.select(["key"]).slice(0, 0), [], [])
    return common.write_shard(out, name, table, empty, table.num_rows,
                              {"seconds": round(time.monotonic() - t0, 3)}, metadata=meta)  # fmt: skip


def run_shards_step(
    cfg: PrepareConfig, in_dir: Path, out: Path, produced_by: str, step: str
) -> dict[str, Any]:
    import ray

    names = common.require_dataset(in_dir, produced_by)
    counts = [[s["shard"], s["kept"]] for s in common.read_stats(in_dir, names)]
    files = plan(counts, cfg.shards.rows_per_file)
    plan_path = out / "_plan.json"
    fingerprint = {"upstream": counts, "rows_per_file": cfg.shards.rows_per_file}
    if plan_path.exists() and json.loads(plan_path.read_text()) != fingerprint:
        print(f"[{step}] upstream changed since the last run: rebuilding all training shards", flush=True)
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    if not plan_path.exists():
        common.atomic_write_json(plan_path, fingerprint)
    todo = [(common.shard_name(j), s) for j, s in enumerate(files) if not common.done_marker(out, common.shard_name(j)).exists()]  # fmt: skip
    if todo:
        common.init_ray(cfg.ray.address, cfg.ray.num_cpus)
        task = ray.remote(build_file).options(num_cpus=0.5, max_retries=3, retry_exceptions=True)
        progress = common.Progress(step, len(todo))
        refs = [task.remote(str(in_dir), str(out), name, slices) for name, slices in todo]
        while refs:
            ready, refs = ray.wait(refs, num_returns=1)
            progress.update(ray.get(ready[0])["rows_in"])
    else:
        print(f"[{step}] nothing to do: all {len(files)} files are finished", flush=True)
    teacher_manifest = (
        json.loads((in_dir / "manifest.json").read_text()) if (in_dir / "manifest.json").exists() else {}
    )
    schema = pq.read_schema(out / f"{common.shard_name(0)}.parquet") if files else None
    manifest = common.finish_step(
        out, step, [common.dataset_input(in_dir)], {"shards": {"rows_per_file": cfg.shards.rows_per_file}},
        extra={"teacher": teacher_manifest.get("teacher"),
               "schema": {f.name: str(f.type) for f in schema} if schema else {}},
    )  # fmt: skip
    return manifest


def run(cfg: PrepareConfig) -> dict[str, Any]:
    return run_shards_step(cfg, cfg.out / "teacher", cfg.out / STEP, "teacher", STEP)


def main(argv: list[str] | None = None) -> int:
    return common.step_main(__doc__, run, argv)


if __name__ == "__main__":
    sys.exit(main())
