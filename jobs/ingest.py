"""Ray Data ingest: training shards -> encoded micro-batches, one deterministic stream per worker.

Reads training-shard directories (local folders or ``s3://`` / ``gs://`` prefixes: `breen.storage`; the
actors stream the files from the bucket) written by `pipelines.teacher` in the `breen.shard_format` layout
(``part-NNNNN.parquet``: key, the image inline or as a reference into the download step's image store,
caption | conversations, fine [64, D] / coarse [36, D] float16 tensors). Nothing here loads CLIP: the
teacher targets are read from the shards.

Pipeline (all CPU, before the trainer, so accelerators never wait for decode)::

    from_items(plan: one item per shard file and epoch)
      -> map_batches(ReadEncode, actor pool)   read the file with pyarrow, order its rows (seeded), read
                                               the referenced images (only the row groups holding them), decode
                                               + letterbox the image and tokenise (breen.data.encode_sample)
      -> repartition(micro_batch_size rows per block, strict)
      -> streaming_split(num_workers, equal) via ray.train.get_dataset_shard("train")

Determinism. The epoch order is addressable: files are permuted with ``(seed, epoch)`` and the rows of a
file with ``(seed, epoch, file index)`` (stage 3 optionally groups them by modality), so global position
``pos`` names one sample of one epoch. With ``preserve_order`` every block of ``micro_batch_size`` rows
reaches the splitter in ``pos`` order and, all blocks being equal, the splitter deals them round robin:
worker ``r`` receives micro-batch blocks ``r, r + W, r + 2W, ...``. So optimizer step ``s`` of worker ``r``
always holds positions ``[(s*A*W + m*W + r) * B, ... + B)`` for ``m < A`` (W workers, A accumulation
steps, B micro-batch), whatever the timing; each worker checks this on every batch (`expected_pos`).

Integrity. Before Ray starts, `list_shards` compares every file's size (from the listing) with its
``part-NNNNN.stats.json`` (``files``: bytes, sha256, written by the data pipeline) and `check_shards`
checks every file's Arrow schema against `breen.shard_format` and that one directory holds one dataset
fingerprint (``breen.fingerprint``). The actors read each file's bytes once, check its sha256 against the
stats, then parse it from memory; any error reading a shard is a `ShardError` naming the file.

Data position and resume. Every step consumes exactly ``global_batch`` positions, so the data position
after ``s`` steps is ``s * global_batch``. A resumed run rebuilds the plan with that many leading positions
dropped *before* reading and decoding (whole files skipped, the first file sliced), and the round-robin
deal restarts aligned. Rejected samples (`breen.data.SampleRejected`: corrupt image, too long, ...) are
never dropped from the stream, which would shift positions: they travel as rows with ``ok = False`` and a
``reason``, the worker leaves them out of its micro-batch and counts them.

Held-out validation rows (``data.val_fraction``: `held_out_rows`). A row is held out when the sha256 of its
``key`` falls below the fraction: a pure function of the key, so the same rows are held out whatever the
seed, the worker count, the file order or a resume, and the split needs no extra pass over the data at
shard time (it is equivalent to choosing it there: the shard files and their keys fix it). `hold_out`
records them per file (`ShardFile.held_out`); the training stream never sees them: positions count only
the other rows (`ShardFile.train_rows`), and `ReadEncode` drops the held-out rows of a file before ordering
it. `validation_items` lists the rows `jobs.validation` evaluates (held-out rows, or every row of the
``data.val_paths`` shards).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from ray.data.collate_fn import NumpyBatchCollateFn

from breen import shard_format as sf
from breen.config import BreenConfig
from breen.data import SampleRejected, collate, encode_sample, pack
from breen.storage import Store, fetch_dir
from pipelines.fingerprint import META_KEY as META_FINGERPRINT
from pipelines.layout import stats_path

# `breen.data.SampleRejected` reasons (plus our own "other"), coded as integers in worker batches.
REJECT_REASONS = (
    "decode_error", "image_too_large", "image_exceeds_max_length", "question_exceeds_max_length",
    "empty_text", "no_answer_after_truncation", "bad_conversation", "placeholder_without_image",
    "targets_without_image", "bad_target", "other",
)  # fmt: skip
READ_COLUMNS = (
    sf.KEY,
    sf.IMAGE,
    sf.IMAGE_SHARD,
    sf.IMAGE_ROW,
    sf.CAPTION,
    sf.CONVERSATIONS,
    sf.FINE,
    sf.COARSE,
)


# ----------------------------------------------------------------------------- shard files
class ShardError(ValueError):
    """A training-shard file that cannot be read, does not match its stats or breaks the shard format;
    the message names the file."""


@dataclass(frozen=True)
class ShardFile:
    path: str  # a local path or a URI (`breen.storage`)
    rows: int
    clip_dim: int | None  # width D of fine/coarse; None when the file has no teacher columns
    columns: tuple[str, ...]
    teacher: tuple[str, ...]  # (name, weights id, preprocessing) from the Parquet metadata
    size: int | None = None  # bytes, from the directory listing
    sha256: str | None = None  # from the file's stats (``part-NNNNN.stats.json``), when they list it
    fingerprint: str | None = None  # the dataset fingerprint in the Parquet metadata, if any
    schema: pa.Schema | None = field(default=None, compare=False, repr=False)
    held_out: tuple[int, ...] = ()  # rows (file order) kept out of training for validation (`hold_out`)

    @property
    def train_rows(self) -> int:
        return self.rows - len(self.held_out)


def _recorded(d: Store, stem: str, names: dict[str, int]) -> dict[str, Any]:
    """{"bytes", "sha256"} that the stats of shard `stem` (``part-NNNNN``) record for its Parquet file
    ({} for older datasets, whose stats list no files); `names`: the directory's listing."""
    stats = stats_path(d, stem)
    if stats.name not in names:
        return {}
    try:
        entry = (stats.read_json().get("files") or {}).get(f"{stem}.parquet") or {}
    except (OSError, ValueError, AttributeError) as err:
        raise ShardError(f"{stats}: unreadable stats ({type(err).__name__}: {err})") from None
    return entry if isinstance(entry, dict) else {}


def list_shards(paths: Sequence[str | Path | Store], endpoint_override: str | None = None) -> list[ShardFile]:
    """Every finished training shard (``part-*.parquet`` with its ``.done`` marker when markers exist)
    under the given directories (local or on an object store), sorted by directory then name; sizes from
    one listing per directory, checked against the stats' ``files`` before anything else is read (a
    truncated file fails here, named), then row counts and schemas from the Parquet footers. Raises
    `ShardError` naming the file."""
    files: list[ShardFile] = []
    for i, d in enumerate(paths):
        d = Store.at(d, f"data.paths[{i}]", endpoint_override)
        names = d.sizes(recursive=False)
        parquet = sorted(n for n in names if n.startswith("part-") and n.endswith(".parquet"))
        done = {n[: -len(".done")] for n in names if n.startswith("part-") and n.endswith(".done")}
        if done:
            parquet = [n for n in parquet if n[: -len(".parquet")] in done]
        if not parquet:
            raise FileNotFoundError(f"no training shards (part-*.parquet) in {d}")
        for n in parquet:
            stem = n[: -len(".parquet")]
            recorded = _recorded(d, stem, names)
            if "bytes" in recorded and recorded["bytes"] != names[n]:
                raise ShardError(
                    f"data.paths[{i}]: {d / n} is {names[n]} bytes, its stats ({stats_path(d, stem).name}) say "
                    f"{recorded['bytes']} (truncated or replaced: redo the shards step)"
                )
            try:
                meta = sf.parquet_file(d / n)
                schema = meta.schema_arrow
            except (OSError, pa.ArrowException) as err:
                raise ShardError(f"data.paths[{i}]: {d / n}: not a readable Parquet file ({err})") from None
            files.append(ShardFile(
                (d / n).uri, meta.metadata.num_rows, sf.tensor_dim(schema), tuple(schema.names),
                sf.teacher_of(schema), size=names[n], sha256=recorded.get("sha256"),
                fingerprint=sf.metadata(schema).get(META_FINGERPRINT), schema=schema,
            ))  # fmt: skip
    return files


def _describe(tp: pa.DataType) -> str:
    if isinstance(tp, pa.FixedShapeTensorType):
        return f"fixed_shape_tensor<{tp.value_type}>{list(tp.shape)}"
    return str(tp)


def schema_problem(schema: pa.Schema) -> str | None:
    """What in a shard's Arrow schema breaks the training-shard format (`breen.shard_format`: the types of
    its columns; fine/coarse both or neither, as ``fixed_shape_tensor<float16>`` of [64, D] / [36, D] with
    one D), naming the column; None when it fits. Unknown columns are ignored; D against the model's
    clip_dim is `check_shards`' business."""
    for name, want in sf.TYPES.items():
        if name in schema.names and schema.field(name).type != want:
            return f"column {name!r} is {schema.field(name).type}, the shard format wants {want}"
    present = [c for c in sf.TENSOR_COLUMNS if c in schema.names]
    if len(present) == 1:
        return f"column {present[0]!r} without {({sf.FINE, sf.COARSE} - set(present)).pop()!r}"
    widths = set()
    for name, tokens in ((sf.FINE, sf.FINE_TOKENS), (sf.COARSE, sf.COARSE_TOKENS)):
        if name not in schema.names:
            continue
        got = schema.field(name).type
        shape = list(got.shape) if isinstance(got, pa.FixedShapeTensorType) else []
        if len(shape) != 2 or shape[0] != tokens or got.value_type != pa.float16():
            return f"column {name!r} is {_describe(got)}, the shard format wants fixed_shape_tensor<halffloat>[{tokens}, D]"
        widths.add(shape[1])
    if len(widths) > 1:
        return f"columns 'fine' and 'coarse' have different widths {sorted(widths)}"
    return None


def check_shards(
    files: Sequence[ShardFile], config: BreenConfig, text_field: str, teacher: str | None = None
) -> None:
    """Fail fast when the shards do not fit the model or the stage (teacher, clip_dim, text and target
    columns); the message names the config field and the first offending file.

    `teacher`: the expected ``breen.teacher`` metadata value of every shard with teacher columns
    (``data.teacher``); None accepts any single teacher. Also: every file's schema fits the shard format
    (`schema_problem`), and the files of one directory share one dataset fingerprint (files without a
    ``breen.fingerprint`` are accepted when no file of their directory has one: older datasets).
    """
    for f in files:
        problem = f.schema is not None and schema_problem(f.schema)
        if problem:
            raise ShardError(f"data.paths: {f.path}: {problem}")
    by_dir: dict[str, list[ShardFile]] = {}
    for f in files:
        by_dir.setdefault(str(Store.at(f.path).parent), []).append(f)
    for d, mine in by_dir.items():
        marked = [f for f in mine if f.fingerprint is not None]
        other = next((f for f in mine if marked and f.fingerprint != marked[0].fingerprint), None)
        if other is not None:
            raise ShardError(
                f"data.paths: {d} mixes datasets: {marked[0].path} has fingerprint {marked[0].fingerprint} but "
                f"{other.path} has {other.fingerprint or 'none'} (redo the shards step)"
            )
    with_targets = [f for f in files if f.clip_dim is not None]
    if teacher is not None:
        bad = [f for f in with_targets if f.teacher[0] != teacher]
        if bad:
            raise ValueError(
                f"data.teacher={teacher!r} but {bad[0].path} was made with teacher {bad[0].teacher[0]!r} "
                f"({len(bad)} of {len(with_targets)} shard files differ)"
            )
    bad = [f for f in with_targets if f.clip_dim != config.clip_dim]
    if bad:
        raise ValueError(
            f"data.paths: {bad[0].path} has teacher features of width {bad[0].clip_dim} but the model's "
            f"clip_dim is {config.clip_dim} (model.init_from was built for another teacher)"
        )
    bad = [f for f in with_targets if f.teacher != with_targets[0].teacher]
    if bad:
        raise ValueError(
            f"data.paths: shards come from different teachers: {bad[0].path} has {bad[0].teacher} but "
            f"{with_targets[0].path} has {with_targets[0].teacher}"
        )
    if text_field == "conversations":
        missing = [f.path for f in files if "conversations" not in f.columns]
        if missing:
            raise ValueError(f"data.text_field=conversations but {missing[0]} has no conversations column")
    if text_field == "caption":
        missing = [f.path for f in files if "caption" not in f.columns]
        if missing:
            raise ValueError(f"data.text_field=caption but {missing[0]} has no caption column")
        missing = [f.path for f in files if not {"fine", "coarse"} <= set(f.columns)]
        if missing:
            raise ValueError(
                f"data.text_field=caption (stages 1-2 train on teacher targets) but {missing[0]} has no "
                "fine/coarse columns"
            )


# ----------------------------------------------------------------------------- held-out validation rows
def held_out_rows(keys: Sequence[str], fraction: float) -> np.ndarray:
    """Mask of the rows held out for validation: sha256(key), its first 8 bytes read as a fraction of
    2**64, below `fraction`. Depends on the key alone (not on seed, workers, file order or resume)."""
    if fraction <= 0:
        return np.zeros(len(keys), bool)
    limit = int(fraction * 2**64)
    return np.fromiter(
        (int.from_bytes(hashlib.sha256(str(k).encode()).digest()[:8], "big") < limit for k in keys),
        bool,
        len(keys),
    )


def hold_out(files: Sequence[ShardFile], fraction: float) -> list[ShardFile]:
    """`files` with their held-out rows recorded (`held_out_rows`; reads each file's key column)."""
    if fraction <= 0:
        return list(files)
    out = []
    for f in files:
        mask = held_out_rows(sf.keys_of(f.path).to_pylist(), fraction)
        out.append(replace(f, held_out=tuple(int(i) for i in np.flatnonzero(mask))))
    return out


def validation_items(files: Sequence[ShardFile], max_rows: int, every_row: bool = False) -> list[dict[str, Any]]:
    """The validation rows to evaluate, as work items ``{"path", "sha256", "rows": [row indices]}``: the
    held-out rows of `files` (or, `every_row`, all rows: the ``data.val_paths`` shards), in file order then
    row order, at most `max_rows` in all."""
    items, left = [], max_rows
    for f in files:
        rows = list(range(f.rows)) if every_row else list(f.held_out)
        if rows and left > 0:
            items.append({"path": f.path, "sha256": f.sha256 or "", "rows": rows[:left]})
            left -= len(items[-1]["rows"])
    return items


# ----------------------------------------------------------------------------- epoch order
def file_order(num_files: int, seed: int, epoch: int) -> np.ndarray:
    return np.random.default_rng([seed, epoch]).permutation(num_files)


def row_order(
    num_rows: int,
    seed: int,
    epoch: int,
    file_index: int,
    has_image: np.ndarray | None = None,
    group_size: int = 0,
) -> np.ndarray:
    """Order of a file's rows in an epoch (a seeded permutation).

    With `has_image` and `group_size` > 0 (modality grouping): image rows and text-only rows are permuted
    separately and cut into groups of `group_size`; full groups are shuffled together, partial groups go
    last. A file of a multiple of `group_size` rows then yields single-modality micro-batches except for at
    most one mixed one at its end.
    """
    rng = np.random.default_rng([seed, epoch, file_index])
    if has_image is None or group_size <= 0:
        return rng.permutation(num_rows)
    full, partial = [], []
    for rows in (np.flatnonzero(has_image), np.flatnonzero(~has_image)):
        rows = rows[rng.permutation(len(rows))]
        cut = len(rows) - len(rows) % group_size
        full += [rows[i : i + group_size] for i in range(0, cut, group_size)]
        if cut < len(rows):
            partial.append(rows[cut:])
    full = [full[i] for i in rng.permutation(len(full))]
    parts = full + partial
    return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)


def epoch_plan(files: Sequence[ShardFile], seed: int, epochs: int, skip: int = 0) -> list[dict[str, Any]]:
    """Work items, one per (epoch, file), in stream order. ``first_pos`` is the global position of the
    file's first row in that epoch, ``rows`` / ``train_rows`` its rows with / without the held-out ones,
    ``sha256`` the file's checksum from its stats ("" when unknown); positions below `skip` (consumed
    before a resume) are dropped here, before anything is read: whole files are left out and the first
    remaining file starts at ``skip``."""
    total = total_rows(files)
    items = []
    for epoch in range(epochs):
        pos = epoch * total
        for idx in file_order(len(files), seed, epoch):
            f = files[idx]
            if f.train_rows and pos + f.train_rows > skip:
                items.append(
                    {"path": f.path, "epoch": epoch, "file_index": int(idx), "first_pos": pos,
                     "rows": f.rows, "train_rows": f.train_rows, "skip": max(0, skip - pos),
                     "sha256": f.sha256 or ""}
                )  # fmt: skip
            pos += f.train_rows
    return items


def total_rows(files: Sequence[ShardFile]) -> int:
    """Training rows (held-out validation rows excluded)."""
    return sum(f.train_rows for f in files)


def expected_pos(step: int, micro: int, rank: int, world: int, micro_batch: int, accum: int) -> int:
    """Global position of the first row of micro-batch `micro` of optimizer step `step` on `rank`."""
    return ((step * accum + micro) * world + rank) * micro_batch


# ----------------------------------------------------------------------------- read + encode
def load_tokenizer(path: str | Path):
    """A tokenizer from a local directory (a BREEN export or model directory)."""
    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # AutoTokenizer warns that config.json's model_type is unknown
    try:
        return AutoTokenizer.from_pretrained(str(path))
    finally:
        hf_logging.set_verbosity(level)


class ReadEncode:
    """Ray Data actor: one plan item (a shard file) -> encoded rows, yielded in chunks.

    Heavy state (tokenizer, model config) is loaded once per actor. Output columns: ``pos``, ``key``,
    ``ok``, ``reason``, ``input_ids``/``labels`` (int32 bytes), ``grid_rows``/``grid_cols``,
    ``pixel_values`` (uint8 [3, S, S] bytes, empty without image), ``fine``/``coarse`` (float16 bytes,
    empty without targets), ``num_tokens``.
    """

    def __init__(
        self,
        tokenizer_dir: str,
        model_config: dict[str, Any],
        text_field: str,
        max_length: int,
        seed: int,
        group_size: int = 0,
        chunk_rows: int = 32,
        endpoint_override: str | None = None,
        val_fraction: float = 0.0,
        tokenizer: Any = None,
    ):
        self.endpoint_override = endpoint_override
        self.tokenizer = tokenizer or load_tokenizer(fetch_dir(tokenizer_dir, "model.tokenizer", endpoint_override))
        self.val_fraction = val_fraction
        self.config = BreenConfig(**model_config)
        self.text_field = text_field
        self.max_length = max_length
        self.seed = seed
        self.group_size = group_size
        self.chunk_rows = chunk_rows

    def __call__(self, items: dict[str, np.ndarray]) -> Iterator[dict[str, np.ndarray]]:
        for i in range(len(items["path"])):
            item = {k: v[i] for k, v in items.items()}
            yield from self.encode_file(item)

    def read_file(self, path: Store, sha256: str) -> pa.Table:
        """The columns we train on of shard file `path`: its bytes read once, checked against `sha256`
        (its stats; "" skips the check), then parsed in memory with page checksums verified. Any
        failure is a `ShardError` naming the file."""
        try:
            data = path.read_bytes()
        except OSError as err:
            raise ShardError(f"{path}: cannot be read ({type(err).__name__}: {err})") from err
        if sha256:
            got = hashlib.sha256(data).hexdigest()
            if got != sha256:
                raise ShardError(
                    f"{path}: sha256 {got[:16]}... but its stats say {sha256[:16]}... ({len(data)} bytes): the "
                    "file is corrupt or was replaced (redo the shards step)"
                )
        try:
            pf = pq.ParquetFile(pa.BufferReader(data), page_checksum_verification=True)
            return pf.read(columns=[c for c in READ_COLUMNS if c in pf.schema_arrow.names])
        except (OSError, pa.ArrowException) as err:
            raise ShardError(f"{path}: not a readable Parquet file ({type(err).__name__}: {err})") from err

    def encode_file(self, item: dict[str, Any]) -> Iterator[dict[str, np.ndarray]]:
        path = Store.at(str(item["path"]), "data.paths", self.endpoint_override)
        table = self.read_file(path, str(item.get("sha256") or ""))
        n = table.num_rows
        if n != int(item["rows"]):
            raise ShardError(f"{item['path']}: {n} rows, the plan expected {item['rows']} (file changed?)")
        keep = np.arange(n)  # the training rows: all but the held-out ones
        if self.val_fraction > 0:
            keep = np.flatnonzero(~held_out_rows(table.column(sf.KEY).to_pylist(), self.val_fraction))
        if len(keep) != int(item.get("train_rows", n)):
            raise ShardError(f"{item['path']}: {len(keep)} training rows, the plan expected {item['train_rows']}")
        has_image = sf.has_image(table)[keep] if self.group_size else None
        order = row_order(
            len(keep), self.seed, int(item["epoch"]), int(item["file_index"]), has_image, self.group_size
        )
        start = int(item["skip"])
        rows = table.take(pa.array(keep[order[start:]], pa.int64()))
        images = self.images(rows, path)
        for lo in range(0, rows.num_rows, self.chunk_rows):
            chunk = rows.slice(lo, self.chunk_rows)
            yield self.encode_rows(
                chunk, int(item["first_pos"]) + start + lo, images[lo : lo + self.chunk_rows]
            )

    def images(self, rows: pa.Table, path: Store) -> list[bytes | None]:
        """The encoded image of every row (referenced images read once, in one pass over their row groups)."""
        try:
            return sf.resolve_images(rows, sf.images_dir(path))
        except (OSError, ValueError, IndexError, pa.ArrowException) as err:
            raise ShardError(
                f"{path}: its referenced images cannot be read ({type(err).__name__}: {err})"
            ) from err

    def encode_selected(self, item: dict[str, Any]) -> dict[str, np.ndarray]:
        """Rows ``item["rows"]`` (indices, in that order) of shard ``item["path"]`` encoded, as one chunk
        (`validation_items`; ``pos`` counts from 0)."""
        path = Store.at(str(item["path"]), "data.paths", self.endpoint_override)
        table = self.read_file(path, str(item.get("sha256") or ""))
        rows = table.take(pa.array(item["rows"], pa.int64()))
        return self.encode_rows(rows, 0, self.images(rows, path))

    def encode_rows(
        self, rows: pa.Table, first_pos: int, images: list[bytes | None]
    ) -> dict[str, np.ndarray]:
        n = rows.num_rows
        cols = {name: rows.column(name) for name in rows.column_names}
        fine = sf.tensor_rows(cols.get(sf.FINE))
        coarse = sf.tensor_rows(cols.get(sf.COARSE))
        captions = cols["caption"].to_pylist() if "caption" in cols else [None] * n
        convs = cols["conversations"].to_pylist() if "conversations" in cols else [None] * n
        out: dict[str, list] = {k: [] for k in _OUTPUT_COLUMNS}
        for i in range(n):
            out["pos"].append(first_pos + i)
            out["key"].append(str(cols["key"][i].as_py()) if "key" in cols else str(first_pos + i))
            try:
                text = self._text(captions[i], convs[i])
                has_targets = fine is not None and fine[i] is not None and images[i] is not None
                enc = encode_sample(
                    self.tokenizer,
                    self.config,
                    text=text,
                    image=images[i],
                    fine=fine[i] if has_targets else None,
                    coarse=coarse[i] if has_targets else None,
                    max_length=self.max_length,
                )
            except SampleRejected as err:
                _append_rejected(out, err.reason)
                continue
            out["ok"].append(True)
            out["reason"].append("")
            out["input_ids"].append(enc["input_ids"].astype(np.int32).tobytes())
            out["labels"].append(enc["labels"].astype(np.int32).tobytes())
            out["grid_rows"].append(int(enc["image_grid"][0]))
            out["grid_cols"].append(int(enc["image_grid"][1]))
            pix = enc.get("pixel_values")
            out["pixel_values"].append(b"" if pix is None else pix.tobytes())
            out["fine"].append(enc["fine"].astype(np.float16).tobytes() if "fine" in enc else b"")
            out["coarse"].append(enc["coarse"].astype(np.float16).tobytes() if "coarse" in enc else b"")
            out["num_tokens"].append(len(enc["input_ids"]))
        return {k: _column(k, v) for k, v in out.items()}

    def _text(self, caption: str | None, conversations: str | None) -> str | list:
        use_conv = self.text_field == "conversations" or (
            self.text_field == "auto" and conversations is not None
        )
        if use_conv:
            if conversations is None:
                raise SampleRejected("bad_conversation", "no conversations in this row")
            try:
                turns = json.loads(conversations)
            except ValueError as err:
                raise SampleRejected("bad_conversation", f"not JSON: {err}") from err
            if not isinstance(turns, list):
                raise SampleRejected("bad_conversation", "conversations is not a list")
            return turns
        if not caption:
            raise SampleRejected("empty_text", "no caption")
        return caption


_OUTPUT_COLUMNS = (
    "pos", "key", "ok", "reason", "input_ids", "labels", "grid_rows", "grid_cols", "pixel_values", "fine",
    "coarse", "num_tokens",
)  # fmt: skip
_DTYPES = {"pos": np.int64, "ok": bool, "grid_rows": np.int32, "grid_cols": np.int32, "num_tokens": np.int32}


def _append_rejected(out: dict[str, list], reason: str) -> None:
    out["ok"].append(False)
    out["reason"].append(reason)
    for k in ("input_ids", "labels", "pixel_values", "fine", "coarse"):
        out[k].append(b"")
    for k in ("grid_rows", "grid_cols", "num_tokens"):
        out[k].append(0)


def _column(name: str, values: list) -> np.ndarray:
    if name in _DTYPES:
        return np.asarray(values, dtype=_DTYPES[name])
    arr = np.empty(len(values), dtype=object)
    arr[:] = values
    return arr


# ----------------------------------------------------------------------------- the dataset
def build_dataset(
    files: Sequence[ShardFile],
    *,
    tokenizer_dir: str,
    model_config: dict[str, Any],
    text_field: str,
    max_length: int,
    seed: int,
    epochs: int,
    micro_batch_size: int,
    group_by_modality: bool = False,
    skip: int = 0,
    encode_actors: int = 2,
    encode_cpus: float = 1.0,
    chunk_rows: int = 32,
    endpoint_override: str | None = None,
    val_fraction: float = 0.0,
):
    """The training stream as a Ray Dataset (lazy). `skip`: leading positions already consumed;
    `endpoint_override`: the S3-compatible endpoint of shards on an object store; `val_fraction`: the
    held-out share (`held_out_rows`, as `hold_out` recorded in `files`)."""
    import ray

    items = epoch_plan(files, seed, epochs, skip)
    if not items:
        raise ValueError(f"nothing left to read: skip={skip} >= {epochs} x {total_rows(files)} rows")
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    ds = ds.map_batches(
        ReadEncode,
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=encode_actors),
        num_cpus=encode_cpus,
        fn_constructor_kwargs={
            "tokenizer_dir": tokenizer_dir,
            "model_config": model_config,
            "text_field": text_field,
            "max_length": max_length,
            "seed": seed,
            "group_size": micro_batch_size if group_by_modality else 0,
            "chunk_rows": chunk_rows,
            "endpoint_override": endpoint_override,
            "val_fraction": val_fraction,
        },
    )
    return ds.repartition(target_num_rows_per_block=micro_batch_size, strict=True)


def ingest_options():
    """Ray Data execution options for training ingest: order preserved (determinism)."""
    from ray.data import DataContext, ExecutionOptions

    ctx = DataContext.get_current()
    return ExecutionOptions(
        resource_limits=ctx.execution_options.resource_limits,
        preserve_order=True,
        verbose_progress=False,
    )


# ----------------------------------------------------------------------------- worker-side collate
# The keys of a collated batch that the model's forward takes.
MODEL_KEYS = (
    "input_ids", "attention_mask", "labels", "pixel_values", "image_grid", "fine", "coarse", "align_mask",
    "cu_seqlens",
)  # fmt: skip


class Collate(NumpyBatchCollateFn):
    """Ray batch (numpy dict, one micro-batch) -> model batch (torch tensors) + bookkeeping tensors.

    Extra keys: ``pos`` [n] int64 (every row, rejected ones included) and ``reject`` [n] int64 (-1 for
    an ok row, else the index of its reason in `REJECT_REASONS`). Model keys (``breen.data.pack`` layout
    with `packing`, else ``breen.data.collate``) are present only when at least one row is ok.
    """

    def __init__(self, config: BreenConfig, pad_to_multiple_of: int | None = None, packing: bool = False):
        self.config = config
        self.pad_to_multiple_of = pad_to_multiple_of
        self.batch_fn = pack if packing else collate

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, Any]:
        import torch

        s = self.config.image_size
        samples = []
        for i in np.flatnonzero(batch["ok"]):
            sample = {
                "input_ids": np.frombuffer(batch["input_ids"][i], dtype=np.int32).astype(np.int64),
                "labels": np.frombuffer(batch["labels"][i], dtype=np.int32).astype(np.int64),
                "image_grid": np.asarray([batch["grid_rows"][i], batch["grid_cols"][i]], dtype=np.int64),
            }
            if len(batch["pixel_values"][i]):
                sample["pixel_values"] = np.frombuffer(batch["pixel_values"][i], np.uint8).reshape(3, s, s)
            if len(batch["fine"][i]):
                d = self.config.clip_dim
                sample["fine"] = np.frombuffer(batch["fine"][i], np.float16).reshape(-1, d)
                sample["coarse"] = np.frombuffer(batch["coarse"][i], np.float16).reshape(-1, d)
            samples.append(sample)
        out: dict[str, Any] = {}
        if samples:
            out = self.batch_fn(
                samples, self.config.pad_token_id, self.pad_to_multiple_of, return_tensors="pt"
            )
            if "fine" not in out:  # every rank must run the alignment head (ZeRO-3 gathers per call)
                n, c, d = len(samples), self.config, self.config.clip_dim
                out["fine"] = torch.zeros(n, c.num_fine_queries, d, dtype=torch.float16)
                out["coarse"] = torch.zeros(n, c.num_coarse_queries, d, dtype=torch.float16)
                out["align_mask"] = torch.zeros(n, dtype=torch.bool)
        out["pos"] = torch.tensor(np.asarray(batch["pos"], dtype=np.int64))
        codes = [-1 if ok else _reason_code(r) for ok, r in zip(batch["ok"], batch["reason"], strict=True)]
        out["reject"] = torch.tensor(codes, dtype=torch.int64)
        return out


def _reason_code(reason: str) -> int:
    return REJECT_REASONS.index(reason) if reason in REJECT_REASONS else len(REJECT_REASONS) - 1
