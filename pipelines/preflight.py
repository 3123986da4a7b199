"""Checks before Ray starts: the output folder and every input the steps about to run will read.

`check(cfg, steps)` runs in every step's CLI (`pipelines.cli.step_main`) after the config is loaded
(types, ranges and that configured files exist: `pipelines.config.load_config`) and before anything
starts or writes: a failure is a `ConfigError` naming the config field and the file (exit code 2), and
nothing is left on disk or in the bucket. Object stores are reached here: an unknown bucket or denied
access fails before Ray starts. It reads headers only: a URL list's schema, header line or first record, the
first bytes of the SFT JSON, the header of the teacher weights.
"""

from __future__ import annotations

import codecs
from collections.abc import Iterable
from pathlib import Path

from breen.settings import ConfigError
from breen.storage import StorageError, Store
from pipelines import graph
from pipelines.config import PrepareConfig


def output_dir(path: str | Path | Store, field: str = "output_dir") -> None:
    """`path` is a folder we can write, or can be created as one: on an object store a probe object is
    written and deleted (nothing is left)."""
    try:
        Store.at(path, field).check_writable(field)
    except StorageError as e:
        raise ConfigError(str(e)) from None


def readable(path: Store, field: str) -> None:
    """The location exists and can be read (bucket found, access granted)."""
    try:
        path.check_readable(field)
    except StorageError as e:
        raise ConfigError(str(e)) from None


def sft_json(path: str | Path | Store, field: str = "input.sft.json") -> None:
    """The SFT JSON is readable UTF-8 text starting with a JSON array (the import parses the rest). A few
    invalid bytes are one record's problem (the import rejects that record); a head that is mostly not
    UTF-8 is not a JSON file at all."""
    path = Store.at(path, field)
    readable(path, field)
    try:
        with path.open_input() as f:
            head = f.read(4096)
    except OSError as e:
        raise ConfigError(f"{field}: {path}: cannot be read: {e}") from None
    # a character cut at the end of the head is fine
    text = codecs.getincrementaldecoder("utf-8-sig")(errors="replace").decode(head, final=False)
    if text.lstrip().startswith("\ufffd") or text.count("\ufffd") > max(8, len(text) // 10):
        raise ConfigError(f"{field}: {path}: not UTF-8 text ({text.count(chr(0xFFFD))} invalid sequences in "
                          f"its first {len(head)} bytes)")  # fmt: skip
    if not text.lstrip().startswith("["):
        start = text.lstrip()[:40]
        raise ConfigError(
            f"{field}: {path}: expected a JSON array of records, the file starts with {start!r}"
        )


def check(cfg: PrepareConfig, steps: Iterable[str]) -> None:
    """Everything `steps` (names of `pipelines.graph.STEPS`) need that can be checked without Ray."""
    steps = set(steps)
    output_dir(cfg.out)
    if "download" in steps and cfg.input.synthetic is None:
        from pipelines.download import url_list_columns

        if not cfg.input.urls:
            raise ConfigError("input.urls: no URL list given")
        for i, url_list in enumerate(cfg.input.urls):
            where = cfg.location(url_list, f"input.urls[{i}]")
            readable(where, f"input.urls[{i}]")
            try:
                url_list_columns(where)
            except ConfigError as e:
                raise ConfigError(f"input.urls[{i}]: {e}") from None
    if "sft_import" in steps and cfg.input.sft is not None:
        sft_json(cfg.location(cfg.input.sft.json, "input.sft.json"))
        readable(cfg.location(cfg.input.sft.image_folder, "input.sft.image_folder"), "input.sft.image_folder")
    if cfg.teacher.weights and steps & set(graph.TRAINING.values()):
        from breen.storage import fetch_file
        from pipelines.teacher import check_weights

        weights = cfg.location(cfg.teacher.weights, "teacher.weights")
        if not weights.local:
            readable(weights, "teacher.weights")
        check_weights(str(fetch_file(weights, "teacher.weights")))  # a remote file is fetched once, here


def steps_of(cfg: PrepareConfig) -> list[str]:
    """The steps `pipelines.prepare` runs for `cfg` (the SFT chain only with an SFT input)."""
    has_sft = cfg.input.sft is not None or cfg.input.synthetic is not None
    return [s.name for s in graph.STEPS if s.chain != "sft" or has_sft]
