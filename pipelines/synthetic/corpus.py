"""The synthetic corpus: every `expect` tag, what `make_corpus` writes under `images/` and how it is
described (`Corpus`, `CorpusEntry`)."""

from __future__ import annotations

import functools
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from pipelines.synthetic.captions import (
    BOILERPLATE_CAPTIONS,
    HTML_CAPTIONS,
    MOJIBAKE_CAPTIONS,
    NON_ENGLISH_CAPTIONS,
    ONE_WORD_CAPTIONS,
    URL_CAPTIONS,
    WHITESPACE_CAPTIONS,
    english_caption,
    long_caption,
)
from pipelines.synthetic.images import BOMB_SIDE, EXT, NOT_IMAGE_HTML, bomb_png, draw, encode, normal_size

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
    cap = functools.partial(english_caption, rng)
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
    s.append(_Spec("exact_dup", "image", cap(), normal_size(rng), "JPEG", dup_group="exact-0"))
    s += [_Spec("exact_dup", "copy", cap(), dup_group="exact-0", source_key=i0) for _ in range(2)]
    i1 = len(s)
    s.append(_Spec("exact_dup", "image", cap(), normal_size(rng), "JPEG", dup_group="exact-1"))
    s.append(_Spec("exact_dup", "copy", s[i1].caption, dup_group="exact-1", source_key=i1))
    # Near duplicates: a JPEG and (a) the same picture at quality 60, (b) resized to 97 % at quality 85.
    for g, variant in enumerate(("requality", "resize")):
        k = len(s)
        s.append(_Spec("near_dup", "image", cap(), normal_size(rng), "JPEG", 92, f"near-{g}"))
        s.append(_Spec("near_dup", "near", cap(), dup_group=f"near-{g}", source_key=k, variant=variant))
    # Caption cases on valid images.
    caption_cases: list[tuple[str, list[str]]] = [
        ("empty_caption", [""]),
        ("whitespace_caption", WHITESPACE_CAPTIONS),
        ("html_caption", HTML_CAPTIONS),
        ("url_caption", URL_CAPTIONS),
        ("mojibake_caption", MOJIBAKE_CAPTIONS),
        ("long_caption", [long_caption(rng)]),
        ("non_english", NON_ENGLISH_CAPTIONS),
        ("one_word_caption", ONE_WORD_CAPTIONS),
        ("boilerplate_caption", BOILERPLATE_CAPTIONS),
    ]
    for tag, captions in caption_cases:
        s += [_Spec(tag, "image", c, normal_size(rng), "JPEG") for c in captions]
    return s


def _specs(rng: np.random.Generator, n_images: int) -> list[_Spec]:
    s = _special_specs(rng)
    if n_images < len(s) + 1:
        raise ValueError(
            f"n_images={n_images} is too small: need at least {len(s) + 1} (special cases + 1 ok)"
        )
    cap = functools.partial(english_caption, rng)
    for _ in range(n_images - len(s)):
        fmt = str(rng.choice(["JPEG", "JPEG", "JPEG", "JPEG", "JPEG", "JPEG", "JPEG", "PNG", "WEBP", "WEBP"]))
        size = normal_size(rng)
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
            pic = draw(sub, width, height)
            data = encode(pic, sp.fmt, sp.quality)
            ext = EXT[sp.fmt]
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
                data = encode(pic, "JPEG", 85)
            else:
                data = encode(pic, "JPEG", 60)
            width, height, fmt = pic.width, pic.height, "JPEG"
        elif sp.kind == "truncated":
            assert sp.size is not None
            full = encode(draw(sub, *sp.size), "JPEG", 90)
            data, fmt = full[: len(full) // 2], None
        elif sp.kind == "corrupt":
            data, fmt = sub.bytes(int(sub.integers(2_000, 20_000))), None
        elif sp.kind == "corrupt_soi":
            data, fmt = b"\xff\xd8\xff\xe0" + sub.bytes(int(sub.integers(2_000, 20_000))), None
        elif sp.kind == "zero":
            data, fmt = b"", None
        elif sp.kind == "html":
            data, fmt = NOT_IMAGE_HTML.encode(), None
        elif sp.kind == "bomb":
            data, (width, height), ext = bomb_png(), (BOMB_SIDE, BOMB_SIDE), "png"
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
