"""One configuration engine for every command: typed dataclass configs from YAML files and ``--set``.

Every entrypoint (`pipelines.prepare` and each step, `jobs.train`, `breen.convert`) takes its config the
same way:

    python -m MODULE --config FILE.yaml [--set KEY=VALUE ...] [--print-config]

- A config file is YAML. ``base: OTHER.yaml`` makes it "OTHER plus these changes" (deep merge: mappings
  merge key by key, any other value replaces; a path relative to the file, or the name of a shipped file).
- ``--set dotted.key=value`` overrides one field after the files. The value is YAML (``8``, ``true``,
  ``null``, ``[a, b]``, ``{default: 2e-5}``); on the command line only, a list field also takes
  ``a,b`` and a text field a number.
- Checking is one pass over the typed config (`build`, `set_field`): an unknown key names the allowed
  ones, a wrong type names the field and the value, a float is finite everywhere (`check_finite`); each
  config module adds only its range checks. Errors are `ConfigError` with the dotted field (and the file).
- ``--print-config`` prints the resolved config as YAML and exits: what the run would use.

Imports only the standard library and PyYAML: ``--help`` of every command stays well under a second.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad config value; the message names the dotted field (and the file when there is one)."""


# ----------------------------------------------------------------------------- typed values
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def convert_value(tp: Any, value: Any, where: str, cli: bool = False) -> Any:
    """Check/convert one value against a type hint; raise ConfigError naming `where`.

    Files and saved configs are read strictly, except that a number written as a string is a number
    (YAML 1.1 reads ``4e-4`` as a string). Command-line values (``cli=True``) are also read as people
    type them: ``None`` is null, ``a,b`` is a list and a number is accepted where text is expected.
    """
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (cli and value == "None"):
            if type(None) in args:
                return None
            raise ConfigError(f"{where}: must not be null")
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return convert_value(a, value, where, cli)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {value!r} matches none of {tp}")
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {type(value).__name__}")
        return build(tp, value, where, cli)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: expected a mapping, got {value!r}")
        _, item = typing.get_args(tp)
        return {str(k): convert_value(item, v, f"{where}.{k}", cli) for k, v in value.items()}
    if origin is list:
        (item,) = typing.get_args(tp)
        if cli and isinstance(value, str):
            value = [v for v in value.split(",") if v]
        if not isinstance(value, (list, tuple) if cli else list):
            raise ConfigError(f"{where}: expected a list, got {type(value).__name__} ({value!r})")
        return [convert_value(item, v, f"{where}[{i}]", cli) for i, v in enumerate(value)]
    if value is None:
        raise ConfigError(f"{where}: must not be null")
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if cli and isinstance(value, (int, float)) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported type {_type_name(tp)}")


def _fields(cls: type) -> tuple[dict[str, Any], list[str]]:
    """(type hints, names of the settable fields) of a config dataclass."""
    return typing.get_type_hints(cls), [f.name for f in dataclasses.fields(cls) if f.init]


def build(cls: type, data: dict[str, Any], prefix: str = "", cli: bool = False) -> Any:
    """Dataclass `cls` from plain data: unknown keys and wrong types raise ConfigError naming the field."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    hints, names = _fields(cls)
    kwargs = {}
    for key, value in data.items():
        where = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"{where}: unknown key (allowed here: {', '.join(sorted(names))})")
        kwargs[key] = convert_value(hints[key], value, where, cli)
    return cls(**kwargs)


def update(cfg: Any, data: dict[str, Any], prefix: str = "") -> None:
    """Lay a mapping from a file over a config dataclass in place: sections and mapping fields merge key
    by key (an absent optional section is created first), any other value replaces the field (strictly
    typed), as `merge` does for files."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'}: expected a mapping, got {type(data).__name__}")
    hints, names = _fields(type(cfg))
    for key, value in data.items():
        where = f"{prefix}.{key}" if prefix else str(key)
        if key not in names:
            raise ConfigError(f"{where}: unknown key (allowed here: {', '.join(names)})")
        child = getattr(cfg, key)
        if child is None and isinstance(value, dict) and _optional_section(hints[key]) is not None:
            child = _optional_section(hints[key])()
            setattr(cfg, key, child)
        if dataclasses.is_dataclass(child) and isinstance(value, dict):
            update(child, value, where)
        elif isinstance(child, dict) and isinstance(value, dict):  # a mapping field (learning rates) merges too
            child.update(convert_value(hints[key], value, where))
        else:
            setattr(cfg, key, convert_value(hints[key], value, where))


def _optional_section(tp: Any) -> type | None:
    """The dataclass of a ``Section | None`` hint, else None."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    return args[0] if len(args) == 1 and dataclasses.is_dataclass(args[0]) else None


def set_field(cfg: Any, key: str, value: Any, cli: bool = True) -> None:
    """Set dotted field `key` of a config dataclass in place (a key of a mapping field such as
    ``optim.lrs.patch_embed`` included; an absent optional section is created with its defaults)."""
    parts = key.split(".")
    node, where = cfg, ""
    for i, part in enumerate(parts):
        where = f"{where}.{part}" if where else part
        last = i == len(parts) - 1
        if not dataclasses.is_dataclass(node):
            raise ConfigError(f"{where}: not a section")
        hints, names = _fields(type(node))
        if part not in names:
            raise ConfigError(f"{where}: unknown key (allowed here: {', '.join(names)})")
        if last:
            setattr(node, part, convert_value(hints[part], value, where, cli))
            return
        child = getattr(node, part)
        if child is None and _optional_section(hints[part]) is not None:
            child = _optional_section(hints[part])()
            setattr(node, part, child)
        if isinstance(child, dict):  # a mapping field: the item's type from the hint
            (_, item) = typing.get_args(hints[part])
            if len(parts) != i + 2:
                raise ConfigError(f"{where}.{parts[i + 1]}: not a section")
            child[parts[-1]] = convert_value(item, value, f"{where}.{parts[-1]}", cli)
            return
        node = child


def parse_value(raw: str, key: str) -> Any:
    """A ``--set`` value as YAML; text that is not YAML (``[en``) or nested absurdly deep is a ConfigError
    naming `key` (PyYAML recurses once per level and would raise RecursionError)."""
    try:
        return yaml.safe_load(raw)
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or type(e).__name__
        raise ConfigError(f"{key}: not valid YAML ({problem}); quote text that is not YAML: {key}='...'") from None
    except RecursionError:
        raise ConfigError(f"{key}: value nested too deeply to parse ({len(raw)} characters)") from None


def split_override(item: str) -> tuple[str, Any]:
    """``dotted.key=value`` -> (key, parsed value)."""
    key, eq, raw = item.partition("=")
    key = key.strip()
    if not eq or not key:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE (e.g. scale.num_workers=8)")
    return key, parse_value(raw, key)


def apply_override(cfg: Any, item: str) -> None:
    """Apply one ``--set dotted.key=value`` to a config dataclass in place."""
    key, value = split_override(item)
    set_field(cfg, key, value)


# ----------------------------------------------------------------------------- files
def read_yaml(path: str | Path, shipped: Path | None = None, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A config file as a mapping, with its ``base:`` chain merged under it. ``base`` is a path relative
    to the file, or the name of a file in `shipped` (``stage1`` or ``stage1.yaml``)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    except RecursionError:  # PyYAML recurses once per nesting level
        raise ConfigError(f"{path}: not valid YAML: nested too deeply to parse") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping")
    base = data.pop("base", None)
    if base is None:
        return data
    if not isinstance(base, str) or not base:
        raise ConfigError(f"{path}: base: expected the path of another config file, got {base!r}")
    candidates = [path.parent / base]
    if shipped is not None:
        candidates += [shipped / base, shipped / f"{base}.yaml"]
    found = next((c.resolve() for c in candidates if c.is_file()), None)
    if found is None:
        raise ConfigError(f"{path}: base: no config file {base!r} (looked in {', '.join(str(c) for c in candidates)})")
    if found in _seen or found == path.resolve():
        raise ConfigError(f"{path}: base: {base} includes itself")
    return merge(read_yaml(found, shipped, (*_seen, path.resolve())), data)


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """`over` on top of `base`: mappings merge key by key, any other value replaces."""
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def to_yaml(cfg: Any) -> str:
    """The resolved config as YAML, in field order (what ``--print-config`` shows)."""
    data = dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else cfg
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=False, width=110)


# ----------------------------------------------------------------------------- checks
def floats_in(node: Any, where: str = "") -> list[tuple[str, float]]:
    """(dotted name, value) of every float in a plain tree (dict values and list items included)."""
    if dataclasses.is_dataclass(node):
        node = dataclasses.asdict(node)
    if isinstance(node, dict):
        return [x for k, v in node.items() for x in floats_in(v, f"{where}.{k}" if where else str(k))]
    if isinstance(node, list):
        return [x for i, v in enumerate(node) for x in floats_in(v, f"{where}[{i}]")]
    return [(where, node)] if isinstance(node, float) else []


def check_finite(cfg: Any, prefix: str = "") -> None:
    """Every float of the config is finite (no nan or inf anywhere); `prefix` leads the error."""
    for name, value in floats_in(cfg):
        if not math.isfinite(value):
            raise ConfigError(f"{prefix}{name}: must be a finite number, got {value}")


# ----------------------------------------------------------------------------- command line
def add_config_arguments(
    parser: argparse.ArgumentParser, config_help: str, required: bool = False, repeatable: bool = False
) -> None:
    """``--config FILE`` (a list of files when `repeatable`), ``--set KEY=VALUE`` (repeatable) and
    ``--print-config``: the same three options on every command."""
    if repeatable:
        parser.add_argument("--config", action="append", default=[], metavar="FILE.yaml", help=config_help)
    else:
        parser.add_argument("--config", required=required, metavar="FILE.yaml", help=config_help)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override one config field after the files (repeatable; the value is YAML)")  # fmt: skip
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved config as YAML and exit (nothing runs)")  # fmt: skip


def sections_help(cls: type) -> str:
    """One line per section of a config dataclass with its keys' defaults (for ``--help`` epilogs)."""
    lines = []
    defaults = cls()
    for f in dataclasses.fields(cls):
        value = getattr(defaults, f.name)
        if dataclasses.is_dataclass(value):
            keys = ", ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(value).items())
            lines.append(f"  {f.name}: {keys}")
        elif f.init:
            lines.append(f"  {f.name}={value!r}")
    return "\n".join(lines)
