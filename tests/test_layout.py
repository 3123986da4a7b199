"""pipelines.layout, the on-disk dataset contract: a listing that lags behind the upstream manifest is an
error, not fewer shards."""

from __future__ import annotations


def test_a_listing_behind_the_upstream_manifest_is_an_error_not_fewer_shards(tmp_path):
    import pyarrow as pa
    import pytest

    from pipelines import fingerprint, layout

    empty = layout.with_reason(pa.table({"key": pa.array([], pa.string())}), [], [])
    fp = fingerprint.record(tmp_path, {"step": "download"})
    for i in range(2):
        layout.write_shard(tmp_path, layout.shard_name(i), pa.table({"key": [f"k{i}"]}), empty, 1)
    layout.write_manifest(tmp_path, "download", [], {}, fp)
    assert layout.require_dataset(tmp_path, "download") == ["part-00000", "part-00001"]
    assert layout.unfinished(tmp_path, ["part-00000", "part-00001", "part-00002"]) == ["part-00002"]
    (tmp_path / "part-00001.done").unlink()  # what a listing that lags behind the writes would show
    with pytest.raises(RuntimeError, match="shows 1 finished shards but its manifest counts 2"):
        layout.require_dataset(tmp_path, "download")
