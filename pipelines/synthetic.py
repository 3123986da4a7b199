"""Synthetic image-caption corpus with realistic bad cases, served from 127.0.0.1.

The demo and the tests need a web-scale-looking input without the internet. This module writes:

    OUT_DIR/images/00000.jpg ...   procedurally drawn JPEG/PNG/WebP images (plus broken files)
    OUT_DIR/urls.parquet           URL list: `url`, `caption`, extra columns, failing URLs added
    OUT_DIR/sft.json               LLaVA-style SFT records that reuse the corpus images

Every entry carries an `expect` tag naming the special case it exercises (`ok` for plain good
samples; see `EXPECT_TAGS` for the full list), so tests can check what the pipeline did with it.
Exact and near duplicates also carry a `dup_group` (one survivor per group is expected).
Output is byte-for-byte deterministic for a given `seed`: the images come from a numpy RNG and are
encoded by Pillow with fixed settings and no timestamps.

Geometry, chosen against the `datacomp-basic` filter preset (short side >= 200, aspect <= 3) and the
672 px download size: normal images have a long side of 400..1400 px, a short side >= 256 px and
an aspect ratio of at most 2.5; `tiny` and `wide` images fall outside the preset on purpose.

Run it:

    python -m pipelines.synthetic demo_out/corpus --n 300 --seed 0          # write files only
    python -m pipelines.synthetic demo_out/corpus --serve [--port 8765]     # write, then serve

With `--serve` the URL list points at the live server (printed on stdout) and the server runs
until Ctrl-C. From Python:

    corpus = make_corpus(tmp / "corpus", n_images=60)
    with serve(corpus.root) as server:
        write_url_list(corpus, server.base_url, tmp / "urls.parquet", "parquet")
"""

from __future__ import annotations

import argparse
import csv
import functools
import http.server
import io
import json
import os
import signal
import socket
import struct
import sys
import threading
import time
import zlib
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

# ----------------------------------------------------------------------------- tags and columns

EXPECT_TAGS: dict[str, str] = {
    "ok": "valid image, clean English caption of 3..25 words: should survive every step",
    "corrupt": "random bytes named .jpg (one starts with a JPEG SOI marker): decoding fails",
    "truncated": "a valid JPEG cut in half: decoding fails",
    "zero_byte": "an empty .jpg file: decoding fails",
    "not_image": "an HTML page saved as .jpg (served as image/jpeg): decoding fails",
    "bomb": "a ~190 KB PNG whose header declares 40000x40000 px: rejected without a full decode",
    "tiny": "valid image of 12x12 / 40x30 px: dropped by the minimum-size filter",
    "wide": "valid image of 3000x60 / 50x2000 px: dropped by the aspect-ratio filter",
    "large": "valid image with a long side well above 672 px: downscaled, kept",
    "small": "valid image with a long side below 672 px (short side >= 200): kept, never upscaled",
    "exact_dup": "byte-identical file under several URLs (`dup_group`): one per group survives",
    "near_dup": "an image and its re-encoded/slightly resized copy (`dup_group`): one per group survives",
    "empty_caption": "caption is the empty string: dropped by the caption filters",
    "whitespace_caption": "caption is whitespace only: dropped by the caption filters",
    "html_caption": "caption with HTML tags/entities: cleaned to text, kept",
    "url_caption": "caption containing URLs or an e-mail address: those are removed, kept",
    "mojibake_caption": "UTF-8 decoded as cp1252 (e.g. 'cafÃ©'): repaired (ftfy), kept",
    "long_caption": "English caption longer than 2000 characters: truncated, kept",
    "non_english": "German/French/Spanish/Chinese/Russian sentence: dropped by an English-only filter",
    "one_word_caption": "a single-word caption: dropped by a minimum-words filter",
    "boilerplate_caption": "'Stock photo - image 12345', 'click to enlarge', a file name: low-value caption",
    "http_404": "URL list only: a path the server does not have (HTTP 404)",
    "conn_refused": "URL list only: a port on 127.0.0.1 that refuses connections",
}
"""Every `expect` tag with what it is and what the pipeline is expected to do with it."""

#: Tags that only appear in URL lists (no file behind them).
URL_ONLY_TAGS = ("http_404", "conn_refused")
#: Extra columns every entry carries (besides `url`, `caption`, `expect`, `dup_group`).
EXTRA_COLUMNS = ("source", "license", "src_id")
URL_LIST_COLUMNS = ("url", "caption", *EXTRA_COLUMNS, "dup_group", "expect")
URL_LIST_FORMATS = ("parquet", "csv", "tsv", "jsonl")
LICENSES = ("CC-BY-4.0", "CC0-1.0", "CC-BY-SA-4.0", "CC-BY-NC-4.0")
# 1.6 Gpx: above OpenCV's CV_IO_MAX_IMAGE_PIXELS (2**30), so img2dataset's cv2.imdecode refuses it
# instead of allocating ~4.8 GB (a 30000 px side would still be decoded), and above Pillow's
# 2 * MAX_IMAGE_PIXELS, so PIL.Image.open raises DecompressionBombError.
BOMB_SIDE = 40_000

# ----------------------------------------------------------------------------- data model


@dataclass(frozen=True)
class CorpusEntry:
    """One file of the corpus (URL-only failing rows reuse the type with a path that does not exist)."""

    path: str  # relative to the corpus root, POSIX separators, e.g. "images/00042.jpg"
    caption: str
    expect: str  # a key of EXPECT_TAGS
    extra: dict[str, str]  # EXTRA_COLUMNS: source, license, src_id
    width: int | None = None  # pixel size of a decodable image (the declared size for `bomb`)
    height: int | None = None
    fmt: str | None = None  # "JPEG" | "PNG" | "WEBP" for images; None for broken/non-image files
    dup_group: str | None = None  # "exact-0", "near-1", ... for duplicates

    def row(self, url: str) -> dict[str, str]:
        """The URL-list row of this entry."""
        return {
            "url": url,
            "caption": self.caption,
            **{k: self.extra[k] for k in EXTRA_COLUMNS},
            "dup_group": self.dup_group or "",
            "expect": self.expect,
        }


@dataclass
class Corpus:
    """What `make_corpus` wrote: `entries` in file order (`images/00000.*`, `images/00001.*`, ...)."""

    root: Path  # serve this directory: entry URLs are base_url + "/" + entry.path
    seed: int
    entries: list[CorpusEntry] = field(default_factory=list)

    def by_expect(self, tag: str) -> list[CorpusEntry]:
        return [e for e in self.entries if e.expect == tag]

    def counts(self) -> dict[str, int]:
        """Number of entries per `expect` tag."""
        return dict(Counter(e.expect for e in self.entries))

    def file(self, entry: CorpusEntry) -> Path:
        return self.root / entry.path


# ----------------------------------------------------------------------------- captions


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


def _pick(rng: np.random.Generator, seq: list[str]) -> str:
    return seq[int(rng.integers(len(seq)))]


def _english_caption(rng: np.random.Generator, min_words: int = 3, max_words: int = 25) -> str:
    """A plain English caption of min_words..max_words words built from word lists."""
    target = int(rng.integers(min_words, max_words + 1))
    a, c, n = _pick(rng, _ADJS), _pick(rng, _COLORS), _pick(rng, _NOUNS)
    if target <= 4:
        words = ["a", a, c, n] if target == 4 else [a, c, n]
        return _articles(words).capitalize()
    parts = [f"a {a} {c} {n} {_pick(rng, _VERBS)} {_pick(rng, _PREPS)} {_pick(rng, _PLACES)}"]
    pool = [_pick(rng, _TIMES)] + [
        _pick(rng, _EXTRAS).format(a=_pick(rng, _ADJS), c=_pick(rng, _COLORS), n=_pick(rng, _NOUNS))
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


def _long_caption(rng: np.random.Generator, min_chars: int = 2100) -> str:
    sentences: list[str] = []
    while sum(len(s) + 1 for s in sentences) < min_chars:
        sentences.append(_english_caption(rng, 12, 25) + ".")
    return " ".join(sentences)


_HTML_CAPTIONS = [
    "<b>A red &amp; blue</b> <a href='http://x'>kite</a> in the sky",
    "<p>Fresh bread on a wooden table</p>&nbsp;<br/><i>baked this morning</i>",
]
_URL_CAPTIONS = [
    "Sunset over the harbor https://example.com/photos/123?size=large via www.example.org",
    "Contact photographer@example.com for prints of this quiet mountain lake",
]
_MOJIBAKE_CAPTIONS = [
    "cafÃ© on the corner of the old street",
    "SeÃ±or Smithâ€™s garden in full bloom during the spring",
]
_NON_ENGLISH_CAPTIONS = [
    "Ein kleiner Hund spielt im Garten mit einem roten Ball, während die Sonne scheint.",
    "Une petite maison blanche au bord de la mer avec des volets bleus et un jardin fleuri.",
    "Un grupo de niños juega al fútbol en el parque después de la escuela.",
    "一只小猫正坐在窗台上，安静地看着外面下着的大雨。",
    "Старый деревянный дом стоит на берегу тихой реки под голубым небом.",
]
_WHITESPACE_CAPTIONS = ["   ", "\u00a0 \u3000 "]  # no tabs/newlines: pyarrow's CSV reader rejects newlines
_ONE_WORD_CAPTIONS = ["sunset", "Dog"]
_BOILERPLATE_CAPTIONS = ["Stock photo - image 12345", "click to enlarge", "IMG_4821.JPG"]

_NOT_IMAGE_HTML = (
    "<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>Page not found</title></head>\n"
    "<body><h1>Oops! This image is no longer available.</h1>\n"
    "<p>The page you requested has moved. <a href='/'>Return to the gallery</a>.</p></body></html>\n"
)

# ----------------------------------------------------------------------------- images


def _draw(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A procedural RGB picture: a coloured gradient with low-frequency noise, random shapes, grain."""
    sw, sh = max(2, width // 8), max(2, height // 8)
    c0 = rng.integers(0, 256, 3).astype(np.float32)
    c1 = rng.integers(0, 256, 3).astype(np.float32)
    theta = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:sh, 0:sw].astype(np.float32)
    t = xx / sw * np.cos(theta) + yy / sh * np.sin(theta)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    base = c0 * (1 - t[..., None]) + c1 * t[..., None]
    base += rng.normal(0, 18, (sh, sw, 3)).astype(np.float32)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB").resize(
        (width, height), Image.Resampling.BILINEAR
    )
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(4, 12))):
        x0, x1 = sorted(rng.integers(-width // 4, width + width // 4, 2).tolist())
        y0, y1 = sorted(rng.integers(-height // 4, height + height // 4, 2).tolist())
        x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1)
        color = tuple(int(v) for v in rng.integers(0, 256, 3))
        kind = int(rng.integers(3))
        if kind == 0:
            draw.rectangle((x0, y0, x1, y1), fill=color)
        elif kind == 1:
            draw.ellipse((x0, y0, x1, y1), fill=color)
        else:
            draw.line(
                (x0, y0, x1, y1),
                fill=color,
                width=max(1, int(rng.integers(1, 1 + min(width, height) // 20 + 1))),
            )
    if rng.random() < 0.3:  # film grain on some images
        grain = rng.integers(-10, 11, (height, width, 3), dtype=np.int16)
        arr = np.clip(np.asarray(img, dtype=np.int16) + grain, 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, "RGB")
    return img


def _encode(img: Image.Image, fmt: str, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.save(buf, "JPEG", quality=quality, optimize=False, progressive=False)
    elif fmt == "PNG":
        img.save(buf, "PNG", compress_level=6)
    elif fmt == "WEBP":
        img.save(buf, "WEBP", quality=quality, method=4)
    else:
        raise ValueError(f"unknown image format {fmt!r}")
    return buf.getvalue()


_EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


@functools.lru_cache(maxsize=1)  # ~0.5 s to build; the bytes never change
def _bomb_png(side: int = BOMB_SIDE) -> bytes:
    """A valid 1-bit palette PNG of side x side px, all zeros (~190 KB on disk, 200 MB packed, 1.6 Gpx)."""
    row = bytes(1 + (side + 7) // 8)  # filter byte 0 + packed pixels
    comp = zlib.compressobj(9)
    chunks = []
    block = row * 1000
    for start in range(0, side, 1000):
        chunks.append(comp.compress(block if start + 1000 <= side else row * (side - start)))
    chunks.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 3, 0, 0, 0)  # bit depth 1, colour type 3 (palette)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"PLTE", bytes([250, 250, 250, 20, 20, 20]))
        + _png_chunk(b"IDAT", b"".join(chunks))
        + _png_chunk(b"IEND", b"")
    )


def _normal_size(rng: np.random.Generator) -> tuple[int, int]:
    """Long side 400..1400, short side >= 256, aspect ratio 1..2.5, landscape or portrait."""
    long_side = int(rng.integers(400, 1401))
    aspect = float(rng.uniform(1.0, min(2.5, long_side / 256)))
    short_side = max(256, round(long_side / aspect))
    return (long_side, short_side) if rng.random() < 0.6 else (short_side, long_side)


# ----------------------------------------------------------------------------- corpus


@dataclass
class _Spec:
    """What to write for one entry, before shuffling into file order."""

    expect: str
    # "image" | "corrupt" | "corrupt_soi" | "truncated" | "zero" | "html" | "bomb" | "copy" | "near"
    kind: str
    caption: str
    size: tuple[int, int] | None = None
    fmt: str = "JPEG"
    quality: int = 90
    dup_group: str | None = None
    source_key: int | None = None  # for "copy"/"near": index of the spec whose image is reused
    variant: str = ""  # for "near": "requality" | "resize"


def _special_specs(rng: np.random.Generator) -> list[_Spec]:
    """The special cases, in a fixed order (sources before their copies)."""
    cap = functools.partial(_english_caption, rng)
    s: list[_Spec] = []
    # Broken files: the download succeeds, the decode must fail.
    s += [_Spec("corrupt", "corrupt", cap()), _Spec("corrupt", "corrupt_soi", cap())]
    s += [
        _Spec("truncated", "truncated", cap(), (640, 480)),
        _Spec("truncated", "truncated", cap(), (900, 700)),
    ]
    s += [_Spec("zero_byte", "zero", cap()), _Spec("not_image", "html", cap())]
    s += [_Spec("bomb", "bomb", cap(), (BOMB_SIDE, BOMB_SIDE), "PNG")]
    # Valid images with awkward geometry.
    s += [_Spec("tiny", "image", cap(), (12, 12), "PNG"), _Spec("tiny", "image", cap(), (40, 30), "JPEG")]
    s += [_Spec("wide", "image", cap(), (3000, 60), "JPEG"), _Spec("wide", "image", cap(), (50, 2000), "PNG")]
    s += [
        _Spec("large", "image", cap(), (2400, 1600), "JPEG"),
        _Spec("large", "image", cap(), (1300, 2100), "WEBP"),
    ]
    s += [
        _Spec("small", "image", cap(), (360, 280), "PNG"),
        _Spec("small", "image", cap(), (560, 420), "JPEG"),
    ]
    # Exact duplicates: group 0 has three copies with different captions, group 1 two with the same one.
    i0 = len(s)
    s.append(_Spec("exact_dup", "image", cap(), _normal_size(rng), "JPEG", dup_group="exact-0"))
    s += [_Spec("exact_dup", "copy", cap(), dup_group="exact-0", source_key=i0) for _ in range(2)]
    i1 = len(s)
    s.append(_Spec("exact_dup", "image", cap(), _normal_size(rng), "JPEG", dup_group="exact-1"))
    s.append(_Spec("exact_dup", "copy", s[i1].caption, dup_group="exact-1", source_key=i1))
    # Near duplicates: a JPEG and (a) the same picture at quality 60, (b) resized to 97 % at quality 85.
    for g, variant in enumerate(("requality", "resize")):
        k = len(s)
        s.append(_Spec("near_dup", "image", cap(), _normal_size(rng), "JPEG", 92, f"near-{g}"))
        s.append(_Spec("near_dup", "near", cap(), dup_group=f"near-{g}", source_key=k, variant=variant))
    # Caption cases on valid images.
    caption_cases: list[tuple[str, list[str]]] = [
        ("empty_caption", [""]),
        ("whitespace_caption", _WHITESPACE_CAPTIONS),
        ("html_caption", _HTML_CAPTIONS),
        ("url_caption", _URL_CAPTIONS),
        ("mojibake_caption", _MOJIBAKE_CAPTIONS),
        ("long_caption", [_long_caption(rng)]),
        ("non_english", _NON_ENGLISH_CAPTIONS),
        ("one_word_caption", _ONE_WORD_CAPTIONS),
        ("boilerplate_caption", _BOILERPLATE_CAPTIONS),
    ]
    for tag, captions in caption_cases:
        s += [_Spec(tag, "image", c, _normal_size(rng), "JPEG") for c in captions]
    return s


def _specs(rng: np.random.Generator, n_images: int) -> list[_Spec]:
    s = _special_specs(rng)
    if n_images < len(s) + 1:
        raise ValueError(
            f"n_images={n_images} is too small: need at least {len(s) + 1} (special cases + 1 ok)"
        )
    cap = functools.partial(_english_caption, rng)
    for _ in range(n_images - len(s)):
        fmt = str(rng.choice(["JPEG", "JPEG", "JPEG", "JPEG", "JPEG", "JPEG", "JPEG", "PNG", "WEBP", "WEBP"]))
        size = _normal_size(rng)
        if fmt == "PNG":  # keep lossless files moderate in size
            size = (min(size[0], 900), min(size[1], 900))
        s.append(_Spec("ok", "image", cap(), size, fmt, int(rng.choice([80, 85, 90, 95]))))
    return s


def min_corpus_size() -> int:
    """The smallest `n_images` accepted by `make_corpus` (all special cases plus one `ok`)."""
    return len(_special_specs(np.random.default_rng(0))) + 1


def make_corpus(out_dir: Path, n_images: int = 300, seed: int = 0) -> Corpus:
    """Write `n_images` files under `out_dir/images/` and describe them.

    Deterministic: the same `seed` gives the same entries and the same file bytes. Special cases are
    included whatever `n_images` is (44 entries, so `n_images >= min_corpus_size()` = 45); the rest
    are `ok` samples. Files already
    under `out_dir/images/` with other names are left alone.
    """
    out_dir = Path(out_dir)
    images = out_dir / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    specs = _specs(rng, n_images)
    order = rng.permutation(len(specs))  # file index -> spec index: special cases scattered
    position = {int(spec_i): file_i for file_i, spec_i in enumerate(order)}
    payload: dict[int, bytes] = {}  # spec index -> encoded bytes (sources of copies / near dups)
    pictures: dict[int, Image.Image] = {}
    entries: list[CorpusEntry | None] = [None] * len(specs)

    # Sources first so copies and near duplicates can reuse them; every spec has its own RNG stream.
    todo = sorted(range(len(specs)), key=lambda i: specs[i].kind in ("copy", "near"))
    for i in todo:
        sp = specs[i]
        sub = np.random.default_rng([seed, i])
        width: int | None = None
        height: int | None = None
        fmt: str | None = sp.fmt
        ext = "jpg"
        if sp.kind == "image":
            assert sp.size is not None
            width, height = sp.size
            pic = _draw(sub, width, height)
            data = _encode(pic, sp.fmt, sp.quality)
            ext = _EXT[sp.fmt]
            if sp.dup_group:
                payload[i], pictures[i] = data, pic
        elif sp.kind == "copy":
            assert sp.source_key is not None
            src = specs[sp.source_key]
            assert src.size is not None
            data, (width, height), fmt = payload[sp.source_key], src.size, src.fmt
        elif sp.kind == "near":
            assert sp.source_key is not None
            pic = pictures[sp.source_key]
            if sp.variant == "resize":
                pic = pic.resize(
                    (round(pic.width * 0.97), round(pic.height * 0.97)), Image.Resampling.LANCZOS
                )
                data = _encode(pic, "JPEG", 85)
            else:
                data = _encode(pic, "JPEG", 60)
            width, height, fmt = pic.width, pic.height, "JPEG"
        elif sp.kind == "truncated":
            assert sp.size is not None
            full = _encode(_draw(sub, *sp.size), "JPEG", 90)
            data, fmt = full[: len(full) // 2], None
        elif sp.kind == "corrupt":
            data, fmt = sub.bytes(int(sub.integers(2_000, 20_000))), None
        elif sp.kind == "corrupt_soi":
            data, fmt = b"\xff\xd8\xff\xe0" + sub.bytes(int(sub.integers(2_000, 20_000))), None
        elif sp.kind == "zero":
            data, fmt = b"", None
        elif sp.kind == "html":
            data, fmt = _NOT_IMAGE_HTML.encode(), None
        elif sp.kind == "bomb":
            data, (width, height), ext = _bomb_png(), (BOMB_SIDE, BOMB_SIDE), "png"
        else:  # pragma: no cover - _specs only emits the kinds above
            raise AssertionError(sp.kind)
        file_i = position[i]
        rel = f"images/{file_i:05d}.{ext}"
        (out_dir / rel).write_bytes(data)
        extra = {
            "source": "synthetic",
            "license": LICENSES[file_i % len(LICENSES)],
            "src_id": f"syn{file_i:05d}",
        }
        entries[file_i] = CorpusEntry(rel, sp.caption, sp.expect, extra, width, height, fmt, sp.dup_group)
    return Corpus(root=out_dir, seed=seed, entries=[e for e in entries if e is not None])


# ----------------------------------------------------------------------------- local HTTP server


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    extensions_map = {  # noqa: RUF012 - class attribute read by SimpleHTTPRequestHandler
        **http.server.SimpleHTTPRequestHandler.extensions_map,
        ".webp": "image/webp",
        ".jpg": "image/jpeg",
        ".png": "image/png",
        ".jsonl": "application/jsonl",
        ".parquet": "application/vnd.apache.parquet",
    }

    def log_message(self, format: str, *args: Any) -> None:
        pass


@dataclass
class LocalServer:
    """A running `ThreadingHTTPServer` on 127.0.0.1 serving `directory`."""

    directory: Path
    httpd: http.server.ThreadingHTTPServer
    thread: threading.Thread

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, rel_path: str) -> str:
        return f"{self.base_url}/{rel_path.lstrip('/')}"


@contextmanager
def serve(directory: Path, port: int = 0) -> Iterator[LocalServer]:
    """Serve `directory` over HTTP on 127.0.0.1 (`port` 0: a free one) in a daemon thread.

    Missing paths answer 404. Request logging is silenced. The server stops on exit.
    """
    directory = Path(directory).resolve()
    if not directory.is_dir():
        raise FileNotFoundError(f"not a directory: {directory}")
    handler = functools.partial(_QuietHandler, directory=str(directory))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    httpd.daemon_threads = True
    thread = threading.Thread(
        target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="synthetic-http", daemon=True
    )
    thread.start()
    try:
        yield LocalServer(directory, httpd, thread)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=5)


def closed_port_url() -> str:
    """`http://127.0.0.1:PORT` for a port that was bound and closed again: connecting is refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


# ----------------------------------------------------------------------------- URL lists


def url_list_rows(
    corpus: Corpus, base_url: str, n_404: int = 4, n_refused: int = 3, refused_url: str | None = None
) -> list[dict[str, str]]:
    """Rows of the URL list: one per corpus entry plus `n_404` + `n_refused` failing URLs.

    The failing rows are spread through the list at fixed positions (deterministic for a corpus).
    """
    base = base_url.rstrip("/")
    rows = [e.row(f"{base}/{e.path}") for e in corpus.entries]
    rng = np.random.default_rng([corpus.seed, 404])
    refused = (refused_url or closed_port_url()).rstrip("/")
    failing: list[dict[str, str]] = []
    for k in range(n_404 + n_refused):
        tag = "http_404" if k < n_404 else "conn_refused"
        root = base if tag == "http_404" else refused
        extra = {"source": "synthetic", "license": LICENSES[k % len(LICENSES)], "src_id": f"synfail{k:03d}"}
        entry = CorpusEntry(f"images/missing-{k:03d}.jpg", _english_caption(rng), tag, extra)
        failing.append(entry.row(f"{root}/{entry.path}"))
    for k, row in enumerate(failing):  # evenly spread, in order
        rows.insert(min(len(rows), (k + 1) * len(rows) // (len(failing) + 1)), row)
    return rows


def write_url_list(
    corpus: Corpus,
    base_url: str,
    path: Path,
    fmt: str | None = None,
    n_404: int = 4,
    n_refused: int = 3,
    refused_url: str | None = None,
) -> int:
    """Write the URL list of `corpus` served at `base_url` to `path`; return the number of rows.

    `fmt` is one of "parquet", "csv", "tsv", "jsonl" (default: from the file suffix). Columns, all
    strings: `url`, `caption`, `source`, `license`, `src_id`, `dup_group` ("" when none), `expect`.
    Failing URLs are added: `n_404` paths the server does not have and `n_refused` URLs on a closed
    port (`refused_url`, default `closed_port_url()`).
    """
    path = Path(path)
    fmt = fmt or path.suffix.lstrip(".")
    if fmt not in URL_LIST_FORMATS:
        raise ValueError(f"unknown URL list format {fmt!r} (known: {', '.join(URL_LIST_FORMATS)})")
    rows = url_list_rows(corpus, base_url, n_404, n_refused, refused_url)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({c: pa.array([r[c] for r in rows], pa.string()) for c in URL_LIST_COLUMNS})
        pq.write_table(table, tmp)
    elif fmt in ("csv", "tsv"):
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(
                f, fieldnames=list(URL_LIST_COLUMNS), delimiter="," if fmt == "csv" else "\t"
            )
            writer.writeheader()
            writer.writerows(rows)
    else:
        with open(tmp, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return len(rows)


# ----------------------------------------------------------------------------- SFT records

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
        question = _pick(rng, _QUESTIONS)
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


# ----------------------------------------------------------------------------- CLI


def write_teacher_inputs(out_dir: Path, shards: list[list[tuple[str, str, bytes]]]) -> None:
    """The datasets the teacher step reads, from (key, caption, image bytes) rows per shard: the images
    (and their sizes, from the header; none for bytes that are not an image) in `download/`, the
    captions in `captions/`, every key kept in `filter/` (tests and benchmarks of the teacher alone)."""
    import pyarrow as pa

    from pipelines import fingerprint, layout

    specs = {step: {"step": step, "inputs": {"write_teacher_inputs": fingerprint.digest(
        [[k for k, _, _ in rows] for rows in shards])}} for step in ("download", "captions", "filter")}  # fmt: skip
    for step, spec in specs.items():
        fingerprint.record(out_dir / step, spec)

    def size(data: bytes) -> tuple[int | None, int | None]:
        try:
            with Image.open(io.BytesIO(data)) as im:
                return im.size
        except Exception:
            return None, None

    for s, rows in enumerate(shards):
        sizes = [size(img) for _, _, img in rows]
        table = pa.table({
            "key": [k for k, _, _ in rows], "caption": [c for _, c, _ in rows],
            "image": pa.array([img for _, _, img in rows], pa.binary()),
            "width": pa.array([w for w, _ in sizes], pa.int32()), "height": pa.array([h for _, h in sizes], pa.int32()),
        })  # fmt: skip
        for step, columns in (
            ("download", table.column_names),
            ("captions", ["key", "caption"]),
            ("filter", ["key"]),
        ):
            kept = table.select(columns)
            empty = layout.with_reason(kept.slice(0, 0), [], [])
            layout.write_shard(out_dir / step, layout.shard_name(s), kept, empty, kept.num_rows)
    for step, spec in specs.items():  # complete datasets, as their steps would leave them
        layout.write_manifest(out_dir / step, step, [], {}, fingerprint.of(spec))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m pipelines.synthetic",
        description="Write a synthetic image-caption corpus (+ URL list, SFT JSON) and optionally serve it.",
    )
    p.add_argument("out_dir", type=Path)
    p.add_argument("--n", type=int, default=300, help="number of corpus files (default 300)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--format", choices=URL_LIST_FORMATS, default="parquet", help="URL list format")
    p.add_argument("--serve", action="store_true", help="serve OUT_DIR on 127.0.0.1 until Ctrl-C")
    p.add_argument("--port", type=int, default=0, help="port to serve on (default: a free one)")
    p.add_argument(
        "--base-url", default="http://127.0.0.1:8000", help="base URL written to the URL list without --serve"
    )
    args = p.parse_args(argv)

    corpus = make_corpus(args.out_dir, args.n, args.seed)
    sft = make_sft_corpus(args.out_dir, corpus, seed=args.seed)
    urls = args.out_dir / f"urls.{args.format}"
    counts = ", ".join(f"{k}={v}" for k, v in sorted(corpus.counts().items()))
    print(f"wrote {len(corpus.entries)} files under {args.out_dir / 'images'} ({counts})")
    print(f"wrote {sft}")
    if not args.serve:
        rows = write_url_list(corpus, args.base_url, urls, args.format)
        print(f"wrote {urls} ({rows} rows, base URL {args.base_url})")
        return 0
    with serve(args.out_dir, args.port) as server:
        rows = write_url_list(corpus, server.base_url, urls, args.format)
        print(f"wrote {urls} ({rows} rows)")
        print(f"serving {args.out_dir} at {server.base_url} (Ctrl-C to stop)", flush=True)
        # Ctrl-C stops the server even when the process started with SIGINT ignored (what a shell does to a
        # command it runs in the background with `&`, and its children inherit).
        signal.signal(signal.SIGINT, signal.default_int_handler)
        try:
            while True:
                time.sleep(0.2)
        except KeyboardInterrupt:
            print("stopped", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
