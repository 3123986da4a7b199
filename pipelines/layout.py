"""The on-disk contract of a step dataset: file names, completion markers, stats, Parquet I/O, manifests.

A dataset directory (one per step, e.g. `<output_dir>/filter/`, on local disk or an object store: every
location is a `breen.storage.Store`) holds:

    part-00000.parquet          kept rows of input shard 00000
    rejected/part-00000.parquet dropped rows, with `reason` and `detail` columns
    part-00000.stats.json       per-shard counts, timings, fingerprint, the sha256 and size of the shard's
                                files and of the upstream files it was made from
    part-00000.done             completion marker, written last
    fingerprint.json            what the dataset is made from (`pipelines.fingerprint`), written first
    manifest.json               inputs with checksums, resolved config, versions, counts, fingerprint
    _lease.json                 while a run writes the dataset: its lease (`breen.lease`)

A shard is finished only when its `.done` marker exists, and the marker is written last. On local disk
every file is written to a temporary name and renamed; on an object store each object is one PUT (all or
nothing). A killed step may leave a shard's data without its marker: a relaunch redoes that shard and
overwrites it, so only finished shards are ever read downstream. A step schedules the shards whose
marker a listing does not show (one listing, not a request per shard); each worker then reads its
shard's marker directly before skipping it, so a lagging listing costs a check, never a skipped shard.
Downstream, a listing with fewer finished shards than the upstream manifest counts is an error.
Invariant checked on every shard: rows_in == kept + sum(rejected by reason) (`pipelines.accounting`).

Integrity on read: Parquet files are written with page checksums (CRC32) and read with them verified, and a
file that cannot be read raises `CorruptShard` naming it; `pipelines.verify` checks whole files against the
sha256 in their stats. A step's finished shard is redone when its size no longer matches its stats.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import subprocess
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from importlib import metadata
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from breen import envlock
from breen.storage import Location, Store, temporary_name
from pipelines import accounting, fingerprint

REJECTED = "rejected"
REJECT_FIELDS = [pa.field("reason", pa.string()), pa.field("detail", pa.string())]


class CorruptShard(RuntimeError):
    """A dataset file that cannot be read or does not match its recorded size or checksum."""


# ----------------------------------------------------------------------------- names and markers


def shard_name(index: int) -> str:
    return f"part-{index:05d}"


def done_marker(dataset: Location, name: str) -> Store:
    dataset = Store.at(dataset)
    return dataset / f"{name}.done"


def stats_path(dataset: Location, name: str) -> Store:
    dataset = Store.at(dataset)
    return dataset / f"{name}.stats.json"


def finished_shards(dataset: Location) -> list[str]:
    """Names of shards whose completion marker exists, sorted."""
    dataset = Store.at(dataset)
    return [n[: -len(".done")] for n in dataset.names(".done") if n.startswith("part-")]


def unfinished(dataset: Location, names: Iterable[str]) -> list[str]:
    """The shards of `names` without a completion marker (one listing, not one request per shard)."""
    dataset = Store.at(dataset)
    done = set(finished_shards(dataset))
    return [n for n in names if n not in done]


def _read_json_or_none(path: Store) -> dict[str, Any] | None:
    try:
        return path.read_json()
    except (FileNotFoundError, ValueError):
        return None


def _parallel(fn: Callable[[Any], Any], items: list[Any]) -> list[Any]:
    """`fn` over `items` in threads (object stores answer many small reads at once), in order."""
    if len(items) < 8:
        return [fn(i) for i in items]
    with ThreadPoolExecutor(max_workers=32) as pool:
        return list(pool.map(fn, items))


def read_stats(dataset: Location, names: Iterable[str] | None = None) -> list[dict[str, Any]]:
    dataset = Store.at(dataset)
    names = finished_shards(dataset) if names is None else list(names)
    return _parallel(lambda n: stats_path(dataset, n).read_json(), names)


def read_stats_many(root: Location, shards: list[tuple[str, str]]) -> list[dict[str, Any] | None]:
    """Stats of (dataset, shard) pairs under `root` (None where absent), read in parallel."""
    root = Store.at(root)
    return _parallel(lambda d_n: _read_json_or_none(stats_path(root / d_n[0], d_n[1])), shards)


# ----------------------------------------------------------------------------- Parquet through the store


class _Checksummed(io.RawIOBase):
    """A write-only stream that forwards to `raw` and keeps the sha256 and size of what passed."""

    def __init__(self, raw: Any) -> None:
        super().__init__()
        self.raw, self.sha256, self.size = raw, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        data = bytes(data)
        self.sha256.update(data)
        self.size += len(data)
        self.raw.write(data)
        return len(data)

    def tell(self) -> int:
        return self.size


def write_table(
    path: Location, table: pa.Table, metadata: dict[str, str] | None = None, row_group_size: int = 1024
) -> dict[str, Any]:
    """Write a Parquet file (with page checksums) and return its {"bytes", "sha256"}, computed while
    writing: under a temporary name then renamed on local disk, streamed as one object (completed only
    when the file is whole) on an object store."""
    path = Store.at(path)
    if metadata:
        merged = dict(table.schema.metadata or {})
        merged.update({k.encode(): v.encode() for k, v in metadata.items()})
        table = table.replace_schema_metadata(merged)
    # Encoded images are already compressed: store them as is; zstd for everything else.
    codecs = {f.name: "none" if f.name == "image" else "zstd" for f in table.schema}
    options = {"compression": codecs, "row_group_size": row_group_size, "write_page_checksum": True}
    if path.local:
        path.parent.mkdir()
        tmp = temporary_name(path.path)
        with open(tmp, "wb") as raw:
            sink = _Checksummed(raw)
            pq.write_table(table, sink, **options)
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path.path)
    else:
        with path.fs.open_output_stream(path.path) as raw:
            sink = _Checksummed(raw)
            pq.write_table(table, sink, **options)
    return {"bytes": sink.size, "sha256": sink.sha256.hexdigest()}


def _named(files: list[Store], err: Exception) -> CorruptShard:
    what = files[0] if len(files) == 1 else f"one of {len(files)} files from {files[0]}"
    return CorruptShard(f"{what}: cannot be read ({type(err).__name__}: {err}); `python -m pipelines.verify "
                        f"{files[0].parent.parent if files[0].parent.name == REJECTED else files[0].parent}` names "
                        "the damaged files")  # fmt: skip


def read_table(path: Location | list[Location], columns: list[str] | None = None, **kwargs: Any) -> pa.Table:
    """`pyarrow.parquet.read_table` of one file or several (on one filesystem), page checksums verified;
    `CorruptShard` naming the file when it cannot be read."""
    files = [Store.at(f) for f in (path if isinstance(path, list) else [path])]
    where = [f.path for f in files] if isinstance(path, list) else files[0].path
    try:
        return pq.read_table(where, columns=columns, filesystem=files[0].fs, page_checksum_verification=True,
                             **kwargs)  # fmt: skip
    except FileNotFoundError:
        raise
    except (pa.ArrowInvalid, OSError) as e:
        if len(files) > 1:  # name the damaged one
            for f in files:
                try:
                    pq.read_table(f.path, columns=columns, filesystem=f.fs, page_checksum_verification=True)
                except (pa.ArrowInvalid, OSError) as one:
                    raise _named([f], one) from None
        raise _named(files, e) from None


def read_schema(path: Location) -> pa.Schema:
    path = Store.at(path)
    return pq.read_schema(path.path, filesystem=path.fs)


def num_rows(path: Location) -> int:
    path = Store.at(path)
    try:
        with path.fs.open_input_file(path.path) as f:
            return pq.read_metadata(f).num_rows
    except FileNotFoundError:
        raise
    except (pa.ArrowInvalid, OSError) as e:
        raise _named([path], e) from None


def write_arrow(path: Location, table: pa.Table) -> None:
    """An Arrow IPC file (the steps' private input shards), written all or nothing."""
    path = Store.at(path)
    import pyarrow.ipc as ipc

    sink = pa.BufferOutputStream()
    with ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    path.write_bytes(sink.getvalue().to_pybytes())


def read_arrow(path: Location) -> pa.Table:
    path = Store.at(path)
    import pyarrow.ipc as ipc

    return ipc.open_file(pa.py_buffer(path.read_bytes())).read_all()


def with_reason(
    table: pa.Table, reason: str | list[str], detail: str | list[str | None] | None = None
) -> pa.Table:
    """Append `reason`/`detail` columns (a constant or one value per row)."""
    n = table.num_rows
    reasons = [reason] * n if isinstance(reason, str) else reason
    details = [detail] * n if detail is None or isinstance(detail, str) else detail
    table = table.append_column(REJECT_FIELDS[0], pa.array(reasons, pa.string()))
    return table.append_column(REJECT_FIELDS[1], pa.array(details, pa.string()))


def error_detail(e: BaseException, limit: int = 300) -> str:
    """A short, deterministic description of an exception (no memory addresses)."""
    return re.sub(r" at 0x[0-9a-fA-F]+", "", f"{type(e).__name__}: {e}")[:limit]


def concat(tables: list[pa.Table]) -> pa.Table:
    tables = [t for t in tables if t is not None]
    return pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]


def write_shard(
    dataset: Location,
    name: str,
    kept: pa.Table,
    rejected: pa.Table,
    rows_in: int,
    extra_stats: dict[str, Any] | None = None,
    metadata: dict[str, str] | None = None,
    inputs: Iterable[Location] = (),
) -> dict[str, Any]:
    """Write one finished shard: kept rows, rejected rows, stats, then the marker.

    Checks the accounting invariant before anything becomes visible. The dataset's fingerprint (its
    `fingerprint.json`, recorded when the step started) goes into the files' metadata and the stats, with
    each file's size and sha256, and the sha256 of the upstream files `inputs` it was made from (from their
    own stats), so a later run can tell when an upstream file was redone since.
    """
    dataset = Store.at(dataset)
    reasons = Counter(rejected.column("reason").to_pylist()) if rejected.num_rows else Counter()
    if rows_in != kept.num_rows + rejected.num_rows:
        raise accounting.AccountingError(
            f"{dataset.name}/{name}: rows_in={rows_in} but kept={kept.num_rows} + rejected={rejected.num_rows}"
        )
    record = fingerprint.recorded(dataset)
    if record is None:
        raise RuntimeError(f"{dataset}: no {fingerprint.SPEC_FILE}: a step writes shards only after "
                           "`pipelines.fingerprint.open_output`")  # fmt: skip
    fp = record["fingerprint"]
    metadata = {**(metadata or {}), fingerprint.META_KEY: fp}
    files = {
        f"{REJECTED}/{name}.parquet": write_table(dataset / REJECTED / f"{name}.parquet", rejected, metadata),
        f"{name}.parquet": write_table(dataset / f"{name}.parquet", kept, metadata),
    }
    stats = {
        "shard": name,
        "rows_in": rows_in,
        "kept": kept.num_rows,
        "rejected": dict(sorted(reasons.items())),
        **(extra_stats or {}),
        "fingerprint": fp,
        "files": files,
        "inputs": input_checksums(dataset.parent, inputs),
    }
    stats_path(dataset, name).write_json(stats)
    done_marker(dataset, name).write_bytes(b"")
    return stats


def input_checksums(root: Store, files: Iterable[Location]) -> dict[str, str | None]:
    """{path relative to `root`: sha256} of upstream dataset files, from their datasets' stats."""
    rels = sorted({Store.at(f).relative_to_dir(root) for f in files})
    keys = [(rel.rpartition("/")[0], rel.rpartition("/")[2].split(".")[0]) for rel in rels]
    out = {}
    for rel, (up, _), stats in zip(rels, keys, read_stats_many(root, keys), strict=True):
        out[rel] = ((stats or {}).get("files", {}).get(rel[len(up) + 1 :]) or {}).get("sha256")
    return out


def damaged_shards(dataset: Location, names: Iterable[str]) -> dict[str, str]:
    """{shard: why} for finished shards whose files are missing or differ in size from their stats (one
    listing: cheap enough to run at every step start; `pipelines.verify` also compares checksums)."""
    dataset = Store.at(dataset)
    names = list(names)
    sizes = dataset.sizes(".parquet") if names else {}
    out = {}
    for name, stats in zip(names, read_stats_many(dataset.parent, [(dataset.name, n) for n in names]),
                           strict=True):  # fmt: skip
        if stats is None:
            out[name] = f"{name}.stats.json is missing or unreadable"
            continue
        for rel, entry in stats.get("files", {}).items():
            if rel not in sizes:
                out[name] = f"{rel} is missing"
            elif sizes[rel] != entry["bytes"]:
                out[name] = f"{rel} is {sizes[rel]} bytes, its stats say {entry['bytes']}"
    return out


# ----------------------------------------------------------------------------- manifest


def sha256_file(path: str | Path | Store, chunk: int = 1 << 20) -> str:
    """SHA-256 of a file on local disk or an object store (streamed)."""
    store = Store.at(path)
    h = hashlib.sha256()
    with store.fs.open_input_stream(store.path) as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def code_version() -> str:
    """Git commit of the code (with '-dirty' when modified), or the package version."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5
        )
        if sha.returncode == 0:
            return sha.stdout.strip()
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        return "breen-pipeline " + metadata.version("breen-pipeline")
    except metadata.PackageNotFoundError:
        return "unknown"


def write_manifest(
    dataset: Location,
    step: str,
    inputs: list[dict[str, Any]],
    config: dict[str, Any],
    fp: str,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Write `manifest.json` (only when its content changed, so reruns leave it byte-identical): the step's
    completion record, for fingerprint `fp`. Every finished shard must carry that fingerprint."""
    dataset = Store.at(dataset)
    stats = read_stats(dataset)
    mixed = [s["shard"] for s in stats if s.get("fingerprint") != fp]
    if mixed:
        raise fingerprint.FingerprintMismatch(f"{dataset}: shards {mixed[:3]} carry another fingerprint than "
                                              f"{fp:.12}; rerun with --redo")  # fmt: skip
    manifest = {
        "step": step,
        "inputs": inputs,
        "config": config,
        "versions": envlock.environment(),
        "code_version": code_version(),
        "counts": accounting.summarize(stats),
        "fingerprint": fp,
        **(extra or {}),
    }
    write_json_if_changed(dataset / "manifest.json", manifest)
    return manifest


def write_json_if_changed(path: Location, obj: Any) -> None:
    """Write `obj` as JSON unless the file already holds exactly that (reruns change no byte and, on an
    object store, no object)."""
    path = Store.at(path)
    text = json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n"
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def dataset_input(dataset: Location) -> dict[str, Any]:
    """Describe an upstream dataset directory as a manifest input (checksum of its manifest)."""
    dataset = Store.at(dataset)
    m = dataset / "manifest.json"
    return {"path": str(dataset), "manifest_sha256": sha256_file(m) if m.exists() else None,
            "shards": len(finished_shards(dataset))}  # fmt: skip


def require_dataset(dataset: Location, produced_by: str) -> list[str]:
    """The finished shards of an upstream dataset, or a clear error if there are none."""
    dataset = Store.at(dataset)
    names = finished_shards(dataset)
    if not names:
        raise FileNotFoundError(
            f"no finished shards in {dataset} (expected the output of the `{produced_by}` step; run it first)"
        )
    manifest = dataset / "manifest.json"
    claimed = manifest.read_json()["counts"]["shards"] if manifest.exists() else 0
    if len(names) < claimed:  # a listing that lags behind the writes (a store without consistent listing)
        raise RuntimeError(f"{dataset}: the listing shows {len(names)} finished shards but its manifest counts "
                           f"{claimed}; retry when the store's listing has caught up")  # fmt: skip
    return names
