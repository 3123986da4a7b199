"""Checks before Ray starts (`pipelines.preflight`): every bad output folder or input fails with exit code 2
and a message naming the field and the file, `init_ray` is never called and nothing is written."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from breen.settings import ConfigError
from pipelines import download, preflight, prepare, raystart, sft_import, teacher


def config(tmp_path: Path, out: Path, urls: Path, extra: str = "") -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(f"output_dir: {out}\ninput: {{urls: [{urls}]}}\nteacher: {{random_init_seed: 0}}\n{extra}")
    return p


@pytest.fixture
def good_urls(tmp_path) -> Path:
    p = tmp_path / "urls.parquet"
    pq.write_table(pa.table({"url": ["http://127.0.0.1:1/a.jpg"], "caption": ["a cat on a mat"]}), p)
    return p


@pytest.fixture(autouse=True)
def ray_starts(monkeypatch) -> list:
    """Every call of `pipelines.raystart.init_ray` (none may happen: the checks come first). Recorded by
    patching it, not by asking Ray, because other tests of the session may have started Ray already."""
    calls: list = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("Ray was started before the inputs were checked")

    monkeypatch.setattr(raystart, "init_ray", refuse)
    return calls


def run_cli(main, cfg: Path, capsys, *sets: str) -> str:
    args = ["--config", str(cfg)] + [x for s in sets for x in ("--set", s)]
    assert main(args) == 2  # a Ray start would have raised instead (the `ray_starts` fixture)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_output_dir_that_is_a_file(tmp_path, good_urls, capsys):
    out = tmp_path / "out"
    out.write_text("not a folder")
    for main in (download.main, prepare.main, teacher.main):
        err = run_cli(main, config(tmp_path, out, good_urls), capsys)
        assert f"output_dir: {out} is a file, not a folder" in err
    err = run_cli(download.main, config(tmp_path, out / "sub", good_urls), capsys)
    assert f"output_dir: {out / 'sub'} cannot be created: {out} is a file" in err


@pytest.mark.parametrize(
    ("name", "text", "needle"),
    [
        ("urls.csv", "link,caption\nhttp://a/b.jpg,a cat\n", "URL list has no 'url' column"),
        ("urls.tsv", "url\ttext\nhttp://a/b.jpg\ta cat\n", "URL list has no 'caption' column"),
        ("urls.jsonl", '{"url": "http://a/b.jpg", "caption": "x", "sha256": "y"}\n', "clash with columns"),
        ("urls.jsonl", '["http://a/b.jpg"]\n', "not an object"),
        ("urls.parquet", "not parquet", "cannot read as parquet"),
        ("urls.txt", "http://a/b.jpg\n", "unknown URL-list format"),
    ],
)
def test_bad_url_list_fails_before_ray_and_writes_nothing(tmp_path, capsys, name, text, needle):
    urls = tmp_path / name
    urls.write_text(text)
    out = tmp_path / "out"
    for main in (prepare.main, download.main):
        err = run_cli(main, config(tmp_path, out, urls), capsys)
        assert "input.urls[0]: " in err and needle in err and name in err, err
    assert not out.exists()  # no empty download/_input/ left behind


def test_url_list_columns_reads_only_the_header(tmp_path):
    csv = tmp_path / "urls.csv"
    csv.write_text("url,caption,extra\n" + "http://a/b.jpg,a cat,1\n" * 1000)
    assert download.url_list_columns(csv) == ["url", "caption", "extra"]
    jsonl = tmp_path / "urls.jsonl"
    jsonl.write_text('\n{"url": "u", "caption": "c"}\nnot json at all\n')  # only the first record is read
    assert download.url_list_columns(jsonl) == ["url", "caption"]


@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b'{"image": "a.jpg"}', 'expected a JSON array of records, the file starts with \'{"image"'),
        (b"\xff\xfe[not utf8", "not UTF-8 text"),
    ],
)
def test_sft_json_is_checked_before_ray(tmp_path, good_urls, capsys, content, needle):
    sft = tmp_path / "sft.json"
    sft.write_bytes(content)
    extra = f"  sft: {{json: {sft}, image_folder: {tmp_path}}}\n"
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(f"output_dir: {tmp_path / 'out'}\ninput:\n  urls: [{good_urls}]\n{extra}"
                   "teacher: {random_init_seed: 0}\n")  # fmt: skip
    for main in (sft_import.main, prepare.main):
        err = run_cli(main, cfg, capsys)
        assert f"input.sft.json: {sft}: {needle}" in err, err
    assert not (tmp_path / "out").exists()


def test_a_valid_sft_json_with_a_multibyte_character_at_the_cut_passes(tmp_path):
    sft = tmp_path / "sft.json"
    sft.write_text(
        json.dumps([{"conversations": [{"from": "human", "value": "é" * 3000}]}], ensure_ascii=False)
    )
    preflight.sft_json(sft)


def test_unloadable_teacher_weights_fail_before_ray(tmp_path, good_urls, capsys):
    weights = tmp_path / "clip.safetensors"
    weights.write_bytes(b"\x00" * 64)
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(
        f"output_dir: {tmp_path / 'out'}\ninput: {{urls: [{good_urls}]}}\nteacher: {{weights: {weights}}}\n"
    )
    for main in (prepare.main, teacher.main):
        err = run_cli(main, cfg, capsys)
        assert f"teacher.weights: {weights}: cannot be loaded" in err, err
    assert not (tmp_path / "out").exists()


def test_steps_of_prepare_include_the_sft_chain_only_with_an_sft_input(tmp_path, good_urls):
    from pipelines.config import load_config

    cfg = load_config(config(tmp_path, tmp_path / "out", good_urls))
    assert preflight.steps_of(cfg) == ["download", "captions", "filter", "shards"]
    with pytest.raises(ConfigError, match=r"input\.urls: no URL list given"):
        cfg.input.urls = []
        preflight.check(cfg, ["download"])
