"""jobs.ingest: shard listing and checks (schema, teacher, fingerprint, sizes, sha256), the epoch plan and
round-robin positions, the Ray Data stream (order, seed, rejects, skip; local and S3), referenced images,
held-out validation rows. Real training shards from `jobs.tiny.write_tiny_shards`; one test per stream on
the session's local Ray."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from breen import shard_format as sf
from jobs import ingest
from jobs.tiny import write_tiny_shards
from tests._training import CLIP_DIM, record_in_stats, rewrite, run_main, stage1_argv, stats_file


# ============================================================================= jobs.ingest: shard files
def test_list_shards_reads_footers_and_honours_done_markers(tmp_path, shards):
    files = ingest.list_shards([shards])
    assert [Path(f.path).name for f in files] == [
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]
    assert [f.rows for f in files] == [8, 8, 4] and ingest.total_rows(files) == 20
    assert all(f.clip_dim == CLIP_DIM for f in files)
    assert files[0].teacher == ("synthetic", "random:0", "none")
    assert {"key", "image", "caption", "fine", "coarse"} <= set(files[0].columns)

    (shards / "part-00001.done").unlink()  # an unfinished file (markers exist) is left out
    assert [Path(f.path).name for f in ingest.list_shards([shards])] == [
        "part-00000.parquet",
        "part-00002.parquet",
    ]
    for marker in shards.glob("part-*.done"):  # no markers at all: every file counts
        marker.unlink()
    assert len(ingest.list_shards([shards])) == 3

    other = write_tiny_shards(tmp_path / "a-other", 4, clip_dim=CLIP_DIM)
    both = ingest.list_shards([shards, other])  # directory order, then name
    assert [Path(f.path).parent for f in both] == [shards] * 3 + [other]


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_list_shards_without_shards_names_the_directory(tmp_path, kind):
    d = tmp_path / "nothing-here"
    if kind == "empty":
        d.mkdir()
        (d / "part-00000.txt").write_text("")
    with pytest.raises(FileNotFoundError, match=r"part-\*\.parquet") as err:
        ingest.list_shards([d])
    assert str(d) in str(err.value)


def test_check_shards_accepts_matching_shards(tmp_path, shards, model_config):
    files = ingest.list_shards([shards])
    ingest.check_shards(files, model_config, "caption")
    ingest.check_shards(files, model_config, "caption", teacher="synthetic")
    ingest.check_shards(files, model_config, "auto")
    sft = ingest.list_shards([write_tiny_shards(tmp_path / "sft", 6, clip_dim=CLIP_DIM, sft=True)])
    ingest.check_shards(sft, model_config, "conversations", teacher="synthetic")


def test_check_shards_teacher_width_differs_from_clip_dim(tmp_path, model_config):
    files = ingest.list_shards([write_tiny_shards(tmp_path / "wide", 10, clip_dim=16, rows_per_file=8)])
    with pytest.raises(ValueError, match=r"data\.paths") as err:
        ingest.check_shards(files, model_config, "caption")
    msg = str(err.value)
    assert files[0].path in msg and "width 16" in msg and f"clip_dim is {CLIP_DIM}" in msg


def test_check_shards_different_teachers(tmp_path, shards, model_config):
    other = write_tiny_shards(tmp_path / "other", 8, clip_dim=CLIP_DIM, seed=1)  # weights id random:1
    files = ingest.list_shards([shards, other])
    with pytest.raises(ValueError, match=r"data\.paths: shards come from different teachers") as err:
        ingest.check_shards(files, model_config, "caption")
    assert str(other / "part-00000.parquet") in str(err.value) and "random:1" in str(err.value)


def test_check_shards_data_teacher_names_field_and_first_offending_file(tmp_path, shards, model_config):
    files = ingest.list_shards([shards])
    with pytest.raises(ValueError) as err:
        ingest.check_shards(files, model_config, "caption", teacher="ViT-L-14-336")
    msg = str(err.value)
    assert msg.startswith("data.teacher='ViT-L-14-336'") and files[0].path in msg and "'synthetic'" in msg

    rewrite(shards / "part-00001.parquet", teacher="EVA-CLIP")  # only the second file differs
    files = ingest.list_shards([shards])
    with pytest.raises(ValueError, match=r"data\.teacher='synthetic'") as err:
        ingest.check_shards(files, model_config, "caption", teacher="synthetic")
    assert files[1].path in str(err.value) and files[0].path not in str(err.value)
    assert "'EVA-CLIP'" in str(err.value)


def test_check_shards_missing_text_or_target_columns(tmp_path, shards, model_config):
    files = ingest.list_shards([shards])
    with pytest.raises(ValueError, match=r"data\.text_field=conversations") as err:
        ingest.check_shards(files, model_config, "conversations")
    assert files[0].path in str(err.value)

    rewrite(shards / "part-00002.parquet", drop=("fine", "coarse"))
    files = ingest.list_shards([shards])
    assert files[2].clip_dim is None
    with pytest.raises(ValueError, match=r"data\.text_field=caption") as err:
        ingest.check_shards(files, model_config, "caption")
    assert files[2].path in str(err.value) and "fine/coarse" in str(err.value)
    ingest.check_shards(files, model_config, "auto")  # SFT-style data may lack targets

    rewrite(shards / "part-00001.parquet", drop=("caption",))
    with pytest.raises(ValueError, match=r"data\.text_field=caption") as err:
        ingest.check_shards(ingest.list_shards([shards]), model_config, "caption")
    assert str(shards / "part-00001.parquet") in str(err.value) and "caption column" in str(err.value)


def fine_like(path: Path, tokens: int, dim: int, dtype=np.float16) -> pa.Array:
    n = pq.read_metadata(path).num_rows
    return sf.tensor_array(np.zeros((n, tokens, dim), dtype)) if dtype == np.float16 else pa.ExtensionArray.from_storage(
        pa.fixed_shape_tensor(pa.from_numpy_dtype(dtype), [tokens, dim]),
        pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(n * tokens * dim, dtype)), tokens * dim),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("column", "make", "problem"),
    [
        ("fine", lambda p: fine_like(p, 64, CLIP_DIM).storage, "column 'fine' is fixed_size_list<element: halffloat>[2048], "
         "the shard format wants fixed_shape_tensor<halffloat>[64, D]"),
        ("fine", lambda p: fine_like(p, 64, CLIP_DIM, np.float32), "column 'fine' is fixed_shape_tensor<float>[64, 32], "
         "the shard format wants fixed_shape_tensor<halffloat>[64, D]"),
        ("coarse", lambda p: fine_like(p, 64, CLIP_DIM), "column 'coarse' is fixed_shape_tensor<halffloat>[64, 32], "
         "the shard format wants fixed_shape_tensor<halffloat>[36, D]"),
        ("coarse", lambda p: fine_like(p, 36, 16), "columns 'fine' and 'coarse' have different widths [16, 32]"),
        ("caption", lambda p: pa.array(range(pq.read_metadata(p).num_rows)),
         "column 'caption' is int64, the shard format wants string"),
        ("image", lambda p: pa.array(["x"] * pq.read_metadata(p).num_rows),
         "column 'image' is string, the shard format wants binary"),
    ],
)  # fmt: skip
def test_check_shards_rejects_columns_of_the_wrong_type_or_width(shards, model_config, column, make, problem):
    """Before: such files passed and crashed the ingest worker after training had started."""
    target = shards / "part-00001.parquet"
    rewrite(target, replace={column: make(target)})
    files = ingest.list_shards([shards])
    with pytest.raises(ingest.ShardError) as err:
        ingest.check_shards(files, model_config, "auto")
    assert str(err.value) == f"data.paths: {target}: {problem}"


def test_check_shards_rejects_a_tensor_column_without_its_partner(shards, model_config):
    rewrite(shards / "part-00000.parquet", drop=("coarse",))
    with pytest.raises(ingest.ShardError, match=r"part-00000\.parquet: column 'fine' without 'coarse'"):
        ingest.check_shards(ingest.list_shards([shards]), model_config, "auto")


def test_check_shards_one_dataset_fingerprint_per_directory(tmp_path, shards, model_config):
    ingest.check_shards(
        ingest.list_shards([shards]), model_config, "caption"
    )  # none at all: an older dataset
    for f in sorted(shards.glob("part-*.parquet")):
        rewrite(f, meta={"breen.fingerprint": "aaaa"})
    files = ingest.list_shards([shards])
    assert {f.fingerprint for f in files} == {"aaaa"}
    ingest.check_shards(files, model_config, "caption")
    other = write_tiny_shards(tmp_path / "other", 8, clip_dim=CLIP_DIM)  # another directory, another dataset
    for f in sorted(other.glob("part-*.parquet")):
        rewrite(f, meta={"breen.fingerprint": "cccc"})
    ingest.check_shards(ingest.list_shards([shards, other]), model_config, "caption")

    first, second = shards / "part-00000.parquet", shards / "part-00002.parquet"
    for value, shown in (("bbbb", "bbbb"), (None, "none")):
        rewrite(second, meta={"breen.fingerprint": value})
        with pytest.raises(ingest.ShardError) as err:
            ingest.check_shards(ingest.list_shards([shards, other]), model_config, "caption")
        assert str(err.value) == (
            f"data.paths: {shards} mixes datasets: {first} has fingerprint aaaa but {second} has {shown} "
            "(redo the shards step)"
        )


def test_list_shards_compares_sizes_with_the_stats_and_names_a_truncated_file(
    tmp_path, shards, init_dir, capsys
):
    for f in sorted(shards.glob("part-*.parquet")):
        record_in_stats(f)
    files = ingest.list_shards([shards])
    assert [f.size for f in files] == [p.stat().st_size for p in sorted(shards.glob("part-*.parquet"))]
    assert files[1].sha256 == json.loads(stats_file(shards / "part-00001.parquet").read_text())["files"][
        "part-00001.parquet"]["sha256"]  # fmt: skip
    target = shards / "part-00001.parquet"
    size = target.stat().st_size
    with open(target, "r+b") as f:
        f.truncate(size // 2)
    want = (f"data.paths[0]: {target} is {size // 2} bytes, its stats (part-00001.stats.json) say {size} (truncated "
            "or replaced: redo the shards step)")  # fmt: skip
    with pytest.raises(ingest.ShardError) as err:
        ingest.list_shards([shards])
    assert str(err.value) == want
    code, err_text = run_main(stage1_argv(tmp_path, shards, init_dir), capsys)  # fails before Ray starts
    assert code == 2 and f"config error: {want}" in err_text, err_text
    # An older dataset (stats without files): the unreadable footer is still named.
    stats = json.loads(stats_file(target).read_text())
    del stats["files"]
    stats_file(target).write_text(json.dumps(stats))
    with pytest.raises(ingest.ShardError) as err:
        ingest.list_shards([shards])
    assert str(err.value).startswith(f"data.paths[0]: {target}: not a readable Parquet file (")


def test_the_ingest_worker_checks_sha256_and_names_the_file_it_cannot_read(tmp_path, init_dir, model_config):
    """The actor's per-file work (`ReadEncode.encode_file`, what Ray Data runs), called directly."""
    d = write_tiny_shards(tmp_path / "ref", 8, clip_dim=CLIP_DIM, rows_per_file=8, referenced=True)
    target = d / "part-00000.parquet"
    record_in_stats(target)
    enc = ingest.ReadEncode(str(init_dir), model_config.to_dict(), "caption", 512, seed=0, chunk_rows=4)
    (item,) = ingest.epoch_plan(ingest.list_shards([d]), seed=0, epochs=1)
    assert item["sha256"] == hashlib.sha256(target.read_bytes()).hexdigest()
    assert sum(len(c["pos"]) for c in enc.encode_file(item)) == 8

    data = bytearray(target.read_bytes())  # same size, one byte changed: only the checksum can tell
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(ingest.ShardError) as err:
        list(enc.encode_file(item))
    assert str(err.value).startswith(f"{target}: sha256 ") and "but its stats say" in str(err.value)

    with open(target, "r+b") as f:  # truncated, no checksum known (an older dataset)
        f.truncate(100)
    with pytest.raises(ingest.ShardError) as err:
        list(enc.encode_file({**item, "sha256": ""}))
    assert str(err.value).startswith(f"{target}: not a readable Parquet file (")

    d2 = write_tiny_shards(tmp_path / "ref2", 8, clip_dim=CLIP_DIM, rows_per_file=8, referenced=True)
    (item2,) = ingest.epoch_plan(ingest.list_shards([d2]), seed=0, epochs=1)
    for image_shard in (tmp_path / "ref2-images").glob("*.parquet"):
        image_shard.write_bytes(b"not parquet")
    with pytest.raises(ingest.ShardError) as err:
        list(enc.encode_file(item2))
    assert str(err.value).startswith(f"{d2 / 'part-00000.parquet'}: its referenced images cannot be read (")


# ============================================================================= jobs.ingest: epoch order
def positions(items: list[dict]) -> list[int]:
    return [p for it in items for p in range(it["first_pos"] + it["skip"], it["first_pos"] + it["rows"])]


def test_epoch_plan_covers_each_epoch_and_skip_drops_exactly_the_consumed_positions(tmp_path, shards):
    files = ingest.list_shards([shards, write_tiny_shards(tmp_path / "b", 7, clip_dim=CLIP_DIM)])
    total = ingest.total_rows(files)
    assert total == 27
    full = ingest.epoch_plan(files, seed=3, epochs=2)
    assert positions(full) == list(range(2 * total)) and len(full) == 2 * len(files)
    for epoch in range(2):
        mine = [it for it in full if it["epoch"] == epoch]
        assert sorted(it["file_index"] for it in mine) == list(range(len(files)))
        order = ingest.file_order(len(files), 3, epoch)
        assert [it["file_index"] for it in mine] == order.tolist()
    for skip in (1, 5, 8, 16, 26, 27, 30, 53):
        items = ingest.epoch_plan(files, seed=3, epochs=2, skip=skip)
        assert positions(items) == list(range(skip, 2 * total)), skip
        assert all(0 <= it["skip"] < it["rows"] for it in items)
        assert [it["skip"] for it in items[1:]] == [0] * (len(items) - 1)  # only the first file is sliced
        tail = full[len(full) - len(items) :]
        assert [{**a, "skip": 0} for a in items] == [{**b, "skip": 0} for b in tail]
    assert ingest.epoch_plan(files, seed=3, epochs=2, skip=2 * total) == []


@pytest.mark.parametrize(("num_rows", "n_image", "group"), [(40, 13, 4), (37, 20, 4), (24, 24, 8), (9, 0, 4)])
def test_row_order_groups_by_modality(num_rows, n_image, group):
    rng = np.random.default_rng(num_rows)
    has_image = np.zeros(num_rows, bool)
    has_image[rng.choice(num_rows, n_image, replace=False)] = True
    order = ingest.row_order(num_rows, 5, 1, 2, has_image, group)
    assert sorted(order.tolist()) == list(range(num_rows))
    chunks = [has_image[order[i : i + group]] for i in range(0, num_rows, group)]
    mixed = [i for i, c in enumerate(chunks) if c.any() and not c.all()]
    assert len(mixed) <= 1
    if mixed:  # the mixed group comes after every full single-modality group
        assert mixed[0] == (n_image // group) + ((num_rows - n_image) // group)
    full = [c for c in chunks if len(c) == group]
    assert len([c for c in full if c.all() or not c.any()]) >= len(full) - 1
    assert np.array_equal(order, ingest.row_order(num_rows, 5, 1, 2, has_image, group))  # deterministic
    plain = ingest.row_order(num_rows, 5, 1, 2)
    assert sorted(plain.tolist()) == list(range(num_rows))
    assert not np.array_equal(plain, ingest.row_order(num_rows, 5, 2, 2))  # another epoch, another order


@pytest.mark.parametrize(("world", "accum", "micro_batch"), [(1, 1, 4), (3, 2, 4), (4, 3, 2)])
def test_expected_pos_matches_the_round_robin_layout(world, accum, micro_batch):
    steps = 4
    stream = np.arange(steps * accum * world * micro_batch)
    blocks = [stream[i : i + micro_batch] for i in range(0, len(stream), micro_batch)]
    dealt = {r: blocks[r::world] for r in range(world)}  # streaming_split(equal) deals blocks round robin
    for step in range(steps):
        seen = []
        for rank in range(world):
            for micro in range(accum):
                block = dealt[rank][step * accum + micro]
                assert ingest.expected_pos(step, micro, rank, world, micro_batch, accum) == block[0]
                seen += block.tolist()
        glob = accum * world * micro_batch  # a step consumes exactly one global batch
        assert sorted(seen) == list(range(step * glob, (step + 1) * glob))


# ============================================================================= jobs.ingest: the dataset
def expected_rows(files, seed, epochs, skip, group_size) -> list[dict]:
    """Per position: the source row (file, index) the addressable order says it holds."""
    out = []
    for it in ingest.epoch_plan(files, seed, epochs, skip):
        table = pq.read_table(it["path"], columns=["key", "image"])
        has_image = ~table.column("image").is_null().to_numpy(zero_copy_only=False)
        order = ingest.row_order(
            it["rows"], seed, it["epoch"], it["file_index"], has_image if group_size else None, group_size
        )
        keys = table.column("key").to_pylist()
        for lo in range(it["skip"], it["rows"]):
            row = int(order[lo])
            out.append({"pos": it["first_pos"] + lo, "key": keys[row], "path": it["path"], "row": row,
                        "image": bool(has_image[row])})  # fmt: skip
    return out


def run_ingest(files, init_dir, model_config, *, seed, skip=0):
    ds = ingest.build_dataset(
        files, tokenizer_dir=str(init_dir), model_config=model_config.to_dict(), text_field="auto",
        max_length=512, seed=seed, epochs=2, micro_batch_size=4, group_by_modality=True, skip=skip,
        encode_actors=1, encode_cpus=0.5, chunk_rows=8,
    )  # fmt: skip
    ds.context.execution_options = ingest.ingest_options()  # as the trainer's DataConfig
    ds.context.enable_progress_bars = False
    cols = ["pos", "key", "ok", "reason", "pixel_values", "num_tokens"]
    return ds.select_columns(cols).take_all()


def test_build_dataset_stream_order_seed_rejects_and_skip(ray_local, tmp_path, init_dir, model_config):
    """Three runs of the real Ray Data ingest (the run count dominates this file's runtime)."""
    cap = write_tiny_shards(tmp_path / "cap", 12, clip_dim=CLIP_DIM, rows_per_file=8, corrupt_rows=(3,))
    sft = write_tiny_shards(
        tmp_path / "sft", 8, clip_dim=CLIP_DIM, rows_per_file=8, sft=True, text_only_every=3
    )
    files = ingest.list_shards([cap, sft])
    ingest.check_shards(files, model_config, "auto", teacher="synthetic")
    n = 2 * ingest.total_rows(files)  # two epochs, 40 positions
    corrupt = (str(cap / "part-00000.parquet"), 3)

    def check(rows, seed, skip=0) -> list[tuple[str, int]]:
        """The stream holds positions skip..n-1 once each, in order, each the row the plan names."""
        want = expected_rows(files, seed, 2, skip, group_size=4)
        assert [r["pos"] for r in rows] == list(range(skip, n)), "every position once, in position order"
        assert [r["key"] for r in rows] == [w["key"] for w in want]
        for r, w in zip(rows, want, strict=True):
            if (w["path"], w["row"]) == corrupt:  # rejected, not dropped: carried with its reason
                assert not r["ok"] and r["reason"] == "decode_error", r
            else:
                assert r["ok"] and r["reason"] == "" and r["num_tokens"] > 0, r
                assert (len(r["pixel_values"]) > 0) == w["image"]  # text-only SFT rows carry no image
        return [(w["path"], w["row"]) for w in want]

    first = run_ingest(files, init_dir, model_config, seed=0)
    a = check(first, seed=0)
    assert sum(not r["ok"] for r in first) == 2  # the corrupt row, once per epoch

    skip = 13  # resume mid-file: exactly positions >= skip, identical to the first run's (same seed)
    resumed = run_ingest(files, init_dir, model_config, seed=0, skip=skip)
    assert check(resumed, seed=0, skip=skip) == a[skip:]
    assert resumed == first[skip:]

    b = check(run_ingest(files, init_dir, model_config, seed=1), seed=1)
    assert b != a and sorted(b) == sorted(a)  # another seed: the same rows in another order
    assert b[: n // 2] != a[: n // 2] and b[n // 2 :] != a[n // 2 :]


def test_ingest_streams_shards_from_s3_exactly_as_from_local_disk(ray_local, tmp_path, init_dir, model_config,
                                                                   s3_server):  # fmt: skip
    """Training shards whose images are referenced into an image dataset, in a bucket (a real S3 API): the
    stream, a resumed stream and the shard list equal those of the same files on local disk."""
    from breen.storage import Store

    local = write_tiny_shards(tmp_path / "cap", 12, clip_dim=CLIP_DIM, rows_per_file=8, corrupt_rows=(3,),
                              referenced=True)  # fmt: skip
    bucket = Store.at("s3://breen-test/ingest", endpoint_override=s3_server)
    for folder in (local, tmp_path / "cap-images"):
        assert folder.is_dir()
        for f in sorted(p for p in folder.rglob("*") if p.is_file()):
            (bucket / f.relative_to(tmp_path).as_posix()).write_bytes(f.read_bytes())
    here = ingest.list_shards([local])
    there = ingest.list_shards(["s3://breen-test/ingest/cap"], endpoint_override=s3_server)
    assert [f.path for f in there] == [f"s3://breen-test/ingest/cap/{Path(f.path).name}" for f in here]
    assert [(f.rows, f.clip_dim, f.columns, f.teacher) for f in there] == [
        (f.rows, f.clip_dim, f.columns, f.teacher) for f in here]  # fmt: skip

    def stream(files, skip=0):
        ds = ingest.build_dataset(
            files, tokenizer_dir=str(init_dir), model_config=model_config.to_dict(), text_field="caption",
            max_length=512, seed=0, epochs=1, micro_batch_size=4, skip=skip, encode_actors=1, encode_cpus=0.5,
            chunk_rows=8, endpoint_override=s3_server,
        )  # fmt: skip
        ds.context.execution_options = ingest.ingest_options()
        ds.context.enable_progress_bars = False
        return ds.select_columns(["pos", "key", "ok", "pixel_values", "input_ids", "fine"]).take_all()

    want = stream(here)
    assert len(want) == 12 and sum(not r["ok"] for r in want) == 1
    assert stream(there) == want
    assert stream(there, skip=5) == want[5:]


def test_build_dataset_with_nothing_left_to_read(shards, init_dir):
    files = ingest.list_shards([shards])
    with pytest.raises(ValueError, match="nothing left to read"):
        ingest.build_dataset(
            files, tokenizer_dir=str(init_dir), model_config={}, text_field="caption", max_length=64,
            seed=0, epochs=2, micro_batch_size=4, skip=40,
        )  # fmt: skip


def test_referenced_images_encode_exactly_like_inline_ones(tmp_path, init_dir, model_config):
    """The layout data preparation writes (images stored once, shards reference them) feeds the model the
    same samples as inline image bytes, resumed mid-file too."""
    kw = {"clip_dim": CLIP_DIM, "rows_per_file": 8, "sft": True, "text_only_every": 3, "corrupt_rows": (1,)}
    inline = write_tiny_shards(tmp_path / "inline", 20, **kw)
    ref = write_tiny_shards(tmp_path / "ref", 20, referenced=True, **kw)
    assert "image" not in pq.read_schema(ref / "part-00000.parquet").names
    enc = ingest.ReadEncode(
        str(init_dir), model_config.to_dict(), "auto", 512, seed=0, group_size=4, chunk_rows=3
    )

    def encoded(d: Path, skip: int) -> list[dict]:
        rows = []
        for item in ingest.epoch_plan(ingest.list_shards([d]), seed=0, epochs=1, skip=skip):
            for chunk in enc.encode_file(item):
                rows += [{k: v[i] for k, v in chunk.items()} for i in range(len(chunk["pos"]))]
        return rows

    for skip in (0, 11):
        a, b = encoded(inline, skip), encoded(ref, skip)
        assert len(a) == len(b) == 20 - skip
        if skip == 0:  # the corrupt image is rejected the same way through the reference
            assert [r["key"] for r in b if not r["ok"]] == [f"{1:012d}"]
        for x, y in zip(a, b, strict=True):
            assert x.keys() == y.keys()
            assert all(np.array_equal(x[k], y[k]) for k in x), x["key"]


# ============================================================================= held-out validation rows
def test_held_out_rows_depend_on_the_key_alone():
    keys = [f"row-{i:05d}" for i in range(4000)]
    mask = ingest.held_out_rows(keys, 0.1)
    assert 0.08 < mask.mean() < 0.12  # about the fraction
    assert (ingest.held_out_rows(keys, 0.1) == mask).all()  # deterministic
    shuffled = np.random.default_rng(0).permutation(len(keys))  # file order does not matter: the key does
    assert (ingest.held_out_rows([keys[i] for i in shuffled], 0.1) == mask[shuffled]).all()
    assert not ingest.held_out_rows(keys, 0.0).any()
    assert (mask <= ingest.held_out_rows(keys, 0.3)).all()  # a larger fraction holds out more, never others


def test_held_out_rows_never_reach_the_training_stream_whatever_the_seed(tmp_path, init_dir, model_config):
    d = write_tiny_shards(tmp_path / "shards", 40, clip_dim=CLIP_DIM, rows_per_file=16)
    files = ingest.hold_out(ingest.list_shards([d]), 0.25)
    keys = {Path(f.path).name: sf.keys_of(f.path).to_pylist() for f in files}
    held = {keys[Path(f.path).name][i] for f in files for i in f.held_out}
    assert 0 < len(held) < 40 and ingest.total_rows(files) == 40 - len(held)
    enc = ingest.ReadEncode(str(init_dir), model_config.to_dict(), "caption", 512, seed=0, val_fraction=0.25)
    trained = []
    for seed in (0, 7):  # the stream's order changes with the seed, the held-out rows do not
        enc.seed = seed
        items = ingest.epoch_plan(files, seed=seed, epochs=1)
        chunks = [c for item in items for c in enc.encode_file(item)]
        pos = [int(p) for c in chunks for p in c["pos"]]
        assert pos == list(range(ingest.total_rows(files)))  # positions count the training rows only
        trained.append([str(k) for c in chunks for k in c["key"]])
    assert trained[0] != trained[1] and sorted(trained[0]) == sorted(trained[1])
    assert not held & set(trained[0]) and held | set(trained[0]) == {k for ks in keys.values() for k in ks}

    items = ingest.validation_items(files, max_rows=5)  # the first held-out rows, file then row order
    assert sum(len(it["rows"]) for it in items) == 5
    got = [str(k) for it in items for k in enc.encode_selected(it)["key"]]
    want = [keys[Path(f.path).name][i] for f in files for i in f.held_out][:5]
    assert got == want and set(got) <= held
    every = ingest.validation_items(ingest.list_shards([d]), max_rows=100, every_row=True)  # data.val_paths
    assert [len(it["rows"]) for it in every] == [16, 16, 8]


