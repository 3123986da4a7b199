"""Filter rules, perceptual hash, the split of a shard (pure functions), and the shard planner (dedup: tests/test_dedup.py)."""

from __future__ import annotations

import io

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines import common
from pipelines import filter as filt
from pipelines.captions import clean_caption
from pipelines.config import PRESETS, CaptionsConfig, FilterConfig, apply_preset
from pipelines.teacher import plan


def jpeg(w: int, h: int, seed: int = 0, quality: int = 90) -> bytes:
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 255, (8, 8, 3), np.uint8)  # smooth content: stable perceptual hash
    img = Image.fromarray(small).resize((w, h), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


@pytest.fixture(scope="module")
def rules():
    return filt.RowRules(apply_preset(FilterConfig(preset="datacomp-basic")))


def test_datacomp_basic_preset_values():
    assert PRESETS["datacomp-basic"] == {"min_short_side": 200, "max_aspect_ratio": 3.0, "min_words": 3,
                                          "min_chars": 6, "languages": ["en"]}  # fmt: skip


@pytest.mark.parametrize(
    ("image", "caption", "reason"),
    [
        (jpeg(400, 300), "A small brown dog runs across the green park", None),
        (b"garbage", "A small brown dog runs across the green park", "decode_error"),
        (b"", "A small brown dog runs across the green park", "decode_error"),
        (None, "A small brown dog runs across the green park", "decode_error"),
        (jpeg(300, 150), "A small brown dog runs across the green park", "too_small"),
        (jpeg(640, 200), "A small brown dog runs across the green park", "aspect_ratio"),
        (jpeg(400, 300), "   ", "empty_caption"),
        (jpeg(400, 300), "<b></b>", "empty_caption"),
        (jpeg(400, 300), "dog park", "caption_too_short"),
        (jpeg(400, 300), "a b c", "caption_too_short"),
        (jpeg(400, 300), "Ein kleiner brauner Hund rennt über die grüne Wiese im Park", "language"),
        (jpeg(400, 300), "Маленькая коричневая собака бежит по зелёному парку", "language"),
        (jpeg(400, 300), "一只棕色的小狗在绿色的公园里奔跑着玩耍", "caption_too_short"),  # no spaces: 1 word
    ],
)
def test_row_rules(rules, image, caption, reason):
    out = rules.check(image, clean_caption(caption, CaptionsConfig()))  # the filter sees cleaned captions
    assert out["reason"] == reason, out
    if reason is None:
        assert out["language"] == "en" and len(out["phash"]) == 16


def test_language_keeps_all_when_unset():
    r = filt.RowRules(FilterConfig())
    assert r.check(jpeg(400, 300), "Ein kleiner brauner Hund rennt über die grüne Wiese")["reason"] is None


def test_phash_is_robust_to_reencoding_and_resizing_but_separates_images():
    a = Image.open(io.BytesIO(jpeg(500, 400, seed=1)))
    a_low = Image.open(io.BytesIO(jpeg(500, 400, seed=1, quality=40)))
    a_small = a.resize((480, 384))
    b = Image.open(io.BytesIO(jpeg(500, 400, seed=2)))
    assert filt.hamming(filt.phash(a), filt.phash(a_low)) <= 3
    assert filt.hamming(filt.phash(a), filt.phash(a_small)) <= 3
    assert filt.hamming(filt.phash(a), filt.phash(b)) > 10


def test_split_shard_accounts_for_every_row(tmp_path):
    index = pa.table({"key": ["a", "b", "c", "d"], "shard": ["p"] * 4, "sha256": ["1", "2", "3", "4"],
                      "phash": ["0" * 16] * 4, "language": ["en", "en", None, "en"],
                      "reason": [None, None, "too_small", None], "detail": [None, None, "10x10", None]},
                     schema=filt.INDEX_SCHEMA)  # fmt: skip
    dups = pa.table({"key": ["d"], "shard": ["p"], "reason": ["duplicate"], "detail": ["same bytes as a"]})
    stats = filt.split_shard(tmp_path, "part-00000", index, dups, rows_in=4)
    assert stats["rows_in"] == 4 and stats["kept"] == 2
    assert stats["rejected"] == {"duplicate": 1, "too_small": 1}
    kept = pq.read_table(tmp_path / "part-00000.parquet")
    assert kept.column_names == ["key", "language", "phash"]  # decisions and new columns, no image bytes
    with pytest.raises(common.AccountingError):
        filt.split_shard(tmp_path, "part-00001", index, dups, rows_in=5)


@pytest.mark.parametrize(("counts", "rows"), [([("a", 5), ("b", 0), ("c", 7)], 4), ([("a", 8)], 4), ([], 3)])
def test_shard_plan_has_fixed_rows_per_file(counts, rows):
    files = plan(counts, rows)
    sizes = [sum(n for _, _, n in f) for f in files]
    total = sum(n for _, n in counts)
    assert sum(sizes) == total
    assert all(s == rows for s in sizes[:-1]) and (not sizes or 0 < sizes[-1] <= rows)
    flat = [(name, o + i) for f in files for name, o, n in f for i in range(n)]
    assert flat == [(name, i) for name, n in counts for i in range(n)]  # order preserved, nothing twice


def test_language_cache_is_exact_and_bounded(monkeypatch):
    r = filt.RowRules(FilterConfig(languages=["en"]))
    monkeypatch.setattr(filt.RowRules, "LANGUAGE_CACHE", 2)
    texts = [
        "A small brown dog runs in the park",
        "Ein kleiner Hund rennt im Park",
        "Un petit chien court",
        "A small brown dog runs in the park",
    ]
    got, ref = [r.language(t) for t in texts], [r.detect_language(t) for t in texts]
    assert [g[0] for g in got] == [x[0] for x in ref]
    assert np.allclose([g[1] for g in got], [x[1] for x in ref], rtol=0, atol=1e-9)  # lingua's last bits vary
    assert len(r._cache) <= 2
    fresh = filt.RowRules(FilterConfig())
    assert fresh.language(texts[0]) is fresh.language(texts[0])  # one verdict per caption
