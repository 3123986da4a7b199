"""Tests for the synthetic corpus, its local HTTP server, URL lists and SFT records."""

from __future__ import annotations

import csv
import hashlib
import itertools
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.csv as pacsv
import pyarrow.json as pajson
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines import synthetic as syn
from pipelines.synthetic import (
    EXPECT_TAGS,
    EXTRA_COLUMNS,
    LICENSES,
    SFT_EXPECT_TAGS,
    URL_LIST_COLUMNS,
    URL_LIST_FORMATS,
    URL_ONLY_TAGS,
    Corpus,
    closed_port_url,
    make_corpus,
    make_sft_corpus,
    min_corpus_size,
    serve,
    write_url_list,
)

REPO = Path(__file__).resolve().parents[1]
N = 64  # all special cases plus ~20 `ok` images; keeps the suite fast


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    return make_corpus(tmp_path_factory.mktemp("corpus"), n_images=N, seed=0)


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def _get(url: str) -> tuple[int, bytes, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.read(), r.headers.get("Content-Type", "")
    except urllib.error.HTTPError as e:
        return e.code, b"", ""


def _refused(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=5)
    except urllib.error.URLError as e:
        return isinstance(e.reason, ConnectionRefusedError)
    return False


def _phash(path: Path) -> np.ndarray:
    """DCT perceptual hash (64 bits), as imagehash.phash computes it."""
    g = np.asarray(Image.open(path).convert("L").resize((32, 32), Image.Resampling.LANCZOS), dtype=np.float64)
    n = np.arange(32)
    dct = np.cos(np.pi * (2 * n[None, :] + 1) * n[:, None] / 64) * np.sqrt(2 / 32)
    dct[0] /= np.sqrt(2)
    low = (dct @ g @ dct.T)[:8, :8]
    return (low > np.median(low)).flatten()


# ----------------------------------------------------------------------------- corpus


def test_deterministic(corpus: Corpus, tmp_path: Path) -> None:
    again = make_corpus(tmp_path / "again", n_images=N, seed=0)
    assert again.entries == corpus.entries
    assert _tree_digest(again.root) == _tree_digest(corpus.root)
    other = make_corpus(tmp_path / "other", n_images=N, seed=1)
    assert _tree_digest(other.root) != _tree_digest(corpus.root)


def test_too_small_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="too small"):
        make_corpus(tmp_path, n_images=min_corpus_size() - 1)


def test_every_special_case_present(corpus: Corpus) -> None:
    counts = corpus.counts()
    assert set(counts) == set(EXPECT_TAGS) - set(URL_ONLY_TAGS)
    assert sum(counts.values()) == len(corpus.entries) == N
    assert counts["ok"] == N - min_corpus_size() + 1
    assert len({e.path for e in corpus.entries}) == N
    assert len({e.extra["src_id"] for e in corpus.entries}) == N
    for e in corpus.entries:
        assert set(e.extra) == set(EXTRA_COLUMNS)
        assert e.extra["source"] == "synthetic" and e.extra["license"] in LICENSES
        assert corpus.file(e).is_file()
    exts = Counter(Path(e.path).suffix for e in corpus.entries)
    assert {".jpg", ".png", ".webp"} <= set(exts)


def test_broken_files_do_not_decode(corpus: Corpus) -> None:
    for tag in ("corrupt", "truncated", "zero_byte", "not_image"):
        for e in corpus.by_expect(tag):
            assert e.fmt is None
            with pytest.raises(OSError), Image.open(corpus.file(e)) as im:  # UnidentifiedImageError too
                im.load()
    assert corpus.file(corpus.by_expect("zero_byte")[0]).stat().st_size == 0
    assert corpus.file(corpus.by_expect("not_image")[0]).read_bytes().startswith(b"<!DOCTYPE html>")
    assert any(corpus.file(e).read_bytes()[:2] == b"\xff\xd8" for e in corpus.by_expect("truncated"))


def test_bomb(corpus: Corpus) -> None:
    (bomb,) = corpus.by_expect("bomb")
    data = corpus.file(bomb).read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) < 1_000_000
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert (width, height) == (bomb.width, bomb.height) and width * height > 1 << 30
    with pytest.raises(Image.DecompressionBombError):
        Image.open(corpus.file(bomb))


def test_valid_images_geometry(corpus: Corpus) -> None:
    for e in corpus.entries:
        if e.fmt is None or e.expect == "bomb":
            continue
        with Image.open(corpus.file(e)) as im:
            im.load()
            assert (im.width, im.height, im.format) == (e.width, e.height, e.fmt), e
        assert e.width is not None and e.height is not None
        long_side, short_side = max(e.width, e.height), min(e.width, e.height)
        if e.expect == "tiny":
            assert long_side <= 64
        elif e.expect == "wide":
            assert long_side / short_side > 10
        elif e.expect == "large":
            assert long_side > 1.5 * 672
        elif e.expect == "small":
            assert long_side < 672 and short_side >= 200
        else:
            assert short_side >= 200 and long_side <= 1400 and long_side / short_side <= 2.5, e
    ok_sides = [max(e.width or 0, e.height or 0) for e in corpus.by_expect("ok")]
    assert min(ok_sides) >= 400 and any(s > 672 for s in ok_sides) and any(s < 672 for s in ok_sides)


def test_duplicates(corpus: Corpus) -> None:
    exact = [e for e in corpus.entries if e.expect == "exact_dup"]
    groups: dict[str, list[bytes]] = {}
    for e in exact:
        assert e.dup_group
        groups.setdefault(e.dup_group, []).append(corpus.file(e).read_bytes())
    assert len(groups) >= 2 and max(len(v) for v in groups.values()) >= 3
    for members in groups.values():
        assert len(members) >= 2 and len(set(members)) == 1
    assert len({e.caption for e in exact}) > len(groups)  # some copies differ in caption

    near = corpus.by_expect("near_dup")
    hashes = {
        e.path: _phash(corpus.file(e))
        for e in corpus.entries
        if e.fmt is not None and e.expect not in ("bomb", "tiny", "wide")
    }
    by_group: dict[str, list[str]] = {}
    for e in near:
        assert e.dup_group
        by_group.setdefault(e.dup_group, []).append(e.path)
    assert len(by_group) == 2
    for a, b in by_group.values():
        assert (corpus.root / a).read_bytes() != (corpus.root / b).read_bytes()
        assert int((hashes[a] != hashes[b]).sum()) <= 4
    group_of = {e.path: e.dup_group for e in corpus.entries if e.dup_group}
    for a, b in itertools.combinations(hashes, 2):
        if group_of.get(a) is None or group_of.get(a) != group_of.get(b):
            assert int((hashes[a] != hashes[b]).sum()) > 8, (a, b)


def test_captions(corpus: Corpus) -> None:
    def caps(tag: str) -> list[str]:
        return [e.caption for e in corpus.by_expect(tag)]

    assert caps("empty_caption") == [""]
    assert all(c and not c.strip() for c in caps("whitespace_caption"))
    assert any("<b>A red &amp; blue</b>" in c for c in caps("html_caption"))
    assert any("https://" in c for c in caps("url_caption")) and any("@" in c for c in caps("url_caption"))
    assert all("Ã" in c for c in caps("mojibake_caption"))
    assert "cafÃ© on the corner of the old street" in caps("mojibake_caption")
    assert all(len(c) > 2000 for c in caps("long_caption"))
    assert all(len(c.split()) == 1 for c in caps("one_word_caption"))
    assert {"Stock photo - image 12345", "click to enlarge"} <= set(caps("boilerplate_caption"))
    non_en = caps("non_english")
    assert len(non_en) == 5
    assert any("\u4e00" <= ch <= "\u9fff" for c in non_en for ch in c)  # Chinese
    assert any("\u0400" <= ch <= "\u04ff" for c in non_en for ch in c)  # Cyrillic
    assert all(len(c.split()) >= 6 or len(c) >= 12 for c in non_en)
    for e in corpus.by_expect("ok"):
        assert 3 <= len(e.caption.split()) <= 25 and e.caption.isascii(), e.caption
    for e in corpus.entries:
        assert "\n" not in e.caption and "\t" not in e.caption  # safe for pyarrow's CSV reader


# ----------------------------------------------------------------------------- server


def test_server_serves_and_404(corpus: Corpus) -> None:
    jpg = next(e for e in corpus.by_expect("ok") if e.fmt == "JPEG")
    webp = next(e for e in corpus.entries if e.fmt == "WEBP")
    with serve(corpus.root) as server:
        assert server.base_url.startswith("http://127.0.0.1:") and server.port > 0
        status, body, ctype = _get(f"{server.base_url}/{jpg.path}")
        assert (status, body, ctype) == (200, corpus.file(jpg).read_bytes(), "image/jpeg")
        assert _get(server.url(webp.path))[2] == "image/webp"
        assert _get(f"{server.base_url}/images/no-such-file.jpg")[0] == 404
        url = server.base_url
    assert _refused(url + "/")  # stopped on exit


def test_closed_port_refuses() -> None:
    url = closed_port_url()
    assert url.startswith("http://127.0.0.1:")
    assert _refused(url + "/images/x.jpg")


# ----------------------------------------------------------------------------- URL lists


def _read_back(path: Path, fmt: str) -> list[dict[str, str]]:
    if fmt == "parquet":
        return pq.read_table(path).to_pylist()
    if fmt == "jsonl":
        assert pajson.read_json(path).num_rows == len(path.read_text(encoding="utf-8").splitlines())
        return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    delimiter = "," if fmt == "csv" else "\t"
    # The reader img2dataset uses must agree with the csv module.
    table = pacsv.read_csv(path, parse_options=pacsv.ParseOptions(delimiter=delimiter))
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter=delimiter))
    assert table.column_names == list(URL_LIST_COLUMNS)
    assert table.to_pylist() == rows
    return rows


@pytest.mark.parametrize("fmt", URL_LIST_FORMATS)
def test_url_list_round_trip(corpus: Corpus, tmp_path: Path, fmt: str) -> None:
    path = tmp_path / f"urls.{fmt}"
    n = write_url_list(corpus, "http://127.0.0.1:9/", path, fmt, refused_url="http://127.0.0.1:1")
    rows = _read_back(path, fmt)
    assert n == len(rows) == len(corpus.entries) + 4 + 3
    assert list(rows[0]) == list(URL_LIST_COLUMNS)
    counts = Counter(r["expect"] for r in rows)
    assert counts["http_404"] == 4 and counts["conn_refused"] == 3
    assert {k: v for k, v in counts.items() if k not in URL_ONLY_TAGS} == corpus.counts()
    by_url = {r["url"]: r for r in rows}
    assert len(by_url) == n
    for e in corpus.entries:
        r = by_url[f"http://127.0.0.1:9/{e.path}"]
        assert r["caption"] == e.caption and r["expect"] == e.expect and r["dup_group"] == (e.dup_group or "")
        assert {k: r[k] for k in EXTRA_COLUMNS} == e.extra
    assert all(r["url"].startswith("http://127.0.0.1:1/") for r in rows if r["expect"] == "conn_refused")
    assert all(r["source"] == "synthetic" for r in rows)


def test_url_list_default_format_and_bad_format(corpus: Corpus, tmp_path: Path) -> None:
    assert write_url_list(corpus, "http://h", tmp_path / "u.jsonl") == len(corpus.entries) + 7
    assert (tmp_path / "u.jsonl").is_file()
    with pytest.raises(ValueError, match="unknown URL list format"):
        write_url_list(corpus, "http://h", tmp_path / "u.xlsx")


def test_url_list_outcomes_over_http(corpus: Corpus, tmp_path: Path) -> None:
    with serve(corpus.root) as server:
        write_url_list(corpus, server.base_url, tmp_path / "urls.parquet", "parquet")
        rows = pq.read_table(tmp_path / "urls.parquet").to_pylist()
        for r in rows:
            if r["expect"] == "conn_refused":
                assert _refused(r["url"]), r
            elif r["expect"] == "http_404":
                assert _get(r["url"])[0] == 404, r
            else:
                status, body, _ = _get(r["url"])
                assert (
                    status == 200
                    and body == (corpus.root / r["url"][len(server.base_url) + 1 :]).read_bytes()
                )


# ----------------------------------------------------------------------------- SFT


def test_sft_records(corpus: Corpus, tmp_path: Path) -> None:
    path = make_sft_corpus(corpus.root, corpus, n=40, seed=0)
    assert path == corpus.root / "sft.json"
    records = json.loads(path.read_text(encoding="utf-8"))
    assert isinstance(records, list) and len(records) == 40
    assert len({r["id"] for r in records}) == 40
    counts = Counter(r["expect"] for r in records)
    assert set(counts) == set(SFT_EXPECT_TAGS)
    assert counts["text_only"] >= 3 and counts["multi_turn"] >= 3
    for r in records:
        conv = r["conversations"]
        tag = r["expect"]
        if tag == "empty_conversations":
            assert conv == []
            continue
        roles = [t["from"] for t in conv]
        if tag == "bad_role":
            assert set(roles) - {"human", "gpt"}
            continue
        assert roles == ["human", "gpt"] * (len(conv) // 2) and len(conv) % 2 == 0
        assert all(isinstance(t["value"], str) and t["value"] for t in conv)
        if tag == "text_only":
            assert "image" not in r and "<image>" not in conv[0]["value"]
            continue
        assert conv[0]["value"].startswith("<image>\n")
        assert sum("<image>" in t["value"] for t in conv) == 1
        image = corpus.root / r["image"]
        if tag == "missing_image":
            assert not image.exists()
        else:
            assert image.is_file() and r["image"].startswith("images/")
            with Image.open(image) as im:
                im.load()
        if tag == "multi_turn":
            assert len(conv) >= 4
        if tag == "ok":
            assert len(conv) == 2
    # A different output folder gets paths relative to it.
    other = make_sft_corpus(tmp_path / "sft", corpus, n=10)
    for r in json.loads(other.read_text(encoding="utf-8")):
        if "image" in r and r["expect"] != "missing_image":
            assert (other.parent / r["image"]).is_file()


# ----------------------------------------------------------------------------- CLI


def test_cli_writes_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert syn.main([str(out), "--n", str(min_corpus_size()), "--format", "csv"]) == 0
    assert (out / "urls.csv").is_file() and (out / "sft.json").is_file()
    assert len(list((out / "images").iterdir())) == min_corpus_size()
    assert "urls.csv" in capsys.readouterr().out


def test_cli_serve_until_interrupted(tmp_path: Path) -> None:
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pipelines.synthetic",
            str(tmp_path),
            "--n",
            str(min_corpus_size()),
            "--serve",
        ],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONFAULTHANDLER": "1"},
    )
    try:
        assert proc.stdout is not None
        line = ""
        for line in proc.stdout:
            if line.startswith("serving"):
                break
        base_url = line.split(" at ")[1].split()[0]
        rows = pq.read_table(tmp_path / "urls.parquet").to_pylist()
        first = next(r for r in rows if r["expect"] == "ok")
        assert first["url"].startswith(base_url + "/")
        assert _get(first["url"])[0] == 200
        proc.send_signal(signal.SIGINT)
        try:
            code = proc.wait(timeout=30)
        except subprocess.TimeoutExpired:  # say where it is stuck: faulthandler dumps every thread on SIGABRT
            proc.send_signal(signal.SIGABRT)
            proc.wait(timeout=10)
            pytest.fail(f"no exit 30 s after SIGINT; the server's threads:\n{proc.stderr.read()[-4000:]}")
        assert code == 0, proc.stderr.read()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
