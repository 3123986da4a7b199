"""LLaVA-style SFT records that reuse the corpus images, with the bad cases the import must reject."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.synthetic.captions import pick
from pipelines.synthetic.corpus import Corpus, CorpusEntry

SFT_EXPECT_TAGS: dict[str, str] = {
    "ok": "one image, one human question with <image>, one gpt answer",
    "multi_turn": "one image, two or three question/answer rounds",
    "text_only": "no `image` key; a plain text conversation",
    "missing_image": "`image` points at a file that does not exist: rejected",
    "bad_role": "a turn with an unknown role ('robot'): rejected",
    "empty_conversations": "`conversations` is an empty list: rejected",
}

_QUESTIONS = [
    "What is shown?",
    "Describe the image briefly.",
    "What do you see in this picture?",
    "Give a short caption for this image.",
    "What is the main subject of the photo?",
]
_FOLLOW_UPS = [
    (
        "Is it indoors or outdoors?",
        "It is hard to tell for certain, but the scene looks like it is outdoors.",
    ),
    ("What colors stand out?", "Bold, saturated colors with a smooth gradient in the background."),
    ("Are there any people in it?", "No people are clearly visible; the picture is made of simple shapes."),
    ("What is the mood of the image?", "The mood is calm and slightly abstract."),
]
_TEXT_QA = [
    ("What is 7 plus 5?", "7 plus 5 is 12."),
    ("Give a synonym for the word 'big'.", "A synonym for 'big' is 'large'."),
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Write a one-line greeting for a birthday card.", "Wishing you a wonderful year full of joy!"),
    ("How many days are there in a leap year?", "A leap year has 366 days."),
    ("Translate 'thank you' into Spanish.", "'Thank you' in Spanish is 'gracias'."),
]


def make_sft_corpus(out_dir: Path, corpus: Corpus, n: int = 40, seed: int = 0) -> Path:
    """Write `out_dir/sft.json`, a LLaVA-style JSON array of `n` records; return its path.

    Records look like `{"id", "image": "images/00012.jpg", "conversations": [{"from": "human",
    "value": "<image>\\nWhat is shown?"}, {"from": "gpt", "value": "..."}], "expect": tag}`; image
    paths are relative to `out_dir` and reuse the corpus' `ok` images. About 25 % are multi-turn and
    15 % text-only (no `image` key); one record each is `missing_image`, `bad_role` and
    `empty_conversations` (see `SFT_EXPECT_TAGS`).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bad = ["missing_image", "bad_role", "empty_conversations"]
    if n < len(bad) + 3:
        raise ValueError(f"n={n} is too small (need at least {len(bad) + 3})")
    rng = np.random.default_rng([seed, 7])
    ok_images = [e for e in corpus.entries if e.expect == "ok" and e.fmt is not None]
    if not ok_images:
        raise ValueError("the corpus has no `ok` images to reuse")

    def rel(entry: CorpusEntry) -> str:
        return Path(os.path.relpath(corpus.file(entry), out_dir)).as_posix()

    n_text = max(1, round(0.15 * n))
    n_multi = max(1, round(0.25 * n))
    tags = bad + ["text_only"] * n_text + ["multi_turn"] * n_multi
    tags += ["ok"] * (n - len(tags))
    tags = [tags[int(i)] for i in rng.permutation(len(tags))]
    records: list[dict[str, Any]] = []
    for k, tag in enumerate(tags):
        entry = ok_images[int(rng.integers(len(ok_images)))]
        question = pick(rng, _QUESTIONS)
        answer = f"The image shows {entry.caption[0].lower()}{entry.caption[1:]}."
        first = [{"from": "human", "value": f"<image>\n{question}"}, {"from": "gpt", "value": answer}]
        rec: dict[str, Any] = {"id": f"sft-{seed}-{k:04d}", "image": rel(entry), "conversations": first}
        if tag == "multi_turn":
            for j in rng.permutation(len(_FOLLOW_UPS))[: int(rng.integers(1, 3))]:
                q, a = _FOLLOW_UPS[int(j)]
                rec["conversations"] += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        elif tag == "text_only":
            del rec["image"]
            q, a = _TEXT_QA[int(rng.integers(len(_TEXT_QA)))]
            rec["conversations"] = [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
        elif tag == "missing_image":
            rec["image"] = "images/does-not-exist-0001.jpg"
        elif tag == "bad_role":
            rec["conversations"][1]["from"] = "robot"
        elif tag == "empty_conversations":
            rec["conversations"] = []
        rec["expect"] = tag
        records.append(rec)
    path = out_dir / "sft.json"
    path.write_text(json.dumps(records, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    return path
