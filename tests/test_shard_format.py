"""breen.shard_format: the one codec of the training shards (tensor null policy, row reads by row group,
image references resolved into the image store, key positions)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from breen import shard_format as sf
from breen.storage import Store


def test_tensor_null_policy_is_one_for_every_reader():
    values = np.arange(4 * 2 * 3, dtype=np.float16).reshape(4, 2, 3)
    valid = np.array([True, False, True, True])
    col = sf.tensor_array(values, valid)
    assert col.type == sf.tensor_type(2, 3) and col.null_count == 1
    dense, mask = sf.tensor_values(pa.chunked_array([col.slice(0, 2), col.slice(2)]))
    assert (mask == valid).all() and (dense == values[valid]).all() and dense.dtype == np.float16
    rows = sf.tensor_rows(col)
    assert rows[1] is None and all((rows[i] == values[i]).all() for i in (0, 2, 3))
    assert sf.tensor_rows(None) is None
    empty, mask = sf.tensor_values(sf.tensor_array(values[:0]))
    assert empty.shape == (0, 2, 3) and mask.shape == (0,)


def test_read_rows_reads_only_the_groups_it_needs(tmp_path):
    path = tmp_path / "t.parquet"
    pq.write_table(pa.table({"x": np.arange(1000)}), path, row_group_size=64)
    rng = np.random.default_rng(0)
    for _ in range(20):
        rows = rng.integers(0, 1000, size=int(rng.integers(1, 50)))
        assert sf.read_rows(path, ["x"], rows).column("x").to_pylist() == rows.tolist()
    assert sf.read_rows(path, ["x"], np.array([], np.int64)).num_rows == 0
    with pytest.raises(IndexError, match="outside its 1000 rows"):
        sf.read_rows(path, ["x"], np.array([1000]))


def test_references_resolve_to_the_stored_images(tmp_path):
    store = tmp_path / "download"
    store.mkdir()
    for s in range(2):
        pq.write_table(pa.table({"key": [f"{s}{i}" for i in range(5)], "image": [f"img{s}{i}".encode() for i in range(5)]}),
                       store / f"part-{s:05d}.parquet", row_group_size=2)  # fmt: skip
    shards = tmp_path / "shards"
    shards.mkdir()
    table = pa.table({"key": ["14", "03", "t", "00"], "image_shard": ["part-00001", "part-00000", None, "part-00000"],
                      "image_row": pa.array([4, 3, None, 0], pa.int32())})  # fmt: skip
    table = table.replace_schema_metadata({sf.META_IMAGES: "../download"})
    pq.write_table(table, shards / "part-00000.parquet")
    root = sf.images_dir(shards / "part-00000.parquet")
    assert root == Store.at(store) and root.path == str(store.resolve())
    assert sf.resolve_images(table, root) == [b"img14", b"img03", None, b"img00"]
    assert sf.has_image(table).tolist() == [True, True, False, True]
    inline = pa.table({"key": ["a"], "image": [b"x"]})
    assert sf.resolve_images(inline, None) == [b"x"]
    with pytest.raises(ValueError, match=r"breen\.images"):
        sf.resolve_images(table, None)


def test_row_positions_names_a_missing_key():
    of = pa.array(["a", "b", "c"])
    assert sf.row_positions(pa.array(["c", "a"]), of, "x").tolist() == [2, 0]
    with pytest.raises(KeyError, match=r"download/part-00003\.parquet: 1 key"):
        sf.row_positions(pa.array(["a", "z"]), of, "download/part-00003.parquet")
