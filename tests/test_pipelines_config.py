"""Config loading fails fast with messages naming the bad field or file."""

from pathlib import Path

import pytest

from breen.settings import ConfigError
from pipelines.config import load_config


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


def _float_fields() -> list[str]:
    """Dotted names of every float field in the config's sections (`PrepareConfig` and nested)."""
    import dataclasses
    import typing

    from pipelines.config import PrepareConfig

    def walk(cls: type, prefix: str) -> list[str]:
        out = []
        for name, tp in typing.get_type_hints(cls).items():
            args = typing.get_args(tp) or (tp,)
            inner = [a for a in args if dataclasses.is_dataclass(a)]
            if inner:
                out += walk(inner[0], f"{prefix}{name}.")
            elif float in args and prefix:  # section fields (top-level ones are set by the command line)
                out.append(prefix + name)
        return out

    return walk(PrepareConfig, "")


@pytest.mark.parametrize("value", [".nan", ".inf", "-.inf"])
@pytest.mark.parametrize("name", _float_fields())
def test_every_float_field_must_be_finite(tmp_path, name, value):
    *sections, key = name.split(".")
    text = (
        "".join(f"{'  ' * i}{s}:\n" for i, s in enumerate(sections))
        + f"{'  ' * len(sections)}{key}: {value}\n"
    )
    if name.startswith("teacher."):
        text = text.replace("teacher:\n", "teacher:\n  random_init_seed: 0\n")
    else:
        text += "teacher: {random_init_seed: 0}\n"
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text))
    assert f"cfg.yaml: {name}: must be a finite number" in str(e.value)


def test_float_fields_are_all_checked():
    assert {"download.timeout_s", "download.total_timeout_s", "filter.max_aspect_ratio",
            "filter.language_min_ratio", "teacher.num_gpus_per_actor"} <= set(_float_fields())  # fmt: skip


@pytest.mark.parametrize(
    "name",
    ["download.cpus_per_shard", "filter.cpus_per_actor", "captions.cpus_per_actor", "teacher.cpus_per_actor",
     "teacher.num_gpus_per_actor"],
)  # fmt: skip
def test_resource_floats_must_be_positive(tmp_path, name):
    with pytest.raises(ConfigError, match=rf"cfg\.yaml: {name}: must be > 0"):
        load_config(write(tmp_path, "teacher: {random_init_seed: 0}\n"), [f"{name}=0"])


def test_absurdly_nested_yaml_is_a_config_error(tmp_path, capsys):
    """A config file or a --set value nested 100,000 levels deep: a ConfigError naming the file or the key,
    not an uncaught RecursionError (PyYAML recurses once per level)."""
    deep = "[" * 100_000 + "]" * 100_000
    path = write(tmp_path, f"teacher: {{random_init_seed: 0}}\nfilter: {{languages: {deep}}}\n")
    with pytest.raises(ConfigError, match=r"cfg\.yaml: not valid YAML: nested too deeply to parse"):
        load_config(path)
    ok = tmp_path / "ok.yaml"
    ok.write_text("teacher: {random_init_seed: 0}\n")
    with pytest.raises(ConfigError, match=r"ok\.yaml: filter\.languages: value nested too deeply to parse"):
        load_config(ok, [f"filter.languages={deep}"])
    with pytest.raises(ConfigError, match=r"filter\.languages: not valid YAML"):
        load_config(ok, ["filter.languages=[en"])
    from pipelines import download

    assert download.main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "nested too deeply" in err and "cfg.yaml" in err and "Traceback" not in err
    assert download.main(["--config", str(ok), "--set", "download.timeout_s=.inf"]) == 2
    assert "download.timeout_s: must be a finite number, got inf" in capsys.readouterr().err
