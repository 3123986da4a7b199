"""Helpers shared by the training-side unit tests (jobs.config, ingest, launch, ...): nested-dict views of
a config, and in-place rewrites of a training shard file that keep its stats in step."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from jobs import config as jc
from jobs import launch
from tests.conftest import TINY_CLIP_DIM, with_set

CLIP_DIM = TINY_CLIP_DIM  # the teacher width of the tiny shards and of the `init_dir` fixture
CPU = ["--profile", "cpu"]


def flat(d: dict, prefix: str = "") -> dict[str, object]:
    """Nested dict -> {dotted key: leaf} (lists are leaves)."""
    out: dict[str, object] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flat(v, key))
        else:
            out[key] = v
    return out


def differing_keys(a: jc.TrainConfig, b: jc.TrainConfig) -> set[str]:
    fa, fb = flat(jc.to_dict(a)), flat(jc.to_dict(b))
    return {k for k in fa.keys() | fb.keys() if fa.get(k, "<absent>") != fb.get(k, "<absent>")}


def rewrite(
    path: Path,
    *,
    drop: tuple[str, ...] = (),
    teacher: str | None = None,
    replace: dict[str, pa.Array] | None = None,
    meta: dict[str, str | None] | None = None,
) -> None:
    """Rewrite one shard file in place: without some columns, with another `breen.teacher`, columns
    replaced (name -> array) and/or metadata keys set (None removes one). Its stats' size and sha256
    follow when the stats list the file (as the data pipeline writes them)."""
    table = pq.read_table(path)
    md = dict(table.schema.metadata or {})
    table = table.drop_columns(list(drop)) if drop else table
    for name, array in (replace or {}).items():
        table = table.set_column(table.schema.get_field_index(name), name, array)
    if teacher is not None:
        md[b"breen.teacher"] = teacher.encode()
    for key, value in (meta or {}).items():
        md.pop(key.encode(), None) if value is None else md.__setitem__(key.encode(), value.encode())
    pq.write_table(table.replace_schema_metadata(md), path)
    stats = json.loads(stats_file(path).read_text())
    if path.name in stats.get("files", {}):
        record_in_stats(path)


def stats_file(path: Path) -> Path:
    return path.with_name(path.name.replace(".parquet", ".stats.json"))


def record_in_stats(path: Path) -> None:
    """Record the file's size and sha256 in its shard's stats (``files``), as the data pipeline does."""
    stats = json.loads(stats_file(path).read_text())
    entry = {"bytes": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    stats.setdefault("files", {})[path.name] = entry
    stats_file(path).write_text(json.dumps(stats))


# ----------------------------------------------------------------------------- the command line
def run_main(argv, capsys) -> tuple[int, str]:
    code = launch.main(argv)
    return code, capsys.readouterr().err


def stage1_argv(tmp_path, data, init, *overrides: str) -> list[str]:
    """`jobs.train` arguments for stage 1 on the CPU profile, output under tmp_path/runs."""
    return ["--stage", "stage1", "--data", str(data), "--init-from", str(init), "--output-dir",
            str(tmp_path / "runs"), *CPU, *with_set(*overrides)]  # fmt: skip
