"""The datasets the teacher step reads, written directly (tests and benchmarks of the teacher alone)."""

from __future__ import annotations

import io
from pathlib import Path

from PIL import Image


def write_teacher_inputs(out_dir: Path, shards: list[list[tuple[str, str, bytes]]]) -> None:
    """The datasets the teacher step reads, from (key, caption, image bytes) rows per shard: the images
    (and their sizes, from the header; none for bytes that are not an image) in `download/`, the
    captions in `captions/`, every key kept in `filter/` (tests and benchmarks of the teacher alone)."""
    import pyarrow as pa

    from pipelines import fingerprint, layout

    specs = {step: {"step": step, "inputs": {"write_teacher_inputs": fingerprint.digest(
        [[k for k, _, _ in rows] for rows in shards])}} for step in ("download", "captions", "filter")}  # fmt: skip
    for step, spec in specs.items():
        fingerprint.record(out_dir / step, spec)

    def size(data: bytes) -> tuple[int | None, int | None]:
        try:
            with Image.open(io.BytesIO(data)) as im:
                return im.size
        except Exception:
            return None, None

    for s, rows in enumerate(shards):
        sizes = [size(img) for _, _, img in rows]
        table = pa.table({
            "key": [k for k, _, _ in rows], "caption": [c for _, c, _ in rows],
            "image": pa.array([img for _, _, img in rows], pa.binary()),
            "width": pa.array([w for w, _ in sizes], pa.int32()), "height": pa.array([h for _, h in sizes], pa.int32()),
        })  # fmt: skip
        for step, columns in (
            ("download", table.column_names),
            ("captions", ["key", "caption"]),
            ("filter", ["key"]),
        ):
            kept = table.select(columns)
            empty = layout.with_reason(kept.slice(0, 0), [], [])
            layout.write_shard(out_dir / step, layout.shard_name(s), kept, empty, kept.num_rows)
    for step, spec in specs.items():  # complete datasets, as their steps would leave them
        layout.write_manifest(out_dir / step, step, [], {}, fingerprint.of(spec))
