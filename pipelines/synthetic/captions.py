"""Captions of the synthetic corpus: clean English sentences of 3..25 words, and the bad captions the
caption filters must clean or drop (HTML, URLs, mojibake, other languages, whitespace, one word, boilerplate)."""

from __future__ import annotations

import numpy as np


def _words(text: str, sep: str | None = None) -> list[str]:
    return text.split(sep)


_COLORS = _words("red blue green yellow orange purple white black grey brown pink")
_ADJS = _words(
    "small large old young bright quiet busy wooden shiny tall cozy rusty modern ancient "
    "narrow wide sleepy happy wet sunny foggy"
)
_NOUNS = _words(
    "dog cat house car bicycle tree boat bird horse child woman man chair table lamp bridge "
    "tower kite train flower mountain river cake guitar umbrella window door garden street "
    "market"
)
_VERBS = _words(
    "standing sitting resting waiting running playing shining leaning floating sleeping walking parked"
)
_PREPS = _words("near|beside|behind|in front of|under|above|next to|across from|inside", "|")
_PLACES = _words(
    "the lake|a park|the old town|the beach|a forest|the city square|a farm|the harbor|"
    "a small village|the train station|a kitchen|the museum|a meadow",
    "|",
)
_TIMES = _words(
    "at sunset|in the morning|at night|on a rainy day|in winter|during the summer|after the storm|at noon",
    "|",
)
# Words a caption cut to length must not end on.
_DANGLING = frozenset(
    _words(
        "a the and with in of by on at under next to while front across from near beside behind above "
        "inside surrounded looks"
    )
)
_EXTRAS = [
    "with a {c} {n} in the background",
    "while a {a} {n} looks on",
    "and a {a} {c} {n} nearby",
    "surrounded by {c} flowers",
    "under a {a} sky",
    "next to a {c} {n}",
]


def pick(rng: np.random.Generator, seq: list[str]) -> str:
    return seq[int(rng.integers(len(seq)))]


def english_caption(rng: np.random.Generator, min_words: int = 3, max_words: int = 25) -> str:
    """A plain English caption of min_words..max_words words built from word lists."""
    target = int(rng.integers(min_words, max_words + 1))
    a, c, n = pick(rng, _ADJS), pick(rng, _COLORS), pick(rng, _NOUNS)
    if target <= 4:
        words = ["a", a, c, n] if target == 4 else [a, c, n]
        return _articles(words).capitalize()
    parts = [f"a {a} {c} {n} {pick(rng, _VERBS)} {pick(rng, _PREPS)} {pick(rng, _PLACES)}"]
    pool = [pick(rng, _TIMES)] + [
        pick(rng, _EXTRAS).format(a=pick(rng, _ADJS), c=pick(rng, _COLORS), n=pick(rng, _NOUNS))
        for _ in range(6)
    ]
    words = " ".join(parts + pool).split()[:target]
    while words[-1] in _DANGLING:
        words.pop()
    return _articles(words).capitalize()


def _articles(words: list[str]) -> str:
    """Join words, turning "a" into "an" before a vowel."""
    fixed = [
        "an" if w == "a" and i + 1 < len(words) and words[i + 1][0] in "aeiou" else w
        for i, w in enumerate(words)
    ]
    return " ".join(fixed)


def long_caption(rng: np.random.Generator, min_chars: int = 2100) -> str:
    sentences: list[str] = []
    while sum(len(s) + 1 for s in sentences) < min_chars:
        sentences.append(english_caption(rng, 12, 25) + ".")
    return " ".join(sentences)


HTML_CAPTIONS = [
    "<b>A red &amp; blue</b> <a href='http://x'>kite</a> in the sky",
    "<p>Fresh bread on a wooden table</p>&nbsp;<br/><i>baked this morning</i>",
]
URL_CAPTIONS = [
    "Sunset over the harbor https://example.com/photos/123?size=large via www.example.org",
    "Contact photographer@example.com for prints of this quiet mountain lake",
]
MOJIBAKE_CAPTIONS = [
    "cafÃ© on the corner of the old street",
    "SeÃ±or Smithâ€™s garden in full bloom during the spring",
]
NON_ENGLISH_CAPTIONS = [
    "Ein kleiner Hund spielt im Garten mit einem roten Ball, während die Sonne scheint.",
    "Une petite maison blanche au bord de la mer avec des volets bleus et un jardin fleuri.",
    "Un grupo de niños juega al fútbol en el parque después de la escuela.",
    "一只小猫正坐在窗台上，安静地看着外面下着的大雨。",
    "Старый деревянный дом стоит на берегу тихой реки под голубым небом.",
]
WHITESPACE_CAPTIONS = ["   ", "\u00a0 \u3000 "]  # no tabs/newlines: pyarrow's CSV reader rejects newlines
ONE_WORD_CAPTIONS = ["sunset", "Dog"]
BOILERPLATE_CAPTIONS = ["Stock photo - image 12345", "click to enlarge", "IMG_4821.JPG"]
