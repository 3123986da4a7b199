"""Download step: URL-list formats and errors, the address guard, and one real img2dataset shard."""

from __future__ import annotations

import io
import json
import urllib.request

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from breen.settings import ConfigError
from pipelines import download, fingerprint, layout
from pipelines.config import DownloadConfig, to_dict
from pipelines.guard import (
    AddressPolicy,
    Limits,
    RefusedURL,
    check_image_header,
    install_guarded_opener,
    vet_url,
)
from pipelines.synthetic import serve


@pytest.mark.parametrize("fmt", ["parquet", "csv", "tsv", "jsonl"])
def test_url_list_formats_carry_extra_columns(tmp_path, fmt):
    rows = [{"url": f"http://example.com/{i}.jpg", "caption": f"a, \"quoted\" caption {i}", "license": "cc-by"}
            for i in range(3)]  # fmt: skip
    path = tmp_path / f"urls.{fmt}"
    if fmt == "parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        import csv

        with open(path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=list(rows[0]), delimiter="," if fmt == "csv" else "\t")
            w.writeheader()
            w.writerows(rows)
    t = download.read_url_list(path)
    assert t.column_names == ["url", "caption", "license"]
    assert t.to_pylist() == rows


def test_url_list_without_url_column_fails_naming_the_file(tmp_path):
    path = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"link": ["http://x/y.jpg"], "caption": ["c"]}), path)
    with pytest.raises(ConfigError, match=r"bad\.parquet.*no 'url' column"):
        download.read_url_list(path)


def test_url_list_with_clashing_column_fails(tmp_path):
    path = tmp_path / "clash.csv"
    path.write_text("url,caption,width\nhttp://x/y.jpg,c,3\n")
    with pytest.raises(ConfigError, match="width"):
        download.read_url_list(path)


def test_input_shards_are_deterministic(tmp_path):
    path = tmp_path / "u.parquet"
    pq.write_table(pa.table({"url": [f"http://x/{i}" for i in range(10)], "caption": ["c"] * 10}), path)
    names = download.make_input_shards([str(path)], 4, tmp_path / "a")
    again = download.make_input_shards([str(path)], 4, tmp_path / "b")
    assert names == again == ["part-00000", "part-00001", "part-00002"]
    for n in names:
        assert (tmp_path / "a" / f"{n}.arrow").read_bytes() == (tmp_path / "b" / f"{n}.arrow").read_bytes()
    keys = [
        k
        for n in names
        for k in pa.ipc.open_file(tmp_path / "a" / f"{n}.arrow").read_all()["key"].to_pylist()
    ]
    assert keys == [f"{i:012d}" for i in range(10)]


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/x.jpg",
        "http://localhost:8080/x.jpg",
        "http://10.1.2.3/x.jpg",
        "http://192.168.0.1/x.jpg",
        "http://172.16.5.4/x.jpg",
        "http://169.254.169.254/latest/meta-data/",
        "http://metadata.google.internal/computeMetadata/v1/",
        "http://[::1]/x.jpg",
        "http://[fe80::1]/x.jpg",
        "http://224.0.0.1/x.jpg",
        "http://0.0.0.0/x.jpg",
        "file:///etc/passwd",
        "ftp://example.com/x.jpg",
        "http:///nohost",
        "http://exa mple.com/x.jpg",
        "",
    ],
)
def test_non_public_and_malformed_urls_are_refused(url):
    with pytest.raises(RefusedURL):
        vet_url(url, AddressPolicy())


def test_allow_list_admits_only_what_it_names():
    policy = AddressPolicy(["127.0.0.1"])
    vet_url("http://127.0.0.1:9/x.jpg", policy)
    with pytest.raises(RefusedURL):
        vet_url("http://10.0.0.1/x.jpg", policy)
    with pytest.raises(RefusedURL):
        vet_url("http://169.254.169.254/", AddressPolicy(["10.0.0.0/8"]))


def test_guarded_opener_refuses_loopback_connections_and_big_responses(tmp_path):
    (tmp_path / "big.bin").write_bytes(b"x" * 5000)
    (tmp_path / "small.bin").write_bytes(b"y" * 10)
    with serve(tmp_path) as server:
        install_guarded_opener(AddressPolicy(), Limits(max_bytes=1000))
        try:
            with pytest.raises(RefusedURL, match="not public"):
                urllib.request.urlopen(server.url("small.bin"), timeout=5)
            install_guarded_opener(AddressPolicy(["127.0.0.1"]), Limits(max_bytes=1000))
            assert urllib.request.urlopen(server.url("small.bin"), timeout=5).read() == b"y" * 10
            with pytest.raises(RefusedURL, match="too large"):
                urllib.request.urlopen(server.url("big.bin"), timeout=5).read()
        finally:
            urllib.request.install_opener(urllib.request.build_opener())


def test_decode_guard_refuses_bombs_before_decoding():
    buf = io.BytesIO()
    Image.new("1", (20000, 20000)).save(buf, "PNG")
    with pytest.raises(ValueError, match="decompression bomb"):
        check_image_header(buf.getvalue(), max_pixels=100_000_000)
    with pytest.raises(ValueError, match="not a decodable image"):
        check_image_header(b"<html>not an image</html>", 10**8)
    with pytest.raises(ValueError, match="empty"):
        check_image_header(b"", 10**8)


def test_one_shard_with_real_img2dataset(tmp_path):
    """A shard through the real img2dataset Downloader: resized, hashed, every row accounted for."""
    site = tmp_path / "site"
    site.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (900, 1200, 3), np.uint8)).save(site / "big.jpg")
    Image.fromarray(rng.integers(0, 255, (100, 150, 3), np.uint8)).save(site / "small.png")
    (site / "junk.jpg").write_bytes(b"\xff\xd8 not really a jpeg")
    with serve(site) as server:
        urls = [server.url("big.jpg"), server.url("small.png"), server.url("junk.jpg"), server.url("nope.jpg"),
                "http://10.0.0.1/private.jpg", "not a url"]  # fmt: skip
        path = tmp_path / "urls.parquet"
        pq.write_table(
            pa.table({"url": urls, "caption": [f"c{i}" for i in range(6)], "tag": list("abcdef")}), path
        )
        in_dir, out = tmp_path / "in", tmp_path / "out"
        (name,) = download.make_input_shards([str(path)], 100, in_dir)
        cfg = DownloadConfig(allow_private=["127.0.0.1"], timeout_s=5)
        fingerprint.record(out, {"step": "download"})  # what the step records before its shards
        stats = download.download_one_shard(name, str(in_dir), str(out), to_dict(cfg), 10**8)
    assert stats["rows_in"] == 6 and stats["kept"] == 2
    assert stats["rejected"] == {"decode_error": 1, "download_error": 1, "url_refused": 2}
    kept = pq.read_table(out / f"{name}.parquet").to_pylist()
    big, small = kept
    assert (big["original_width"], big["original_height"], big["width"], big["height"]) == (
        1200,
        900,
        672,
        504,
    )
    assert (small["width"], small["height"]) == (150, 100)  # never upscaled
    assert big["tag"] == "a" and small["tag"] == "b"
    assert Image.open(io.BytesIO(big["image"])).size == (672, 504)
    assert len(big["sha256"]) == 64
    rejected = pq.read_table(out / "rejected" / f"{name}.parquet").to_pylist()
    assert [r["tag"] for r in rejected] == ["c", "d", "e", "f"]
    assert all(r["detail"] for r in rejected)
    assert layout.done_marker(out, name).exists()
