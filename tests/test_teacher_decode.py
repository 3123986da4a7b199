"""Teacher step, in process: decoding ahead in a thread pool changes nothing in the output (features
bitwise equal, same rejected rows with the same reasons, same order)."""

from __future__ import annotations

import pyarrow as pa
import pytest

from breen.shard_format import tensor_values
from pipelines.config import TeacherConfig
from pipelines.teacher import build_teacher, decoded_batches, teacher_table
from tests._tiny_models import png_bytes
from tests.conftest import CONFIGS


@pytest.fixture(scope="module")
def tiny_teacher():
    cfg = TeacherConfig(model_config=str(CONFIGS / "tiny-vit.json"), random_init_seed=0)
    model, _, _ = build_teacher(cfg)
    return model


def _table() -> pa.Table:
    images = [png_bytes(40 + 13 * i, 90 - 7 * i, seed=i) for i in range(7)]
    images[2] = b"not an image"
    images[5] = None  # text-only row: passes with null features
    return pa.table({"key": [f"k{i}" for i in range(7)], "image": images})


@pytest.mark.parametrize("threads,prefetch", [(1, 1), (3, 2)])
def test_decode_threads_give_identical_output(tiny_teacher, threads, prefetch):
    table, dim = _table(), tiny_teacher.visual.transformer.width
    ref_kept, ref_rej = teacher_table(table, tiny_teacher, dim, batch_size=2, device="cpu")
    kept, rej = teacher_table(table, tiny_teacher, dim, 2, "cpu", decode_threads=threads, prefetch=prefetch)
    assert kept.column("key").to_pylist() == ref_kept.column("key").to_pylist() == [
        "k0", "k1", "k3", "k4", "k5", "k6"
    ]  # fmt: skip
    assert rej.column("key").to_pylist() == ["k2"] and rej.column("reason").to_pylist() == ["decode_error"]
    assert rej.column("detail").to_pylist() == ref_rej.column("detail").to_pylist()
    for col in ("fine", "coarse"):
        (got, got_valid), (ref, ref_valid) = (
            tensor_values(kept.column(col)),
            tensor_values(ref_kept.column(col)),
        )
        assert got.tobytes() == ref.tobytes() and (got_valid == ref_valid).all()


def test_decoded_batches_keep_order_and_size():
    images = [png_bytes(30, 30, seed=i) for i in range(9)]
    images[4] = b"\x00" * 10
    batches = list(decoded_batches(images, list(range(9)), batch_size=4, threads=2, prefetch=1))
    assert [b[0] for b in batches] == [[0, 1, 2, 3], [5, 6, 7], [8]]
    assert list(batches[1][2]) == [4] and all(p.shape == (3, 336, 336) for b in batches for p in b[1])


def test_finished_shards_of_another_canvas_rule_are_not_resumed(tmp_path):
    import pyarrow.parquet as pq

    from breen.settings import ConfigError
    from breen.teacher import PREPROCESS_CENTRED_V1, PREPROCESS_RELEASED
    from pipelines.teacher import check_preprocess

    table = pa.table({"key": ["a"]}).replace_schema_metadata({"breen.preprocess": PREPROCESS_CENTRED_V1})
    pq.write_table(table, tmp_path / "part-00000.parquet")
    check_preprocess(tmp_path, ["part-00000"], PREPROCESS_CENTRED_V1)  # same rule: resumes
    check_preprocess(tmp_path, [], PREPROCESS_RELEASED)  # nothing finished yet: nothing to compare
    with pytest.raises(ConfigError, match=r"teacher\.preprocess: .*part-00000\.parquet was made with"):
        check_preprocess(tmp_path, ["part-00000"], PREPROCESS_RELEASED)
