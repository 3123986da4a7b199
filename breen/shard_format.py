"""The training-shard format: the one owner of its columns, types, Parquet metadata keys and tensor codec.

Written by `pipelines.teacher` (and `jobs.tiny` for tests), read by `jobs.ingest`, `pipelines.report`
and the tests. A training shard is ``part-NNNNN.parquet`` with one row per sample:

    key          string   unique sample id
    image        binary   encoded image bytes, long side <= 672 (inline), or a reference:
    image_shard  string   shard name in the image dataset (``breen.images``, relative to the shard's folder)
    image_row    int32    row of that shard's ``image`` column
    width        int32    of the stored image (null without image)
    height       int32
    caption      string   pre-training text (SFT shards keep the first answer here, for reports)
    conversations string  SFT turns, JSON (LLaVA layout)
    fine         fixed_shape_tensor<float16>[64, D]   teacher targets (8x8 pooled CLIP grid)
    coarse       fixed_shape_tensor<float16>[36, D]   teacher targets (6x6)

Null policy of the tensor columns: a null row has no targets (a text-only SFT sample); readers get None
for it (`tensor_rows`) or leave it out (`tensor_values`, with the validity mask). A row has an image
when ``image`` is non-null or ``image_row`` is non-null.

Referenced images are what the preparation writes: the download step (or sft_import) stores every
image once, and the training shards point at it, so no step copies image bytes. Keep the image
dataset next to the shards (the relative path is in each shard's metadata). Every reader here takes a
local path or a `breen.storage.Store` (local disk or an object store).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from breen.storage import Store

KEY = "key"
IMAGE = "image"
IMAGE_SHARD = "image_shard"
IMAGE_ROW = "image_row"
WIDTH = "width"
HEIGHT = "height"
CAPTION = "caption"
CONVERSATIONS = "conversations"
FINE = "fine"
COARSE = "coarse"
FINE_TOKENS, COARSE_TOKENS = 64, 36
TENSOR_COLUMNS = (FINE, COARSE)

# Columns of a training shard, in file order (a shard has a subset: inline image or reference, caption
# and/or conversations).
COLUMNS = (KEY, IMAGE, IMAGE_SHARD, IMAGE_ROW, WIDTH, HEIGHT, CAPTION, CONVERSATIONS, FINE, COARSE)
TYPES = {KEY: pa.string(), IMAGE: pa.binary(), IMAGE_SHARD: pa.string(), IMAGE_ROW: pa.int32(),
         WIDTH: pa.int32(), HEIGHT: pa.int32(), CAPTION: pa.string(), CONVERSATIONS: pa.string()}  # fmt: skip

# Parquet metadata keys.
META_TEACHER = "breen.teacher"  # teacher model name
META_TEACHER_WEIGHTS = "breen.teacher_weights"  # weights id (sha256 of the file, or the seed)
META_PREPROCESS = "breen.preprocess"  # teacher preprocessing version (`breen.teacher.PREPROCESS_VERSION`)
META_IMAGES = "breen.images"  # image dataset folder of `image_shard`/`image_row`, relative to the shard
TEACHER_META = (META_TEACHER, META_TEACHER_WEIGHTS, META_PREPROCESS)


# ----------------------------------------------------------------------------- tensors


def tensor_type(tokens: int, dim: int) -> pa.DataType:
    return pa.fixed_shape_tensor(pa.float16(), [tokens, dim])


def tensor_array(values: np.ndarray, valid: np.ndarray | None = None) -> pa.Array:
    """[N, R, D] array -> Arrow `fixed_shape_tensor` (float16); rows where `valid` is False are null."""
    _, r, d = values.shape
    flat = pa.array(values.astype(np.float16, copy=False).reshape(-1))
    mask = None if valid is None else pa.array(~np.asarray(valid, bool), pa.bool_())
    storage = pa.FixedSizeListArray.from_arrays(flat, r * d, mask=mask)
    return pa.ExtensionArray.from_storage(tensor_type(r, d), storage)


def tensor_values(column: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, np.ndarray]:
    """(float16 [n_valid, R, D] of the non-null rows, validity mask [N]) of a tensor column."""
    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    valid = np.ones(len(arr), bool)
    if arr.null_count:
        valid = np.asarray(arr.is_valid().to_numpy(zero_copy_only=False), bool)
        arr = arr.filter(pa.array(valid))
    if len(arr) == 0:
        shape = arr.type.shape
        return np.zeros((0, *shape), np.float16), valid
    return arr.to_numpy_ndarray(), valid


def tensor_rows(column: pa.ChunkedArray | pa.Array | None) -> list[np.ndarray | None] | None:
    """One [R, D] array per row, None for a null row (no targets); None for a missing column."""
    if column is None:
        return None
    values, valid = tensor_values(column)
    out: list[np.ndarray | None] = [None] * len(valid)
    for i, row in zip(np.flatnonzero(valid), values, strict=True):
        out[i] = row
    return out


def tensor_dim(schema: pa.Schema) -> int | None:
    """Width D of the teacher columns of a shard schema (None without them)."""
    if FINE not in schema.names:
        return None
    shape = getattr(schema.field(FINE).type, "shape", None)
    return int(shape[-1]) if shape else None


# ----------------------------------------------------------------------------- metadata


def metadata(schema: pa.Schema) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in (schema.metadata or {}).items() if k.startswith(b"breen.")}


def teacher_of(schema: pa.Schema) -> tuple[str, str, str]:
    md = metadata(schema)
    return tuple(md.get(k, "") for k in TEACHER_META)  # type: ignore[return-value]


# ----------------------------------------------------------------------------- rows and images


def parquet_file(path: str | Path | Store) -> pq.ParquetFile:
    """An open Parquet file (its footer read; row groups read on demand) on local disk or a store; pages
    are checked against their checksums as they are read (files written by the pipeline carry them)."""
    store = Store.at(path)
    return pq.ParquetFile(store.fs.open_input_file(store.path), page_checksum_verification=True)


def read_rows(path: str | Path | Store, columns: Sequence[str], rows: np.ndarray) -> pa.Table:
    """Rows `rows` (in that order) of a Parquet file, reading only the row groups that hold them."""
    pf = parquet_file(path)
    rows = np.asarray(rows, np.int64)
    if len(rows) == 0:
        return pf.schema_arrow.empty_table().select(list(columns))
    sizes = np.array([pf.metadata.row_group(g).num_rows for g in range(pf.num_row_groups)], np.int64)
    starts = np.concatenate([[0], np.cumsum(sizes)])
    if rows.min() < 0 or rows.max() >= starts[-1]:
        raise IndexError(f"{path}: rows {rows.min()}..{rows.max()} outside its {starts[-1]} rows")
    group_of = np.searchsorted(starts, rows, side="right") - 1
    groups = np.unique(group_of)
    table = pf.read_row_groups([int(g) for g in groups], columns=list(columns))
    # Where each wanted row lands in the concatenation of the groups read.
    group_offset = np.concatenate([[0], np.cumsum(sizes[groups])])[:-1]
    local = rows - starts[group_of] + group_offset[np.searchsorted(groups, group_of)]
    return table.take(pa.array(local))


def read_by_key(
    path: str | Path | Store, keys: pa.Array | pa.ChunkedArray, columns: Sequence[str]
) -> tuple[pa.Table, np.ndarray]:
    """`columns` of the rows of the Parquet file `path` with these keys (in this order), and those rows'
    positions in the file; a key the file does not hold is an error naming it."""
    store = Store.at(path)
    pos = row_positions(keys, keys_of(store), str(store))
    return read_rows(store, columns, pos), pos


def keys_of(path: str | Path | Store) -> pa.ChunkedArray:
    """The ``key`` column of a Parquet file (local or on a store), read alone."""
    store = Store.at(path)
    return pq.read_table(store.path, columns=[KEY], filesystem=store.fs, page_checksum_verification=True).column(KEY)


def images_dir(shard_path: str | Path | Store) -> Store | None:
    """The image dataset folder a shard's references point into (None for inline images)."""
    store = Store.at(shard_path)
    rel = metadata(pq.read_schema(store.path, filesystem=store.fs)).get(META_IMAGES)
    return None if rel is None else store.parent.joinpath(rel)


def has_image(table: pa.Table) -> np.ndarray:
    """Per row: does the sample have an image (inline or referenced)?"""
    col = table.column(IMAGE) if IMAGE in table.column_names else table.column(IMAGE_ROW)
    return np.asarray(col.is_valid().to_numpy(zero_copy_only=False), bool)


def resolve_images(table: pa.Table, image_root: str | Path | Store | None) -> list[bytes | None]:
    """The encoded image of every row of `table` (rows of one training shard): inline bytes, or read
    through `image_shard`/`image_row` from the image dataset `image_root` (see `images_dir`)."""
    if IMAGE in table.column_names:
        return table.column(IMAGE).to_pylist()
    if IMAGE_ROW not in table.column_names:
        return [None] * table.num_rows
    if image_root is None:
        raise ValueError(
            f"shard rows reference images ({IMAGE_ROW}) but the shard has no {META_IMAGES} metadata"
        )
    out: list[bytes | None] = [None] * table.num_rows
    shards = table.column(IMAGE_SHARD).to_pylist()
    rows = table.column(IMAGE_ROW).to_pylist()
    by_shard: dict[str, list[int]] = {}
    for i, (s, r) in enumerate(zip(shards, rows, strict=True)):
        if r is not None:
            by_shard.setdefault(s, []).append(i)
    for shard, idx in sorted(by_shard.items()):
        path = Store.at(image_root) / f"{shard}.parquet"
        want = np.array([rows[i] for i in idx], np.int64)
        images = read_rows(path, [IMAGE], want).column(IMAGE).to_pylist()
        for i, img in zip(idx, images, strict=True):
            out[i] = img
    return out


def row_positions(keys: pa.Array | pa.ChunkedArray, of: pa.Array | pa.ChunkedArray, where: str) -> np.ndarray:
    """Position of every key of `keys` in `of` (an upstream shard's keys); a missing key is an error."""
    pos = pc.index_in(keys, value_set=of.combine_chunks() if isinstance(of, pa.ChunkedArray) else of)
    if pos.null_count:
        missing = pc.filter(keys, pc.is_null(pos)).to_pylist()[:3]
        raise KeyError(f"{where}: {pos.null_count} key(s) not found, e.g. {missing}")
    return pos.to_numpy(zero_copy_only=False).astype(np.int64)
