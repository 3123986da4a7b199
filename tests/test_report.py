"""The HTML report on a small synthetic output directory (no Ray)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines import fingerprint, layout, report
from pipelines.captions import clean_table
from pipelines.config import CaptionsConfig

D = 8  # feature width of the fake teacher


def _images(n: int, start: int, rng: np.random.Generator) -> pa.Table:
    w = rng.integers(40, 672, n)
    h = rng.integers(40, 672, n)
    return pa.table({
        "key": [f"{i:012d}" for i in range(start, start + n)],
        "url": [f"http://127.0.0.1/{i}.jpg" for i in range(start, start + n)],
        "caption": [f"<b>photo</b> number {i} &amp; friends | Shutterstock" for i in range(start, start + n)],
        "image": pa.array([b"\xff\xd8" + bytes(16)] * n, pa.binary()),
        "width": pa.array(w, pa.int32()),
        "height": pa.array(h, pa.int32()),
        "original_width": pa.array(w * 2, pa.int32()),
        "original_height": pa.array(h * 2, pa.int32()),
        "sha256": [f"{i:064x}" for i in range(start, start + n)],
    })  # fmt: skip


def _tensor(a: np.ndarray, null_rows: tuple[int, ...] = ()) -> pa.ExtensionArray:
    n, tokens, dim = a.shape
    mask = pa.array([i in null_rows for i in range(n)]) if null_rows else None
    storage = pa.FixedSizeListArray.from_arrays(pa.array(a.reshape(-1)), tokens * dim, mask=mask)
    return pa.ExtensionArray.from_storage(pa.fixed_shape_tensor(pa.float16(), [tokens, dim]), storage)


def build_output_dir(root: Path, n_shards: int = 2, rows: int = 30) -> dict[str, dict[str, int]]:
    """download -> captions -> filter -> shards, two shards each, written with layout.write_shard."""
    rng = np.random.default_rng(0)
    expect: dict[str, dict[str, int]] = {}
    fps = {step: fingerprint.record(root / step, {"step": step}) for step in ("download", "captions", "filter", "shards")}

    def add(step: str, rows_in: int, kept: int, rejected: int) -> None:
        e = expect.setdefault(step, {"rows_in": 0, "kept": 0, "rejected": 0})
        e["rows_in"] += rows_in
        e["kept"] += kept
        e["rejected"] += rejected

    for s in range(n_shards):
        name = layout.shard_name(s)
        table = _images(rows, s * rows, rng)
        # download: the last 3 rows failed
        kept, bad = table.slice(0, rows - 3), table.slice(rows - 3)
        bad = layout.with_reason(bad.select(["key", "url", "caption"]), "download_error", "HTTP 404")
        layout.write_shard(root / "download", name, kept, bad, rows, {"seconds": 2.0})
        add("download", rows, kept.num_rows, bad.num_rows)
        # captions: one caption is only markup
        captions = kept.column("caption").to_pylist()
        captions[0] = "<p></p>"
        kept = kept.set_column(2, "caption", pa.array(captions))
        ckept, crejected = clean_table(kept, CaptionsConfig())
        layout.write_shard(root / "captions", name, ckept, crejected, kept.num_rows, {"seconds": 0.5})
        add("captions", kept.num_rows, ckept.num_rows, crejected.num_rows)
        # filter: 4 too small, 5 wrong language; languages (some undetected) on kept rows
        n = ckept.num_rows
        langs = pa.array((["en", "en", "de", None, "fr"] * n)[:n], pa.string())
        with_lang = ckept.append_column("language", langs).append_column("phash", pa.array(["0" * 16] * n))
        small = layout.with_reason(with_lang.slice(0, 4).drop_columns(["image"]), "too_small", "64x40")
        lang = with_lang.slice(4, 5).drop_columns(["language", "image"])
        lang = lang.append_column("language", pa.array(["ru", "zh", "ru", None, "ja"]))
        lang = layout.with_reason(lang, "language", "detected other language")
        fkept = with_lang.slice(9)
        frejected = layout.concat([small, lang])
        layout.write_shard(root / "filter", name, fkept, frejected, n, {"seconds": 1.0})
        add("filter", n, fkept.num_rows, frejected.num_rows)
        ckept = fkept
        # teacher: features for every kept row, one null row in the first shard
        m = ckept.num_rows
        fine = rng.normal(0, 1, (m, 64, D)).astype(np.float16)
        coarse = (3 * rng.normal(0, 1, (m, 36, D))).astype(np.float16)
        tkept = ckept.select(["key", "width", "height"]).append_column(
            "fine", _tensor(fine, (1,) if s == 0 else ())
        )
        tkept = tkept.append_column("coarse", _tensor(coarse))
        empty = layout.with_reason(ckept.select(["key"]).slice(0, 0), [], [])
        layout.write_shard(root / "shards", name, tkept, empty, m, {"seconds": 4.0})
        add("shards", m, m, 0)
    for step in expect:
        layout.write_manifest(root / step, step, [], {step: {"example": 1}}, fps[step])
    return expect


def test_report_on_synthetic_run(tmp_path):
    expect = build_output_dir(tmp_path)
    index = report.write_report(tmp_path)
    assert index.path == str(tmp_path / "report" / "index.html") and index.local
    page = index.read_text()
    for plot in report.PLOTS:
        png = tmp_path / "report" / f"{plot}.png"
        assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", plot
        assert f'src="{plot}.png"' in page  # relative paths
    for step, e in expect.items():
        row = re.search(rf"<tr><td>{step}</td>(.*?)</tr>", page)
        assert row, step
        cells = re.findall(r"<td>(.*?)</td>", row.group(1))
        assert cells[:4] == ["2", f"{e['rows_in']:,}", f"{e['kept']:,}", f"{e['rejected']:,}"], step
        assert 'class="ok">✓' in cells[5]
    assert "download_error: 6" in page and "too_small: 8" in page and "language: 10" in page
    assert "empty_caption: 2" in page
    # every pre-training step is there (a missing one is named: test_missing_steps_and_columns_do_not_crash)
    assert "steps not found" not in page
    # language table: kept languages and rejected ones
    assert "<td>ru</td>" in page and "<td>unknown</td>" in page
    # teacher: shapes and the null row were seen
    assert "64x8" in page and "36x8" in page
    assert "✗" not in page


def test_report_accounting_mismatch_and_unfinished_shard(tmp_path):
    build_output_dir(tmp_path, n_shards=1)
    stats_file = layout.stats_path(tmp_path / "filter", "part-00000")
    stats = json.loads(stats_file.read_text())
    stats["rows_in"] += 1  # a lost row
    stats_file.write_text(json.dumps(stats))
    pq.write_table(pa.table({"key": ["x"]}), tmp_path / "captions" / "part-00001.parquet")  # no marker
    page = report.write_report(tmp_path).read_text()
    assert "✗" in page and "rows were lost or duplicated" in page
    assert "1 shard(s) without a completion marker" in page


def test_missing_steps_and_columns_do_not_crash(tmp_path):
    # only a download step, without original sizes, no seconds
    t = _images(10, 0, np.random.default_rng(1)).drop_columns(["original_width", "original_height"])
    empty = layout.with_reason(t.select(["key"]).slice(0, 0), [], [])
    for step in ("download", "shards", "captions"):
        fingerprint.record(tmp_path / step, {"step": step})
    layout.write_shard(tmp_path / "download", "part-00000", t, empty, 10)
    # a step folder without finished shards
    page = report.write_report(tmp_path).read_text()
    assert (tmp_path / "report" / "image_size.png").is_file()
    assert (tmp_path / "report" / "aspect_ratio.png").is_file()
    assert not (tmp_path / "report" / "teacher_norms.png").exists()
    assert "no captions step" in page and "no filter step" in page and "no shards step" in page
    assert "shards (no finished shards)" in page
    assert "no <code>seconds</code>" in page and "no rejected rows" in page

    # a shards step whose features are not there, captions without caption_raw
    layout.write_shard(tmp_path / "shards", "part-00000", t.select(["key"]), empty, 10)
    layout.write_shard(tmp_path / "captions", "part-00000", t.select(["key", "caption"]), empty, 10)
    page = report.write_report(tmp_path).read_text()
    assert "no fine/coarse columns" in page and "no caption/caption_raw columns" in page


def test_discover_steps(tmp_path):
    empty = layout.with_reason(pa.table({"key": pa.array([], pa.string())}), [], [])
    for step in ("sft_shards", "custom_step", "captions", "sft_import"):
        fingerprint.record(tmp_path / step, {"step": step})
        layout.write_shard(tmp_path / step, "part-00000", pa.table({"key": ["a"]}), empty, 1)
    (tmp_path / "synthetic").mkdir()  # not a step: no markers, no manifest
    (tmp_path / "synthetic" / "urls.parquet").write_bytes(b"")
    (tmp_path / "report").mkdir()
    assert report.discover_steps(tmp_path) == ["captions", "sft_import", "sft_shards", "custom_step"]
    page = report.write_report(tmp_path).read_text()
    assert "<td>custom_step</td>" in page and "<td>sft_import</td>" in page
    assert "download, filter, shards" in page  # the missing pre-training steps


def test_empty_and_missing_directory(tmp_path, capsys):
    page = report.write_report(tmp_path).read_text()
    assert "nothing to report" in page
    assert report.main([str(tmp_path / "nope")]) == 2
    assert "not a pipeline output directory" in capsys.readouterr().err
    assert report.main([str(tmp_path)]) == 0


def test_teacher_norms_sampling_is_bounded(tmp_path):
    a = np.full((50, 64, D), 0.5, np.float16)  # every token has norm sqrt(D) * 0.5
    for s in range(3):
        t = pa.table({"key": [str(i) for i in range(50)], "fine": _tensor(a, (0, 1))})
        pq.write_table(t, tmp_path / f"part-{s:05d}.parquet", row_group_size=16)
    files = sorted(tmp_path.glob("part-*.parquet"))
    info = report.teacher_norms(files, ["fine"], max_rows=40, max_files=64)
    assert 40 <= info["rows"] <= 42  # about max_rows, spread over the files
    norms = info["norms"]["fine"]
    assert norms.size == (info["rows"] - info["nulls"]["fine"]) * 64
    assert np.allclose(norms, 0.5 * np.sqrt(D), rtol=1e-3)


@pytest.mark.parametrize("k", [1, 3, 64])
def test_spread_picks_evenly(k):
    items = [Path(str(i)) for i in range(10)]
    picked = report._spread(items, k)
    assert len(picked) == min(k, 10) and picked[0] == items[0]
