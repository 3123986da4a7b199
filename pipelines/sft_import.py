"""SFT import: LLaVA-style JSON + image folder -> the training-shard layout, through the teacher.

Reads:  `input.sft.json`, a JSON array of records
            {"id": ..., "image": "relative/path.jpg", "conversations": [{"from": "human", "value": "<image>\\n..."},
                                                                         {"from": "gpt", "value": "..."}, ...]}
        (records without "image" are text-only), and the images under `input.sft.image_folder`.
Writes: `<output_dir>/sft_import/` (key, id, image bytes with long side <= download.image_size,
        width, height, sha256, caption (first answer, for reports), conversations (JSON string));
        rejected rows (key, id, the record's first 2000 characters, reason, detail) with reasons
        invalid_record, invalid_unicode, bad_conversations, missing_image, decode_error. The image
        bytes are stored here once. Then (`python -m pipelines.sft_import`, or `pipelines.prepare`
        as its next step) the teacher writes `sft_shards/`: training shards with `conversations`
        that reference these images; text-only rows get null features.

Records are found by a scanner, not by parsing the whole file (`pipelines.guard.json_array_records`:
no recursion, one block and one record in memory), and parsed one by one in the import tasks. A record
is rejected, never the file, when it is not valid JSON, nests deeper than `guard.MAX_JSON_DEPTH` levels
or is larger than `guard.MAX_RECORD_BYTES` (`invalid_record`), or holds text that is not valid Unicode
in any string, keys included (invalid UTF-8, a lone surrogate such as "\\ud800": `invalid_unicode`, the
detail names the field). Only structure that hides where records begin and end (no top-level array,
mismatched brackets, a stray comma, a truncated file) fails the step, naming the file and the byte.

Conversations are checked: a non-empty list of {"from", "value"} turns, human/gpt (or "Answer")
roles alternating from human, string values, `<image>` only in records with an image. A record
with an image but no `<image>` placeholder gets one at the start of its first human turn (LLaVA
convention). Image paths must stay inside the image folder.

Run:  python -m pipelines.sft_import --config pipelines/configs/demo.yaml
"""

from __future__ import annotations

import hashlib
import io
import json
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow as pa

from breen.settings import ConfigError
from breen.storage import Store
from pipelines import cli, fingerprint, layout, raystart, runner
from pipelines.config import PrepareConfig
from pipelines.guard import (
    INVALID_RECORD,
    INVALID_UNICODE,
    JsonStructureError,
    check_image_header,
    escape_text,
    json_array_records,
    normalise_image,
    text_problem,
    utf8_problem,
)

STEP = "sft_import"
HUMAN = {"human", "user"}
ASSISTANT = {"gpt", "assistant", "answer", "Answer"}
OUT_SCHEMA = pa.schema([
    ("key", pa.string()), ("id", pa.string()), ("image", pa.binary()), ("width", pa.int32()),
    ("height", pa.int32()), ("sha256", pa.string()), ("caption", pa.string()), ("conversations", pa.string()),
])  # fmt: skip
# The input shards (`_input/part-NNNNN.arrow`): one raw record per row, and what the scanner found wrong.
SPLIT_SCHEMA = pa.schema([("key", pa.string()), ("record", pa.binary()), ("problem", pa.string())])
SPLIT_FORMAT = 2  # in the split's fingerprint: splits of an older layout are redone
PREVIEW_CHARS = 2000  # of a rejected record, kept in its row


def check_conversations(record: dict[str, Any]) -> list[dict[str, str]]:
    """Validated, normalised conversation turns; raises ValueError with the problem."""
    conv = record.get("conversations")
    if not isinstance(conv, list) or not conv:
        raise ValueError("conversations must be a non-empty list")
    turns = []
    for i, t in enumerate(conv):
        if (
            not isinstance(t, dict)
            or not isinstance(t.get("value"), str)
            or not isinstance(t.get("from"), str)
        ):
            raise ValueError(f"turn {i}: expected {{'from': str, 'value': str}}")
        role = "human" if t["from"] in HUMAN else "gpt" if t["from"] in ASSISTANT else None
        if role is None:
            raise ValueError(f"turn {i}: unknown role {t['from']!r}")
        if role != ("human" if i % 2 == 0 else "gpt"):
            raise ValueError(f"turn {i}: roles must alternate human/gpt starting with human")
        turns.append({"from": role, "value": t["value"]})
    if turns[-1]["from"] != "gpt":
        raise ValueError("last turn must be an answer")
    n_image = sum(t["value"].count("<image>") for t in turns)
    if "image" in record:
        if n_image > 1:
            raise ValueError(f"{n_image} <image> placeholders for one image")
        if n_image == 0:
            turns[0]["value"] = "<image>\n" + turns[0]["value"]
    elif n_image:
        raise ValueError("<image> placeholder in a text-only record")
    return turns


def load_image(
    folder: str | Path | Store, rel: Any, max_side: int, max_pixels: int
) -> tuple[bytes, int, int]:
    """Read an image from inside `folder` (local or on a store); downscale to long side <= max_side
    (never upscale)."""
    from PIL import Image

    if not isinstance(rel, str) or not rel:
        raise FileNotFoundError("image path must be a non-empty string")
    folder = Store.at(folder)
    path = folder.joinpath(rel)
    inside = path.path.startswith(folder.path.rstrip("/") + "/")
    if inside and folder.local:  # a symbolic link must not lead out either
        inside = Path(path.path).resolve().is_relative_to(folder.path)
    if not inside:
        raise FileNotFoundError(f"image path {rel!r} leaves the image folder")
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {rel}")
    data = path.read_bytes()
    w, h = check_image_header(data, max_pixels)
    # Same pixels as the download step stores: EXIF orientation applied, 8-bit samples, transparency
    # on white, RGB instead of CMYK (the teacher and training decode with a plain Pillow convert).
    fixed = normalise_image(data, flatten_alpha=True)
    if fixed is not None:
        data = fixed
        w, h = check_image_header(data, max_pixels)
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        if max(w, h) <= max_side and im.format in ("JPEG", "PNG", "WEBP"):
            return data, w, h
        im = im.convert("RGB")
        scale = min(1.0, max_side / max(w, h))
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        im = im.resize(size, Image.Resampling.LANCZOS) if scale < 1 else im
        buf = io.BytesIO()
        im.save(buf, "JPEG", quality=95)
        return buf.getvalue(), size[0], size[1]


def import_shard(name: str, work_dir: str | Store, out_dir: str | Store, folder: str | Store, max_side: int,
                 max_pixels: int) -> dict:  # fmt: skip
    """Turn one shard of raw JSON records into kept/rejected rows (runs in a Ray task)."""
    out = Store.at(out_dir)
    if layout.done_marker(out, name).exists():
        return layout.stats_path(out, name).read_json()
    t0 = time.monotonic()
    src = layout.read_arrow(Store.at(work_dir) / f"{name}.arrow")
    kept: list[dict[str, Any]] = []
    rejected: list[dict[str, Any]] = []
    for key, raw, problem in zip(*(src.column(c).to_pylist() for c in SPLIT_SCHEMA.names), strict=True):
        record, reason, detail = parse_record(raw, problem)
        rid = escape_text(str(record.get("id", ""))) if isinstance(record, dict) else ""
        base = {"key": key, "id": rid, "record": escape_text(raw[: 4 * PREVIEW_CHARS])[:PREVIEW_CHARS]}
        if reason is None:
            try:
                if not isinstance(record, dict):
                    raise ValueError("record is not a JSON object")
                turns = check_conversations(record)
            except ValueError as e:
                reason, detail = "bad_conversations", str(e)
        if reason is not None:
            rejected.append({**base, "reason": reason, "detail": detail})
            continue
        image, w, h, sha = None, None, None, None
        if "image" in record:
            try:
                image, w, h = load_image(folder, record["image"], max_side, max_pixels)
                sha = hashlib.sha256(image).hexdigest()
            except FileNotFoundError as e:
                rejected.append({**base, "reason": "missing_image", "detail": str(e)})
                continue
            except Exception as e:
                rejected.append({**base, "reason": "decode_error", "detail": layout.error_detail(e)})
                continue
        caption = next(t["value"] for t in turns if t["from"] == "gpt")
        kept.append({"key": key, "id": rid, "image": image, "width": w, "height": h, "sha256": sha,
                     "caption": caption, "conversations": json.dumps(turns, ensure_ascii=False)})  # fmt: skip
    rej_schema = pa.schema([("key", pa.string()), ("id", pa.string()), ("record", pa.string()),
                            *layout.REJECT_FIELDS])  # fmt: skip
    return layout.write_shard(
        out, name, pa.Table.from_pylist(kept, OUT_SCHEMA), pa.Table.from_pylist(rejected, rej_schema),
        src.num_rows, {"seconds": round(time.monotonic() - t0, 3)},
    )  # fmt: skip


def parse_record(raw: bytes, problem: str | None) -> tuple[Any, str | None, str | None]:
    """(record, reason, detail) of one raw record: reason None when it parsed into valid Unicode text,
    else `invalid_record` or `invalid_unicode` with the detail (the field, for text)."""
    if problem is not None:
        return None, INVALID_RECORD, problem
    if (bad := utf8_problem(raw, "the record")) is not None:
        return None, INVALID_UNICODE, bad
    try:
        record = json.loads(raw.decode("utf-8"))
    except RecursionError:  # not reached below guard.MAX_JSON_DEPTH levels; kept as a last line
        return None, INVALID_RECORD, "nesting too deep to parse"
    except json.JSONDecodeError as e:
        return None, INVALID_RECORD, f"not valid JSON: {e}"
    if (bad := text_problem(record)) is not None:
        return record, INVALID_UNICODE, bad
    return record, None, None


def split_records(json_path: str | Path | Store, rows_per_shard: int, dest: str | Path | Store) -> list[str]:
    """The JSON array -> Arrow shards of (key, raw record bytes, problem), streamed; deterministic;
    reused if unchanged. Broken array structure is a ConfigError naming the file and the byte."""
    json_path, dest = Store.at(json_path), Store.at(dest)
    success = dest / "_SUCCESS.json"
    fingerprint = {"input": layout.sha256_file(json_path), "rows_per_shard": rows_per_shard,
                   "format": SPLIT_FORMAT}  # fmt: skip
    if success.exists() and (done := success.read_json()).get("fingerprint") == fingerprint:
        return done["shards"]
    dest.mkdir()
    names: list[str] = []
    rows: list[tuple[bytes, str | None]] = []
    total = 0

    def flush() -> None:
        keys = [f"sft{total - len(rows) + i:09d}" for i in range(len(rows))]
        # a flagged record keeps only a preview: it is rejected, and may be huge
        records = [r if p is None else r[: 4 * PREVIEW_CHARS] for r, p in rows]
        table = pa.table([keys, records, [p for _, p in rows]], schema=SPLIT_SCHEMA)
        name = layout.shard_name(len(names))
        layout.write_arrow(dest / f"{name}.arrow", table)
        names.append(name)
        rows.clear()

    try:
        with json_path.open_input() as f:
            for record in json_array_records(f):
                rows.append(record)
                total += 1
                if len(rows) == rows_per_shard:
                    flush()
    except JsonStructureError as e:
        raise ConfigError(f"{json_path}: not a valid JSON array of records: {e}") from None
    if rows:
        flush()
    success.write_json({"fingerprint": fingerprint, "shards": names, "rows": total})
    return names


def run(cfg: PrepareConfig) -> dict[str, Any]:
    """Import the SFT records (the training shards are the next step, `pipelines.teacher.run_sft`)."""
    import ray

    if cfg.input.sft is None:
        raise ConfigError(f"{cfg.source}: input.sft: no SFT input configured")
    out = cfg.out / STEP
    work = out / "_input"
    sft_json = cfg.location(cfg.input.sft.json, "input.sft.json")
    folder = cfg.location(cfg.input.sft.image_folder, "input.sft.image_folder")
    json_sha = layout.sha256_file(sft_json)
    images = fingerprint.folder_digest(folder)
    external = {"json": json_sha, "image_folder": images["listing_sha256"]}
    with runner.open_step(cfg, STEP, {"sft": common_dict(cfg)}, external) as output:
        names = split_records(sft_json, cfg.download.rows_per_shard, work)
        todo = runner.todo_shards(output, names)
        if todo:
            raystart.init_ray(cfg.ray.address, cfg.ray.num_cpus)
            task = ray.remote(import_shard).options(num_cpus=0.5, max_retries=3, retry_exceptions=True)
            runner.run_tasks(
                STEP, task, todo, work, out, folder, cfg.download.image_size, cfg.filter.max_pixels
            )
        inputs = [{"path": str(sft_json), "sha256": json_sha}, images]
        return runner.finish_step(output, inputs, {"sft": common_dict(cfg)})


def common_dict(cfg: PrepareConfig) -> dict[str, Any]:
    return {"image_size": cfg.download.image_size, "max_pixels": cfg.filter.max_pixels,
            "rows_per_shard": cfg.download.rows_per_shard}  # fmt: skip


def run_chain(cfg: PrepareConfig) -> dict[str, Any]:
    """The SFT chain of `pipelines.graph`: the import, then the teacher into `sft_shards/`."""
    from pipelines import teacher

    run(cfg)
    return teacher.run_sft(cfg)


def main(argv: list[str] | None = None) -> int:
    return cli.step_main(__doc__, run_chain, ("sft_import", "sft_shards"), argv)


if __name__ == "__main__":
    sys.exit(main())
