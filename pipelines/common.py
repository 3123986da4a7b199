"""Dataset directories, shard bookkeeping, Ray start-up and progress shared by every step.

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
Invariant checked on every shard: rows_in == kept + sum(rejected by reason).

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
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from breen import envlock
from breen.lease import LeaseHeld
from breen.storage import Location, Store, temporary_name
from pipelines import fingerprint

REJECTED = "rejected"
REJECT_FIELDS = [pa.field("reason", pa.string()), pa.field("detail", pa.string())]


class AccountingError(RuntimeError):
    """Rows were lost or duplicated: rows_in != kept + rejected."""


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
        raise AccountingError(
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


def summarize(stats: list[dict[str, Any]]) -> dict[str, Any]:
    rejected: Counter[str] = Counter()
    for s in stats:
        rejected.update(s["rejected"])
    return {
        "shards": len(stats),
        "rows_in": sum(s["rows_in"] for s in stats),
        "kept": sum(s["kept"] for s in stats),
        "rejected": dict(sorted(rejected.items())),
        "rejected_total": sum(rejected.values()),
    }


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
        "counts": summarize(stats),
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


# ----------------------------------------------------------------------------- progress


@dataclass
class Progress:
    """Prints rows/s and ETA while shards finish (at most every `every` seconds)."""

    step: str
    total_shards: int
    every: float = 5.0
    done_shards: int = 0
    rows: int = 0
    start: float = field(default_factory=time.monotonic)
    _last: float = 0.0

    def update(self, rows: int, force: bool = False) -> None:
        self.done_shards += 1
        self.rows += rows
        now = time.monotonic()
        if force or now - self._last >= self.every or self.done_shards == self.total_shards:
            self._last = now
            elapsed = max(now - self.start, 1e-6)
            rate = self.rows / elapsed
            left = self.total_shards - self.done_shards
            eta = elapsed / self.done_shards * left if self.done_shards else float("nan")
            print(
                f"[{self.step}] {self.done_shards}/{self.total_shards} shards, {self.rows} rows, "
                f"{rate:.1f} rows/s, elapsed {elapsed:.0f}s, ETA {eta:.0f}s",
                flush=True,
            )


def open_step(cfg: Any, step: str, config: dict[str, Any], external: dict[str, Any] | None = None
              ) -> fingerprint.Output:  # fmt: skip
    """Start writing `step`'s dataset under `cfg.out` (`pipelines.fingerprint.open_output`): its spec is
    the fingerprints of the upstream datasets `pipelines.graph` says it reads (each must be complete),
    the `external` inputs' checksums, `config` and the step module's code. `cfg.redo` (``--redo``)
    recomputes a dataset made from another spec; `cfg.wait_s` (``--wait``) waits for another run's lease."""
    from pipelines import graph

    upstream = graph.upstream(step)
    inputs = {u: fingerprint.upstream(cfg.out / u, u) for u in upstream}
    spec = fingerprint.spec(step, {**inputs, **(external or {})}, config, graph.step(step).module)
    return fingerprint.open_output(cfg.out / step, spec, redo=cfg.redo, wait_s=cfg.wait_s,
                                   reads=tuple(cfg.out / u for u in upstream))  # fmt: skip


def todo_shards(output: fingerprint.Output, names: list[str], also: tuple[Store, ...] = ()) -> list[str]:
    """The shards of `names` this run must (re)do: those without a marker, plus finished ones whose files
    are damaged (size differs from their stats) or whose upstream files were redone since (their markers
    are removed, with a line saying why; and from the step's private datasets `also`, when the upstream
    changed)."""
    dataset = output.dataset
    finished = [n for n in names if n in set(finished_shards(dataset))]
    redo = damaged_shards(dataset, finished)
    for name in fingerprint.stale_shards(dataset, output.fingerprint, finished):
        redo[name] = "an upstream file it was made from was redone since"
        for private in also:
            done_marker(private, name).delete()
    for name, why in sorted(redo.items()):
        print(f"[{output.spec['step']}] redoing {dataset / name}: {why}", flush=True)
        done_marker(dataset, name).delete()
    return unfinished(dataset, names)


def finish_step(
    output: fingerprint.Output,
    inputs: list[dict[str, Any]],
    config: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """End of a step: write the manifest (the lease still ours), print the accounting, return the manifest."""
    output.check()
    manifest = write_manifest(output.dataset, output.spec["step"], inputs, config, output.fingerprint, extra)
    print_accounting(output.dataset.name, manifest["counts"])
    return manifest


def print_accounting(step: str, counts: dict[str, Any]) -> None:
    print(
        f"[{step}] rows in {counts['rows_in']} = kept {counts['kept']} + rejected {counts['rejected_total']}"
    )
    for reason, n in counts["rejected"].items():
        print(f"[{step}]     rejected {reason}: {n}")


# ----------------------------------------------------------------------------- Ray


# Ray 2.60 bug: a worker that the raylet ends for being idle sometimes aborts in its own shutdown
# ("Mutex corrupt: waiting writer with no waiters", SIGABRT in the OpenCensus metrics thread of
# _raylet.so; 4 aborts in about 310 idle exits measured, with pyarrow 25.0.0 and 26.0.1 alike, so no
# package pin avoids it). No task runs in that worker then, so nothing is lost, but the log shows a
# fatal error. The embedded cluster lives only as long as its driver, so it keeps idle workers instead
# of ending them: no idle exits, no such abort (README "Known upstream issues").
EMBEDDED_SYSTEM_CONFIG = {"idle_worker_killing_time_threshold_ms": 24 * 3600 * 1000}


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Attach to a cluster (address, RAY_ADDRESS, or a job's cluster) or start an embedded one."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    root = str(Path(__file__).resolve().parent.parent)
    env = {
        "env_vars": {"NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONPATH": root},
        "worker_process_setup_hook": "pipelines.common.quiet_embedded_ray",
    }
    if address or os.environ.get("RAY_ADDRESS"):
        # A cluster (or a `ray job submit` job): keep the job's runtime env (working_dir) as it is.
        ray.init(address=address or os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        ray.init(
            address="local",
            num_cpus=num_cpus or max(4, os.cpu_count() or 1),
            include_dashboard=False,
            runtime_env=env,
            log_to_driver=True,
            _system_config=EMBEDDED_SYSTEM_CONFIG,
        )
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = sys.stderr.isatty()
    ctx.execution_options.verbose_progress = False


# Ray Train loggers that only warn about what an embedded Ray lacks on purpose (see `quiet_embedded_ray`).
EMBEDDED_QUIET_LOGGERS = (
    # no dashboard, hence no state API: the placement-group cleaner warns every second that it cannot
    # query the controller (harmless: the embedded cluster ends with the driver)
    "ray.train.v2._internal.execution.controller.placement_group_cleaner",
    # no autoscaler: under CPU load the 5 s request to the autoscaling coordinator times out and logs a
    # warning with a traceback, though there is nothing to scale
    "ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client",
)


def quiet_embedded_ray() -> None:
    """Worker setup hook of the embedded Ray: `EMBEDDED_QUIET_LOGGERS` pass errors only. A filter, not a
    level: Ray Train's controller configures the ``ray.train`` logger with `logging.config.dictConfig`
    after this hook, which resets its child loggers' levels (but keeps their filters)."""
    import logging

    def errors_only(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR

    for name in EMBEDDED_QUIET_LOGGERS:
        logger = logging.getLogger(name)
        if errors_only.__name__ not in {getattr(f, "__name__", "") for f in logger.filters}:
            logger.addFilter(errors_only)


def run_shards(
    step: str,
    names: list[str],
    worker_cls: type,
    worker_kwargs: dict[str, Any],
    *,
    num_actors: int,
    num_cpus: float,
    num_gpus: float = 0.0,
) -> list[dict[str, Any]]:
    """Process shards with a fixed-size Ray Data actor pool, one shard per call.

    `worker_cls(**worker_kwargs)` is built once per actor; calling it with a batch
    `{"shard": [name]}` processes that shard (skipping it if already done) and returns
    `{"stats": [json]}`. Returns the per-shard stats, in shard order.
    """
    import ray

    progress = Progress(step, len(names))
    if not names:
        print(f"[{step}] nothing to do: every shard is finished", flush=True)
        return []
    ds = ray.data.from_items([{"shard": n} for n in names], override_num_blocks=len(names))
    ds = ds.map_batches(
        worker_cls,
        fn_constructor_kwargs=worker_kwargs,
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=min(num_actors, len(names))),
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        batch_format="pyarrow",
        zero_copy_batch=True,
    )
    results = []
    for row in ds.iter_rows():
        stats = json.loads(row["stats"])
        results.append(stats)
        progress.update(stats["rows_in"])
    return sorted(results, key=lambda s: s["shard"])


class ShardWorker:
    """Base class for per-shard actors: subclasses implement `process(name) -> stats`."""

    def __init__(self, in_dir: Store, out_dir: Store) -> None:
        self.in_dir = Store.at(in_dir)
        self.out_dir = Store.at(out_dir)

    def process(self, name: str) -> dict[str, Any]:  # pragma: no cover - interface
        raise NotImplementedError

    def __call__(self, batch: pa.Table) -> dict[str, list[str]]:
        out = []
        for name in batch.column("shard").to_pylist():
            if done_marker(self.out_dir, name).exists():
                stats = stats_path(self.out_dir, name).read_json()
            else:
                t0 = time.monotonic()
                stats = self.process(name)
                stats.setdefault("seconds", round(time.monotonic() - t0, 3))
            out.append(json.dumps(stats))
        return {"stats": out}


def step_main(doc: str, run: Callable[[Any], Any], steps: Callable[[Any], Any] | tuple[str, ...],
              argv: list[str] | None = None) -> int:  # fmt: skip
    """Shared CLI for a step: `python -m pipelines.<step> --config FILE [--set key=value ...]` (the
    options of every command: `breen.settings`). The config and the inputs of `steps` (names of
    `pipelines.graph.STEPS`, or a function of the config giving them) are checked before `run` starts
    Ray (`pipelines.preflight`): exit code 2 on a bad one. ``--print-config`` prints the resolved config."""
    import argparse

    from breen.settings import add_config_arguments, sections_help, to_yaml
    from pipelines import preflight
    from pipelines.config import ConfigError, PrepareConfig, load_config

    main_spec = getattr(sys.modules["__main__"], "__spec__", None)
    module = run.__module__ if run.__module__ != "__main__" or main_spec is None else main_spec.name
    parser = argparse.ArgumentParser(
        prog=f"python -m {module}", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config sections and their defaults (--print-config shows a file's resolved values):\n"
        + sections_help(PrepareConfig),
    )  # fmt: skip
    add_config_arguments(parser, "pipeline YAML config (e.g. pipelines/configs/demo.yaml)", required=True)
    parser.add_argument("--redo", action="store_true",
                        help="recompute a dataset made from another config, input or code version (instead of "
                             "refusing it); finished shards of the same spec are still reused")  # fmt: skip
    parser.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                        help="when another run is writing a dataset of this step, wait up to SECONDS for it "
                             "(default: fail at once)")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        if args.print_config:
            print(to_yaml(cfg), end="")
            return 0
        cfg.redo, cfg.wait_s = args.redo, args.wait
        preflight.check(cfg, steps(cfg) if callable(steps) else steps)
        run(cfg)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (fingerprint.FingerprintMismatch, fingerprint.IncompleteUpstream, LeaseHeld, CorruptShard) as e:
        print(f"error: {e}", file=sys.stderr)
        return 3
    return 0
