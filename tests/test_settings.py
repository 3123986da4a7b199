"""breen.settings, the one configuration engine: YAML files with `base:`, `--set` overrides, typed checks,
`--print-config`. The pipeline and training configs built on it are tested in test_pipelines_config.py,
test_jobs_config.py and test_launch.py."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field

import pytest
import yaml

from breen import settings
from breen.settings import ConfigError


@dataclass
class Inner:
    size: int = 1
    rate: float = 0.5
    names: list[str] = field(default_factory=list)


@dataclass
class Extra:
    port: int = 0


@dataclass
class Cfg:
    name: str = "run"
    inner: Inner = field(default_factory=Inner)
    lrs: dict[str, float] = field(default_factory=lambda: {"default": 1.0})
    extra: Extra | None = None


def test_base_chain_merges_mappings_and_replaces_other_values(tmp_path):
    (tmp_path / "a.yaml").write_text("name: a\ninner: {size: 2, names: [x, y]}\nlrs: {default: 2.0}\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.yaml").write_text("base: ../a.yaml\ninner: {names: [z]}\nlrs: {head: 3.0}\n")
    data = settings.read_yaml(tmp_path / "sub" / "b.yaml")
    assert data == {"name": "a", "inner": {"size": 2, "names": ["z"]}, "lrs": {"default": 2.0, "head": 3.0}}
    # a name of a shipped file, with or without .yaml
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    (shipped / "recipe.yaml").write_text("name: shipped\n")
    (tmp_path / "c.yaml").write_text("base: recipe\ninner: {size: 5}\n")
    assert settings.read_yaml(tmp_path / "c.yaml", shipped) == {"name": "shipped", "inner": {"size": 5}}


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("base: nowhere.yaml\n", "base: no config file 'nowhere.yaml'"),
        ("base: [1]\n", "base: expected the path of another config file"),
        ("base: self.yaml\n", "base: self.yaml includes itself"),
        ("- a\n- b\n", "top level must be a mapping"),
        ("a: [1\n", "not valid YAML"),
    ],
)
def test_bad_files_name_the_file(tmp_path, text, message):
    path = tmp_path / "self.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        settings.read_yaml(path)
    assert str(err.value).startswith(f"{path}: ") and message in str(err.value), str(err.value)


def test_a_base_cycle_is_refused(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="includes itself"):
        settings.read_yaml(tmp_path / "a.yaml")


def test_update_lays_a_file_over_a_config_strictly():
    cfg = Cfg()
    settings.update(cfg, {"inner": {"rate": "4e-4"}, "lrs": {"head": 2}, "extra": {"port": 9}})
    # a float written as YAML 1.1 reads it ("4e-4" is a string there) is a number; sections and mapping
    # fields merge key by key; an absent optional section is created
    assert cfg.inner == Inner(size=1, rate=4e-4) and cfg.extra == Extra(port=9)
    assert cfg.lrs == {"default": 1.0, "head": 2.0}
    with pytest.raises(ConfigError, match=r"^inner\.sise: unknown key \(allowed here: size, rate, names\)"):
        settings.update(cfg, {"inner": {"sise": 3}})
    with pytest.raises(ConfigError, match=r"^inner\.names: expected a list"):
        settings.update(cfg, {"inner": {"names": "a,b"}})  # files are strict: a list is a YAML list
    with pytest.raises(ConfigError, match=r"^name: expected a string, got 5"):
        settings.update(cfg, {"name": 5})


def test_set_reads_values_as_people_type_them():
    cfg = Cfg()
    for item in ("inner.size=8", "inner.names=a,b", "name=2024", "lrs.head=1e-4", "extra.port=7", "inner.rate=.5"):
        settings.apply_override(cfg, item)
    assert cfg.inner == Inner(size=8, rate=0.5, names=["a", "b"]) and cfg.name == "2024"
    assert cfg.lrs == {"default": 1.0, "head": 1e-4} and cfg.extra == Extra(port=7)


@pytest.mark.parametrize(
    ("item", "message"),
    [
        ("inner.size", "expected KEY=VALUE"),
        ("=3", "expected KEY=VALUE"),
        ("inner.size=[1", "inner.size: not valid YAML"),
        ("inner.size=eight", "inner.size: expected an integer, got 'eight'"),
        ("inner.size.x=1", "inner.size.x: not a section"),
        ("lrs.head.x=1", "lrs.head: not a section"),
        ("outer.size=1", "outer: unknown key (allowed here: name, inner, lrs, extra)"),
        ("inner.size=" + "[" * 5000, "inner.size: value nested too deeply to parse"),
    ],
)
def test_bad_overrides_name_the_field(item, message):
    with pytest.raises(ConfigError) as err:
        settings.apply_override(Cfg(), item)
    assert message in str(err.value), str(err.value)


def test_check_finite_names_every_non_finite_float():
    settings.check_finite(Cfg())
    for value, shown in ((float("inf"), "inf"), (float("nan"), "nan")):
        cfg = Cfg(lrs={"default": 1.0, "head": value})
        with pytest.raises(ConfigError, match=rf"^where: lrs\.head: must be a finite number, got {shown}$"):
            settings.check_finite(cfg, "where: ")
    with pytest.raises(ConfigError, match=r"inner\.rate: must be a finite number"):
        settings.check_finite(Cfg(inner=Inner(rate=float("-inf"))))


def test_to_yaml_round_trips_and_the_options_are_the_same_everywhere():
    cfg = Cfg(extra=Extra(port=3))
    assert settings.build(Cfg, yaml.safe_load(settings.to_yaml(cfg))) == cfg
    parser = argparse.ArgumentParser()
    settings.add_config_arguments(parser, "the file", required=True)
    args = parser.parse_args(["--config", "f.yaml", "--set", "a=1", "--set", "b=2", "--print-config"])
    assert (args.config, args.set, args.print_config) == ("f.yaml", ["a=1", "b=2"], True)
    assert "inner: size=1, rate=0.5, names=[]" in settings.sections_help(Cfg)
