"""The step graph of data preparation, declared once: read by every step, `prepare`, the accounting and the
report.

Each step writes one dataset folder under ``output_dir`` (named like the step) and reads the kept rows of
one upstream dataset (`rows_from`), plus the columns it needs from earlier datasets (`reads`), matched by
`key`. Image bytes are stored once, by the chain's image store (download / sft_import); the steps after it
write only what they add or decide:

    download    key, url, caption, image, width, height, original_*, sha256, extra columns
    captions    key, caption (cleaned), caption_raw              rejects empty captions
    filter      key, language, phash                             rejects by image/caption rules, dedup
    shards      training shards (`breen.shard_format`): key, image reference, width, height, caption,
                fine, coarse                                     rejects images the teacher cannot decode
    sft_import  key, id, image, width, height, sha256, caption, conversations
    sft_shards  training shards with conversations

Order: captions come before the filter. Cleaning is a cheap text-only pass, and it has to run before the
filter's caption rules anyway (length and language are judged on the cleaned text): run first, it rejects
empty captions before the costly image decode, and the filter reads the cleaned caption instead of
cleaning it a second time.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Step:
    name: str  # the step and its dataset folder under output_dir
    entry: str  # "module:function" that runs it with a PrepareConfig
    rows_from: str | None  # dataset whose kept rows are this step's input rows (None: external input)
    chain: str  # "pretrain" or "sft"
    reads: dict[str, tuple[str, ...]] = field(default_factory=dict)  # dataset -> columns read from it
    writes: tuple[str, ...] = ()  # columns of its kept rows (beyond what `rows_from` shares by key)

    @property
    def module(self) -> str:
        return self.entry.split(":")[0]


STEPS: tuple[Step, ...] = (
    Step("download", "pipelines.download:run", None, "pretrain",
         writes=("key", "url", "caption", "image", "width", "height", "original_width", "original_height", "sha256")),
    Step("captions", "pipelines.captions:run", "download", "pretrain", {"download": ("key", "caption")},
         writes=("key", "caption", "caption_raw")),
    Step("filter", "pipelines.filter:run", "captions", "pretrain",
         {"download": ("key", "image", "sha256"), "captions": ("key", "caption")},
         writes=("key", "language", "phash")),
    Step("shards", "pipelines.teacher:run", "filter", "pretrain",
         {"download": ("key", "image", "width", "height"), "captions": ("key", "caption")},
         writes=("key", "image_shard", "image_row", "width", "height", "caption", "fine", "coarse")),
    Step("sft_import", "pipelines.sft_import:run", None, "sft",
         writes=("key", "id", "image", "width", "height", "sha256", "caption", "conversations")),
    Step("sft_shards", "pipelines.teacher:run_sft", "sft_import", "sft",
         {"sft_import": ("key", "image", "width", "height", "caption", "conversations")},
         writes=("key", "image_shard", "image_row", "width", "height", "caption", "conversations", "fine", "coarse")),
)  # fmt: skip
BY_NAME = {s.name: s for s in STEPS}
DATASETS = [s.name for s in STEPS]  # every dataset folder a full run writes, in order
IMAGE_STORE = {"pretrain": "download", "sft": "sft_import"}  # where each chain's image bytes live
TRAINING = {"pretrain": "shards", "sft": "sft_shards"}  # each chain's training shards


def step(name: str) -> Step:
    return BY_NAME[name]


def chain(name: str) -> list[Step]:
    return [s for s in STEPS if s.chain == name]


def image_store(step_name: str) -> str:
    return IMAGE_STORE[BY_NAME[step_name].chain]


def upstream(step_name: str) -> list[str]:
    """The datasets `step_name` reads: its rows' dataset, then those it takes columns from."""
    s = BY_NAME[step_name]
    return list(dict.fromkeys([*([s.rows_from] if s.rows_from else []), *s.reads]))


def runner(s: Step) -> Callable[[Any], Any]:
    module, function = s.entry.split(":")
    return getattr(importlib.import_module(module), function)


def text_source(step_name: str) -> tuple[str, tuple[str, ...]]:
    """(dataset, text columns) a training-shard step takes its text from."""
    for dataset, columns in BY_NAME[step_name].reads.items():
        text = tuple(c for c in columns if c in ("caption", "conversations"))
        if text:
            return dataset, text
    raise KeyError(f"step {step_name} reads no text column")
