"""Config loading fails fast with messages naming the bad field or file."""

from pathlib import Path

import pytest

from pipelines.config import ConfigError, load_config


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "cfg.yaml"
    p.write_text(text)
    return p


def test_minimal_config_and_preset(tmp_path):
    cfg = load_config(write(tmp_path, "teacher: {random_init_seed: 0}\nfilter: {preset: datacomp-basic}\n"))
    assert cfg.filter.min_short_side == 200
    assert cfg.filter.max_aspect_ratio == 3.0
    assert cfg.filter.languages == ["en"]
    assert cfg.filter.min_words == 3 and cfg.filter.min_chars == 6


def test_explicit_value_beats_preset(tmp_path):
    cfg = load_config(
        write(
            tmp_path, "teacher: {random_init_seed: 0}\nfilter: {preset: datacomp-basic, min_short_side: 64}\n"
        )
    )
    assert cfg.filter.min_short_side == 64


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("filter: {min_sise: 3}\nteacher: {random_init_seed: 0}\n", "filter.min_sise: unknown key"),
        (
            "download: {rows_per_shard: many}\nteacher: {random_init_seed: 0}\n",
            "download.rows_per_shard: expected an integer",
        ),
        ("filter: {languages: en}\nteacher: {random_init_seed: 0}\n", "filter.languages: expected a list"),
        ("teacher: {random_init_seed: 0}\nbogus: 1\n", "bogus: unknown key"),
        ("teacher: {batch_size: 4}\n", "teacher.weights: set exactly one"),
        ("input: {urls: [nope.parquet]}\nteacher: {random_init_seed: 0}\n", "input.urls[0]: file not found"),
        ("teacher: {weights: missing.safetensors}\n", "teacher.weights: file not found"),
        ("filter: {preset: laion}\nteacher: {random_init_seed: 0}\n", "filter.preset: unknown preset"),
    ],
)
def test_bad_configs_name_the_field(tmp_path, text, needle):
    with pytest.raises(ConfigError, match=None) as e:
        load_config(write(tmp_path, text))
    assert needle in str(e.value)
    assert "cfg.yaml" in str(e.value)


def test_overrides(tmp_path):
    cfg = load_config(
        write(tmp_path, "teacher: {random_init_seed: 0}\n"),
        ["teacher.batch_size=7", "filter.languages=[en, de]"],
    )
    assert cfg.teacher.batch_size == 7
    assert cfg.filter.languages == ["en", "de"]


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_step_cli_reports_bad_input_without_a_traceback(tmp_path, capsys):
    from pipelines import download, filter

    urls = tmp_path / "urls.csv"
    urls.write_text("link,caption\nhttp://example.com/a.jpg,a cat\n")
    cfg = write(
        tmp_path,
        f"output_dir: {tmp_path / 'out'}\ninput: {{urls: [{urls}]}}\nteacher: {{random_init_seed: 0}}\n",
    )
    assert download.main(["--config", str(cfg)]) == 2
    assert "urls.csv: URL list has no 'url' column" in capsys.readouterr().err
    assert filter.main(["--config", str(cfg)]) == 2
    assert "no finished shards" in capsys.readouterr().err
    assert download.main(["--config", str(cfg), "--set", "download.rows_per_shard=0"]) == 2
    assert "download.rows_per_shard: must be > 0" in capsys.readouterr().err
