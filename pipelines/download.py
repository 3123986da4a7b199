"""Download step: URL lists -> `<output_dir>/download/` (image bytes + metadata), with img2dataset.

Reads:  the URL lists in `input.urls` (Parquet, CSV, TSV or JSONL with `url` and `caption`;
        any extra column is carried through).
Writes: `<output_dir>/download/_input/part-NNNNN.arrow` (the deterministic input shards),
        `<output_dir>/download/part-NNNNN.parquet` with
        key, url, caption, image (encoded bytes, long side <= download.image_size, never upscaled),
        width, height, original_width, original_height, sha256 (of the downloaded bytes), extras;
        `rejected/part-NNNNN.parquet` with `reason` (invalid_unicode, url_refused, download_error,
        decode_error) and `detail`; per-shard stats and completion markers; `manifest.json`.

Every input shard is one Ray task (retried `download.max_shard_retries` times) that runs
img2dataset's `Downloader` on it. URLs to loopback/private/link-local/metadata addresses are
refused (before download, and again for every connection and redirect) unless listed in
`download.allow_private`. Keys are the global input row number, stable across runs. URL lists and
`output_dir` may be local or on an object store (`breen.storage`); img2dataset works in a local
temporary folder per shard, and the shard is written once, by us.

A row whose url, caption or extra column is not valid Unicode text (invalid UTF-8 bytes, or a lone
surrogate such as the JSON escape "\\ud800") is rejected as `invalid_unicode`, with a detail naming the
column; its values are kept in the rejected row with the bad bytes escaped (`guard.escape_text`). The
file is read all the same: only structure (no `url` column, unreadable format, a JSONL line nested
deeper than `guard.MAX_JSON_DEPTH`, which crashes pyarrow's JSON reader) fails the step.

Run:  python -m pipelines.download --config pipelines/configs/demo.yaml
      ray job submit --working-dir . -- python -m pipelines.download --config my.yaml
"""

from __future__ import annotations

import io
import json
import os
import re
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.ipc as ipc
import pyarrow.json as pjson

from breen.settings import ConfigError
from breen.storage import Store
from pipelines import cli, layout, raystart, runner
from pipelines.config import DownloadConfig, PrepareConfig, from_dict, output_fields, to_dict
from pipelines.guard import (
    INVALID_UNICODE,
    MAX_JSON_DEPTH,
    URL_REFUSED_MARK,
    AddressPolicy,
    Limits,
    UrlVetter,
    check_image_header,
    escape_text,
    install_guarded_opener,
    json_depth,
    normalise_image,
    text_problem,
    utf8_problem,
)

STEP = "download"
# In the input shards: why a row's text is not valid Unicode (null when it is); the row is rejected.
TEXT_PROBLEM = "_text_problem"
# Columns the download step writes itself; an input column with one of these names is an error.
OUTPUT_COLUMNS = {"key", "image", "width", "height", "original_width", "original_height", "sha256", "status",
                  "error_message", "reason", "detail", "jpg", "txt", "exif", TEXT_PROBLEM}  # fmt: skip
KEY_DIGITS = 12


# ----------------------------------------------------------------------------- URL lists


def _format_of(path: Store) -> str:
    suffixes = "".join(Path(path.name).suffixes[-2:]).lower()
    for fmt, exts in {"parquet": (".parquet",), "csv": (".csv",), "tsv": (".tsv",),
                      "jsonl": (".jsonl", ".json", ".ndjson")}.items():  # fmt: skip
        if any(suffixes.endswith(e) for e in exts):
            return fmt
    raise ConfigError(f"input.urls: {path}: unknown URL-list format (use .parquet, .csv, .tsv or .jsonl)")


def _csv_options(fmt: str) -> pcsv.ParseOptions:
    return pcsv.ParseOptions(delimiter="," if fmt == "csv" else "\t", newlines_in_values=True)


def url_list_columns(path: str | Path | Store) -> list[str]:
    """The column names of one URL list from its schema, header or first record (nothing else is read),
    checked like `read_url_list` checks them: what the checks before Ray start use."""
    path = Store.at(path)
    fmt = _format_of(path)
    try:
        if fmt == "parquet":
            names = layout.read_schema(path).names
        elif fmt in ("csv", "tsv"):
            with path.open_input() as f, pcsv.open_csv(f, parse_options=_csv_options(fmt)) as reader:
                names = reader.schema.names
        else:
            first = _first_line(path)
            if json_depth(first) > MAX_JSON_DEPTH:
                raise ConfigError(
                    f"{path}: the first JSON line is nested deeper than {MAX_JSON_DEPTH} levels"
                )
            record = json.loads(first)
            if not isinstance(record, dict):
                raise ConfigError(f"{path}: the first JSON line is a {type(record).__name__}, not an object")
            names = list(record)
    except (pa.ArrowInvalid, OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: cannot read as {fmt}: {e}") from None
    check_url_columns(path, names)
    return names


def _first_line(path: Store, chunk: int = 1 << 16) -> bytes:
    """The first non-blank line of a file (read in chunks until it ends); b"{}" for a blank file."""
    buf = b""
    with path.open_input() as f:
        while block := f.read(chunk):
            buf += block
            lines = buf.split(b"\n")
            for line in lines[:-1]:
                if line.strip():
                    return line
            buf = lines[-1]
    return buf if buf.strip() else b"{}"


def check_url_columns(path: Store, names: list[str]) -> None:
    missing = [c for c in ("url", "caption") if c not in names]
    if missing:
        raise ConfigError(f"{path}: URL list has no {' or '.join(repr(c) for c in missing)} column "
                          f"(columns: {names})")  # fmt: skip
    clash = sorted(OUTPUT_COLUMNS & set(names))
    if clash:
        raise ConfigError(
            f"{path}: column(s) {clash} clash with columns the download step writes; rename them"
        )


def read_url_list(path: str | Path | Store) -> pa.Table:
    """Read one URL list as a table of strings; fail fast naming the file on bad structure. A value
    that is not valid Unicode is escaped (`read_url_list_rows` also says which rows have one)."""
    return read_url_list_rows(path)[0]


def read_url_list_rows(path: str | Path | Store) -> tuple[pa.Table, list[str | None]]:
    """`read_url_list`, and per row None or why its text is not valid Unicode (naming the column): text
    that is not valid Unicode fails the row (the download step rejects it), not the file."""
    path = Store.at(path)
    if not path.is_file():
        raise FileNotFoundError(f"URL list not found: {path}")
    fmt = _format_of(path)
    problems: dict[int, str] = {}  # row -> why its text is not valid Unicode
    try:
        if fmt == "parquet":
            table = layout.read_table(path)
        elif fmt in ("csv", "tsv"):
            with path.open_input() as f:
                table = pcsv.read_csv(f, parse_options=_csv_options(fmt),
                                      convert_options=pcsv.ConvertOptions(strings_can_be_null=False))  # fmt: skip
        else:
            table = _read_jsonl(path, problems)
    except (pa.ArrowInvalid, OSError) as e:
        raise ConfigError(f"{path}: cannot read as {fmt}: {e}") from None
    check_url_columns(path, table.column_names)
    # Everything as strings: extra columns are carried through untouched.
    columns = {n: _as_strings(path, n, table.column(n), problems) for n in table.column_names}
    return pa.table(columns), [problems.get(i) for i in range(table.num_rows)]


# A \uD800-\uDFFF escape: pyarrow's JSON reader refuses the whole file for a lone one.
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")


def _read_jsonl(path: Store, problems: dict[int, str]) -> pa.Table:
    """pyarrow's JSON reader, after one pass over the lines for what it cannot take. A line nested deeper
    than `MAX_JSON_DEPTH` fails the file, naming the line (pyarrow crashes the process on ~10,000
    levels). A line with a lone surrogate (pyarrow refuses the whole file) is parsed here: its row gets a
    problem in `problems` and pyarrow reads it re-serialised with the surrogate escaped."""
    fixed: dict[int, bytes] = {}  # line number -> replacement
    row = 0
    with path.open_input() as f:
        for lineno, line in enumerate(_lines(f), 1):
            if not line.strip():
                continue  # pyarrow skips blank lines too
            if line.count(b"[") + line.count(b"{") > MAX_JSON_DEPTH and json_depth(line) > MAX_JSON_DEPTH:
                raise ConfigError(f"{path}: line {lineno}: nested deeper than {MAX_JSON_DEPTH} levels")
            if _SURROGATE_ESCAPE.search(line) and (found := _lone_surrogate(line)):
                problems[row], fixed[lineno] = found
            row += 1
    if not fixed:
        with path.open_input() as f:
            return pjson.read_json(f)
    data = io.BytesIO()
    with path.open_input() as f:
        for lineno, line in enumerate(_lines(f), 1):
            data.write(fixed.get(lineno, line))
    return pjson.read_json(pa.BufferReader(data.getvalue()))


def _lines(f: Any, chunk: int = 1 << 20) -> Iterator[bytes]:
    """The lines of a binary file, each with its newline (pyarrow's files have no readline)."""
    rest = b""
    while block := f.read(chunk):
        lines = (rest + block).split(b"\n")
        rest = lines.pop()
        for line in lines:
            yield line + b"\n"
    if rest:
        yield rest


def _lone_surrogate(line: bytes) -> tuple[str, bytes] | None:
    """(problem naming the column, the line re-serialised with its strings escaped) for a JSONL record
    with a lone surrogate; None for a line that is fine, or broken (pyarrow reports that)."""
    try:
        record = json.loads(line.decode("utf-8", "surrogateescape"))  # (invalid bytes: as surrogates)
    except ValueError:
        return None
    for k, v in record.items() if isinstance(record, dict) else ():
        if problem := text_problem(k, "a column name") or text_problem(v, f"column {escape_text(k)!r}"):
            return problem, json.dumps(_escape_strings(record)).encode() + b"\n"
    return None


def _escape_strings(value: Any) -> Any:
    """A parsed JSON value (nested at most `MAX_JSON_DEPTH` levels) with `escape_text` on every string."""
    if isinstance(value, str):
        return escape_text(value)
    if isinstance(value, dict):
        return {escape_text(str(k)): _escape_strings(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_escape_strings(v) for v in value]
    return value


def _as_strings(path: Store, name: str, col: pa.ChunkedArray, problems: dict[int, str]) -> pa.ChunkedArray:
    """A column as valid UTF-8 strings: a value with invalid UTF-8 (a binary column, or a string column
    that a writer did not validate) is escaped, and its row's problem, naming the column, goes into
    `problems` (the first one per row)."""
    t = col.type
    binary = pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_fixed_size_binary(t)
    if not binary:
        try:
            col = col.cast(pa.string())
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as e:
            raise ConfigError(
                f"{path}: column {name!r} has type {t}, which cannot be read as text: {e}"
            ) from None
        try:
            col.validate(full=True)  # checks the UTF-8 of every value
            return col
        except pa.ArrowInvalid:
            col = col.cast(pa.binary())
    values = col.to_pylist()
    for i, v in enumerate(values):
        if v is not None and (problem := utf8_problem(v, f"column {name!r}")) is not None:
            problems.setdefault(i, problem)
            v = escape_text(v)
        values[i] = v if v is None or isinstance(v, str) else v.decode("utf-8")
    return pa.chunked_array([pa.array(values, pa.string())])


def make_input_shards(urls: list[str | Store], rows_per_shard: int, dest: str | Path | Store) -> list[str]:
    """Split the URL lists into Arrow IPC shards with a global `key` and `TEXT_PROBLEM` (null, or why the
    row's text is not valid Unicode); deterministic; reused if present."""
    dest = Store.at(dest)
    success = dest / "_SUCCESS.json"
    fingerprint = {"inputs": [layout.sha256_file(u) for u in urls], "rows_per_shard": rows_per_shard}
    if success.exists() and (done := success.read_json()).get("fingerprint") == fingerprint:
        return done["shards"]
    tables = []
    for u in urls:  # first: a bad list fails before anything is written
        table, problems = read_url_list_rows(u)
        tables.append(table.append_column(TEXT_PROBLEM, pa.array(problems, pa.string())))
    dest.delete()
    dest.mkdir()
    table = layout.concat(tables) if tables else pa.table({"url": [], "caption": []})
    n = table.num_rows
    keys = pa.array([f"{i:0{KEY_DIGITS}d}" for i in range(n)], pa.string())
    table = table.add_column(0, "key", keys)
    names = []
    for s, start in enumerate(range(0, n, rows_per_shard)):
        name = layout.shard_name(s)
        layout.write_arrow(dest / f"{name}.arrow", table.slice(start, rows_per_shard))
        names.append(name)
    success.write_json({"fingerprint": fingerprint, "shards": names, "rows": n})
    return names


# ----------------------------------------------------------------------------- one shard


def _resizer(cfg: DownloadConfig, max_pixels: int):
    from img2dataset.resizer import Resizer

    class GuardedResizer(Resizer):
        """img2dataset's resizer behind a header check (no full decode of decompression bombs)."""

        def __call__(self, img_stream, blurring_bbox_list=None):
            data = img_stream.read()
            try:
                check_image_header(data, max_pixels)
                # EXIF orientation and 16-bit samples: OpenCV (IMREAD_UNCHANGED) ignores the first
                # and clips the second; hand it an equivalent 8-bit, upright PNG instead.
                fixed = normalise_image(data)
            except ValueError as e:
                return None, None, None, None, None, str(e)
            except Exception as e:  # a decoder failure is a rejected row, never a failed shard
                return None, None, None, None, None, layout.error_detail(e)
            img_stream = io.BytesIO(fixed) if fixed is not None else img_stream
            img_stream.seek(0)
            return super().__call__(img_stream, blurring_bbox_list)

    return GuardedResizer(
        image_size=cfg.image_size,
        resize_mode="keep_ratio_largest",
        resize_only_if_bigger=True,
        encode_format=cfg.encode_format,
        encode_quality=cfg.encode_quality,
    )


def download_one_shard(
    name: str, in_dir: str | Store, out_dir: str | Store, cfg_dict: dict[str, Any], max_pixels: int
) -> dict:
    """Download one input shard with img2dataset and write kept/rejected rows (runs in a Ray task)."""
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    from img2dataset.downloader import Downloader

    cfg: DownloadConfig = from_dict(DownloadConfig, cfg_dict, "download")
    out = Store.at(out_dir)
    if layout.done_marker(out, name).exists():
        return layout.stats_path(out, name).read_json()
    t0 = time.monotonic()
    table = layout.read_arrow(Store.at(in_dir) / f"{name}.arrow")
    rows_in = table.num_rows
    # Rows whose text is not valid Unicode (`read_url_list`): rejected before anything else.
    if TEXT_PROBLEM not in table.column_names:  # input shards written before the column existed
        table = table.append_column(TEXT_PROBLEM, pa.nulls(rows_in, pa.string()))
    bad_text = table.column(TEXT_PROBLEM).is_valid()
    invalid = table.filter(bad_text)
    invalid = layout.with_reason(invalid.drop_columns([TEXT_PROBLEM]), INVALID_UNICODE,
                                 invalid.column(TEXT_PROBLEM).to_pylist())  # fmt: skip
    table = table.filter(pc.invert(bad_text)).drop_columns([TEXT_PROBLEM])
    extras = [c for c in table.column_names if c not in ("key", "url", "caption")]

    policy = AddressPolicy(cfg.allow_private)
    max_seconds = cfg.total_timeout_s if cfg.total_timeout_s is not None else max(cfg.timeout_s * 3, 30.0)
    install_guarded_opener(policy, Limits(cfg.max_response_bytes, max_seconds))
    vet = UrlVetter(policy)
    refused = [vet(url) for url in table.column("url").to_pylist()]
    ok_mask = pa.array([r is None for r in refused], pa.bool_())
    allowed = table.filter(ok_mask)
    refused_rows = table.filter(pc.invert(ok_mask))
    refused_detail = [r for r in refused if r is not None]

    with tempfile.TemporaryDirectory(prefix=f"breen-download-{name}-") as work:
        if allowed.num_rows:
            kept, failed = _run_img2dataset(allowed, extras, cfg, max_pixels, Path(work), Downloader)
        else:
            kept, failed = _empty_results(allowed, extras)

    # Accounting: every allowed row must come back from img2dataset, once.
    seen = set(kept.column("key").to_pylist()) | set(failed.column("key").to_pylist())
    lost = allowed.filter(pa.array([k not in seen for k in allowed.column("key").to_pylist()], pa.bool_()))
    rejected = layout.concat([
        invalid,
        layout.with_reason(refused_rows, "url_refused", refused_detail),
        failed,
        layout.with_reason(lost, "download_error", "row lost inside img2dataset"),
    ])  # fmt: skip
    rejected = rejected.sort_by("key")
    kept = kept.sort_by("key")
    seconds = time.monotonic() - t0
    return layout.write_shard(
        out, name, kept, rejected, rows_in,
        extra_stats={"seconds": round(seconds, 3), "image_bytes": int(pc.sum(
            pc.binary_length(kept.column("image"))).as_py() or 0)},
    )  # fmt: skip


def _empty_results(allowed: pa.Table, extras: list[str]) -> tuple[pa.Table, pa.Table]:
    base = allowed.select(["key", "url", "caption"]).slice(0, 0)
    kept = base.append_column("image", pa.array([], pa.binary()))
    for c in ("width", "height", "original_width", "original_height"):
        kept = kept.append_column(c, pa.array([], pa.int32()))
    kept = kept.append_column("sha256", pa.array([], pa.string()))
    for c in extras:
        kept = kept.append_column(c, pa.array([], pa.string()))
    failed = layout.with_reason(allowed.select(["key", "url", "caption", *extras]).slice(0, 0), [], [])
    return kept, failed


class CollectingWriter:
    """img2dataset sample writer that keeps rows in memory (we write the shard ourselves, once)."""

    def __init__(self, sink: list[dict], shard_id, output_folder, save_caption, oom_shard_count, schema, fmt):
        self.sink, self.schema, self.fmt = sink, schema.append(pa.field(fmt, pa.binary())), fmt

    def write(self, img_str, key, caption, meta) -> None:
        self.sink.append({**meta, self.fmt: img_str})

    def close(self) -> None:
        pass

    def table(self) -> pa.Table:
        return pa.Table.from_pylist(self.sink, schema=self.schema)


def _run_img2dataset(allowed, extras, cfg, max_pixels, work, Downloader):
    """Run img2dataset's Downloader on the allowed rows; return (kept, failed-with-reason)."""
    src = allowed.rename_columns(["_key" if c == "key" else c for c in allowed.column_names])
    column_list = ["url", "caption", "_key", *extras]
    shard_file = work / "input.arrow"
    with ipc.new_file(shard_file, src.schema) as w:
        w.write_table(src)
    rows: list[dict] = []
    writers: list[CollectingWriter] = []
    downloader = Downloader(
        sample_writer_class=lambda *args: writers.append(CollectingWriter(rows, *args)) or writers[-1],
        resizer=_resizer(cfg, max_pixels),
        thread_count=cfg.threads_per_shard,
        save_caption=False,
        extract_exif=False,
        output_folder=str(work),
        column_list=column_list,
        timeout=cfg.timeout_s,
        number_sample_per_shard=max(src.num_rows, 2),
        oom_shard_count=5,
        compute_hash="sha256",
        verify_hash_type=None,
        encode_format=cfg.encode_format,
        retries=cfg.retries,
        user_agent_token=None,
        disallowed_header_directives=None,
    )
    downloader.download_shard((0, str(shard_file)))
    res = writers[0].table()
    # img2dataset's own key is shard-local; ours is the global input row number.
    res = res.drop_columns(["key"])
    res = res.rename_columns(["key" if c == "_key" else c for c in res.column_names])
    res = res.rename_columns(["image" if c == cfg.encode_format else c for c in res.column_names])
    status = res.column("status").to_pylist()
    ok = pa.array([s == "success" for s in status], pa.bool_())
    base = ["key", "url", "caption"]
    kept_cols = [*base, "image", "width", "height", "original_width", "original_height", "sha256", *extras]
    kept = res.filter(ok).select(kept_cols)
    bad = res.filter(pc.invert(ok))
    messages = bad.column("error_message").to_pylist()
    reasons = [_failure_reason(s, m) for s, m in zip(bad.column("status").to_pylist(), messages, strict=True)]
    failed = layout.with_reason(bad.select([*base, *extras]), reasons, messages)
    return kept, failed


def _failure_reason(status: str, message: str | None) -> str:
    """img2dataset's status -> our reason (a redirect or connection the guard refused is url_refused)."""
    if status != "failed_to_download":
        return "decode_error"
    return "url_refused" if (message or "").startswith(URL_REFUSED_MARK) else "download_error"


# ----------------------------------------------------------------------------- the step


def run(cfg: PrepareConfig) -> dict[str, Any]:
    """Run the download step for `cfg` on the current (or an embedded) Ray cluster."""
    if not cfg.input.urls:
        raise ConfigError(f"{cfg.source}: input.urls: no URL list given")
    out = cfg.out / STEP
    in_dir = out / "_input"
    urls = [cfg.location(u, f"input.urls[{i}]") for i, u in enumerate(cfg.input.urls)]
    inputs = [{"path": str(u), "sha256": layout.sha256_file(u)} for u in urls]
    config = {"download": output_fields(cfg.download), "max_pixels": cfg.filter.max_pixels}
    with runner.open_step(cfg, STEP, config, {"urls": [i["sha256"] for i in inputs]}) as output:
        return _run(cfg, output, urls, inputs, in_dir)


def _run(cfg: PrepareConfig, output: Any, urls: list[Store], inputs: list[dict[str, Any]], in_dir: Store
         ) -> dict[str, Any]:  # fmt: skip
    import ray

    out = output.dataset
    names = make_input_shards(urls, cfg.download.rows_per_shard, in_dir)
    raystart.init_ray(cfg.ray.address, cfg.ray.num_cpus)
    todo = runner.todo_shards(output, names)
    print(f"[{STEP}] {len(names)} input shards, {len(names) - len(todo)} already finished", flush=True)
    task = ray.remote(download_one_shard).options(
        num_cpus=cfg.download.cpus_per_shard,
        max_retries=cfg.download.max_shard_retries,
        retry_exceptions=True,
    )
    cfg_dict = to_dict(cfg.download)
    _, failed = runner.run_tasks(
        STEP, task, todo, in_dir, out, cfg_dict, cfg.filter.max_pixels, keep_going=True
    )
    manifest = runner.finish_step(output, inputs, {"download": cfg_dict, "max_pixels": cfg.filter.max_pixels})
    if failed:
        raise RuntimeError(f"{STEP}: {len(failed)} shard(s) failed ({sorted(failed)}); finished shards are kept, "
                           "relaunch the same command to retry only the failed ones")  # fmt: skip
    return manifest


def main(argv: list[str] | None = None) -> int:
    return cli.step_main(__doc__, run, ("download",), argv)


if __name__ == "__main__":
    sys.exit(main())
