"""Captions step: `<output_dir>/download/` -> `<output_dir>/captions/` (cleaned captions; no image bytes).

Reads:  the `key` and `caption` columns of `<output_dir>/download/part-NNNNN.parquet`.
Writes: `<output_dir>/captions/part-NNNNN.parquet` with `key`, `caption` (cleaned) and `caption_raw`
        (the original); `rejected/part-NNNNN.parquet` (key, caption, caption_raw, reason, detail) for
        rows whose cleaned caption is shorter than `captions.min_chars` (reason `empty_caption`,
        detail = the raw caption cut to 200 characters, or what a null/blank one was); per-shard stats, markers, `manifest.json`.
        The captions are cleaned here once; the filter judges its caption rules on this output
        (see `pipelines.graph` for why captions come first).

Cleaning (`clean_caption`, pure, never raises): HTML entities unescaped (repeatedly) and tags
removed, ftfy (mojibake, surrogates, width, NFC), URLs and e-mail addresses removed (configurable),
control and invisible characters removed, whitespace collapsed, stock-photo / web boilerplate
trimmed ("Stock Photo - Image 12345", "| Shutterstock", "click to enlarge", "image may contain:"
...), then cut to `captions.max_chars` at a word boundary.

Run:  python -m pipelines.captions --config pipelines/configs/demo.yaml
      ray job submit --working-dir . -- python -m pipelines.captions --config my.yaml
"""

from __future__ import annotations

import html
import re
import sys
import time
import unicodedata
from typing import Any

import ftfy
import pyarrow as pa
import pyarrow.compute as pc

from breen.storage import Store
from pipelines import cli, graph, layout, raystart, runner
from pipelines.config import CaptionsConfig, PrepareConfig, from_dict, output_fields, to_dict

STEP = "captions"
STEP_INFO = graph.step(STEP)
READS = STEP_INFO.reads[STEP_INFO.rows_from]  # key, caption: never the image bytes
REASON_EMPTY = "empty_caption"
DETAIL_CHARS = 200
# Columns left out of rejected rows (the bytes stay recoverable by `key` from the upstream step).
REJECTED_DROP = ("image",)

# ftfy with our own HTML handling (done before it, so "caf&#195;&#169;" is repaired too).
_FTFY = ftfy.TextFixerConfig(unescape_html=False, explain=False)
_MAX_WORD = 64  # longer runs without a space are not words: `max_chars` cuts them hard
_MAX_UNESCAPE = 5  # "&amp;amp;amp;lt;" needs several rounds; bounded so it always ends

# ----------------------------------------------------------------------------- patterns
# All patterns are linear-time on adversarial input (no nested unbounded quantifiers that can
# overlap), and run on an input already cut to a bounded length (see `_raw_limit`).

_ENTITY = re.compile(r"&(?:#\d{1,7}|#[xX][0-9a-fA-F]{1,6}|[a-zA-Z][a-zA-Z0-9]{1,31});?")
_HTML_BLOCK = re.compile(
    r"<!--.*?(?:-->|$)|<(script|style)\b[^<>]*>.*?(?:</\1\s*>|$)", re.IGNORECASE | re.DOTALL
)
_HTML_TAG = re.compile(r"</?[a-zA-Z][a-zA-Z0-9:-]*(?:\s[^<>]*)?/?>|<![a-zA-Z][^<>]*>")
_UNCLOSED_TAG_AT_END = re.compile(r"</?[a-zA-Z][^<>]*$")
_EMAIL = re.compile(
    r"(?:mailto:)?[\w.+-]{1,64}@[\w-]{1,63}(?:\.[\w-]{1,63}){0,8}\.[a-z]{2,24}\b", re.IGNORECASE
)
_URL_BODY = r"(?:[^\s<>\"'()\[\]{}]|\([^\s()<>]*\))*(?<![.,;:!?])"  # balanced (...), no end punctuation
_URL = re.compile(
    r"\b(?:(?:https?|ftp)://|www\d{0,3}\.)"
    + _URL_BODY
    # bare domains with a path, e.g. "example.com/img/1.jpg" (a bare "example.com" is left alone)
    + r"|\b(?:[\w-]{1,63}\.){1,8}(?:com|net|org|info|biz|io|co|uk|de|fr|ru|jp|cn)/"
    + _URL_BODY,
    re.IGNORECASE,
)
_EMPTY_BRACKETS = re.compile(r"\(\s*\)|\[\s*\]|\{\s*\}|<\s*>")
_ORPHAN_PUNCT = re.compile(r"\s+([.,])(?=\s|$)")
# Words left pointing at a removed link: "... via", "(source: )", "photo from".
_DANGLING = re.compile(
    r"\s*\b(?:via|source|src|credits?|from|see|visit|at|on)\s*:?\s*$"
    r"|[(\[]\s*(?:source|src|via|credits?|photo|image|link)\s*:?\s*[)\]]",
    re.IGNORECASE,
)
# C0/C1 controls (tab/newline/CR are whitespace and handled by _SPACE), DEL, invisible format
# characters that carry no meaning in a caption (zero-width space, word joiner, BOM, soft hyphen,
# bidi controls), the replacement character left by broken decodes, and lone surrogates.
# ZWJ/ZWNJ (U+200C/D) are kept: emoji sequences and several scripts need them.
_CONTROL = re.compile(
    "[\x00-\x08\x0e-\x1f\x7f-\x84\x86-\x9f\u00ad\u200b\u200e\u200f\u202a-\u202e"
    "\u2060-\u2064\u2066-\u206f\ufeff\ufff9-\ufffd\ud800-\udfff]"
)
_SPACE = re.compile(r"\s+")

# Boilerplate sits at the head or the tail of a caption: head/tail patterns only look at this
# many characters there, which keeps them cheap on long captions whatever they contain.
_EDGE = 256
_SEP = r"[\s|:;,.·•~*_/\\–—-]"  # characters that separate a caption from a boilerplate tail/head
_STOCK_SITES = (
    r"shutterstock|alamy|i?stock(?:photo)?|getty\s*images|dreamstime|123rf|adobe\s*stock|depositphotos"
    r"|fotolia|bigstock(?:photo)?|pond5|canstock(?:photo)?|stocksy|pixabay|unsplash|pexels|freepik"
    r"|vecteezy|pinterest|flickr|wikimedia\s*commons|imgur|tumblr|etsy|ebay"
)
_STOCK_KIND = r"(?:photo(?:graph)?|image|picture|pic|illustration|vector|footage|video|clip\s*art)s?"
_STOCK = (
    r"\b(?:(?:royalty[\s-]*free|free|premium|high[\s-]*res(?:olution)?|hd)\s+)*stock\s+"
    + _STOCK_KIND
    + r"(?:y|ies)?"
)
_HEAD = [
    # Facebook / Instagram alt text, download prompts.
    re.compile(r"^(?:(?:this\s+)?image\s+may\s+contain|may\s+contain)\s*:\s*", re.IGNORECASE),
    re.compile(r"^no\s+(?:photo|image)\s+description\s+available\b\.?", re.IGNORECASE),
    # "Royalty-free stock photo of a cat" -> "a cat" (a plain "Photo of a cat" is left alone).
    re.compile(r"^(?:" + _STOCK + r"|royalty[\s-]*free\s+" + _STOCK_KIND + r")\s+of\s+", re.IGNORECASE),
    re.compile(r"^download\s+(?:this\s+)?(?:stock\s+)?" + _STOCK_KIND + r"\s*:\s*", re.IGNORECASE),
]
# No pattern starts with a run of separators (that backtracks badly on "- - - - ..."): the
# separators left in front of a removed tail are stripped by `_TRAIL_CHARS`.
_TAIL = [
    # "| Shutterstock", "- Alamy", "via Getty Images", "on Pinterest".
    re.compile(rf"(?:\b(?:on|via|by)\s+|[|–—-]\s*)(?:{_STOCK_SITES})\b\.?{_SEP}*$", re.IGNORECASE),
    # "Stock Photo - Download Image Now - Animal, Dog, Pets" (iStock titles).
    re.compile(rf"{_STOCK}\s*[-–—:|]\s*download\b[^|]*$", re.IGNORECASE),
    # "Stock Photo - Image 12345", "stock photo 12345", "Royalty-free stock photo ID: 123",
    # "stock image. Image of a, b - 987", "Royalty Free Stock Photography".
    re.compile(
        rf"{_STOCK}"
        r"(?:\s*[-–—|:,.]?\s*(?:(?:image|picture|photo|id|no|nr|number|item|#)[\s.:#]*)?\d[\d-]*"
        r"|\s*\.\s*(?:image|picture|illustration)\s+of\b[^.|]*)?"
        rf"{_SEP}*$",
        re.IGNORECASE,
    ),
    # "Image ID: 12345", "Photo #123456".
    re.compile(r"\b(?:image|photo|picture)\s*(?:id|#|no\.?)\s*:?\s*\d+[)\]]?\s*$", re.IGNORECASE),
]
_ANYWHERE = [
    # "Royalty-free stock photo", "royalty free image".
    re.compile(r"\broyalty[\s-]*free(?:\s+stock)?(?:\s+" + _STOCK_KIND + r")?\b", re.IGNORECASE),
    # "(click to enlarge)", "click here to view larger image", "Click for full size".
    re.compile(
        r"[(\[]?\s?\bclick\s+(?:here\s+)?(?:to|for)\s+(?:(?:see|view|open|zoom|the)\s+)*"
        r"(?:enlarged?|larger|bigger|zoom|full[\s-]*size|full\s+image|high[\s-]*res(?:olution)?)"
        r"(?:\s+(?:image|version|picture|photo|view))?\s?[)\]]?",
        re.IGNORECASE,
    ),
]
# Separators stripped from the ends (str.strip: linear, unlike an unanchored regex); "." "!" "?"
# ")" stay at the end, an opening bracket does not.
_LEAD_CHARS = " |:;,.·•~*_/\\–—-"
_TRAIL_CHARS = " |:;,·•~*_/\\–—-([{"


# ----------------------------------------------------------------------------- cleaning


def _raw_limit(max_chars: int) -> int:
    # Bound the work on huge inputs: markup and whitespace shrink when cleaned, so keep a margin.
    return 8 * max(max_chars, 0) + 4096


def _unescape(text: str) -> str:
    for _ in range(_MAX_UNESCAPE):
        if "&" not in text or not _ENTITY.search(text):
            break
        new = html.unescape(text)
        if new == text:
            break
        text = new
    return text


def _strip_html(text: str) -> str:
    if "<" not in text:
        return text
    text = _HTML_BLOCK.sub(" ", text)
    return _HTML_TAG.sub(" ", text)


def _sub_at_edge(text: str, patterns, at_start: bool) -> str:
    """Blank what `patterns` match in the first (`at_start`) or last `_EDGE` characters only, or in the
    whole of a shorter text."""
    if len(text) <= _EDGE:
        edge, rest = text, ""
    elif at_start:
        edge, rest = text[:_EDGE], text[_EDGE:]
    else:
        rest, edge = text[:-_EDGE], text[-_EDGE:]
    for pattern in patterns:
        edge = pattern.sub(" ", edge)
    return edge + rest if at_start else rest + edge


def _trim_boilerplate(text: str) -> str:
    for _ in range(4):
        before = text
        text = _sub_at_edge(text, _HEAD, at_start=True)
        text = _sub_at_edge(text, _TAIL, at_start=False)
        for pattern in _ANYWHERE:
            text = pattern.sub(" ", text)
        text = _SPACE.sub(" ", text)
        text = text.lstrip(_LEAD_CHARS).rstrip(_TRAIL_CHARS)
        if text == before:
            break
    return text


def _cut(text: str, max_chars: int) -> str:
    """Cut to at most `max_chars` at a word boundary (hard cut only inside a very long "word")."""
    if len(text) <= max_chars:
        return text
    if max_chars <= 0:
        return ""
    head = text[: max_chars + 1]
    if head[-1].isspace():  # the cut falls right after a whole word
        return head.rstrip()
    space = head.rfind(" ")
    # A run without spaces longer than any word (CJK text, a long token) is cut hard.
    head = head[:space] if space > 0 and len(head) - space <= _MAX_WORD else head[:max_chars]
    return head.rstrip(_TRAIL_CHARS) or head.rstrip()


def _clean(text: str, cfg: CaptionsConfig) -> str:
    limit = _raw_limit(cfg.max_chars)
    truncated = len(text) > limit
    if truncated:
        text = text[:limit]
        space = text.rfind(" ", limit // 2)
        if space > 0:
            text = text[:space]  # drop the partial word at the cut
    text = _unescape(text)
    text = _strip_html(text)
    if truncated:
        text = _UNCLOSED_TAG_AT_END.sub(" ", text)
    text = ftfy.fix_text(text, _FTFY)  # mojibake, surrogate pairs, widths, line breaks, NFC
    if "&" in text:  # mojibake repair can reveal entities (e.g. an "&amp;" inside broken UTF-8)
        text = _strip_html(_unescape(text))
    removed = 0
    if cfg.remove_emails and "@" in text:
        text, n = _EMAIL.subn(" ", text)
        removed += n
    if cfg.remove_urls:
        text, n = _URL.subn(" ", text)
        removed += n
    if removed:  # "a cat (http://x.org)." -> "a cat.", "sunset via www.x.org" -> "sunset"
        text = _SPACE.sub(" ", text).rstrip()  # single spaces keep the two patterns below linear
        text = _DANGLING.sub(" ", _EMPTY_BRACKETS.sub(" ", text))
        text = _ORPHAN_PUNCT.sub(r"\1", text)
    if not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
    text = _CONTROL.sub("", text)
    text = _SPACE.sub(" ", text).strip()
    text = _trim_boilerplate(text)
    cut = _cut(text, cfg.max_chars)
    if cut != text:  # the cut can leave the start of a boilerplate phrase at the end
        cut = _cut(_trim_boilerplate(cut), cfg.max_chars)
    return cut


def _as_str(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else str(value)


def clean_caption(text: str | None, cfg: CaptionsConfig) -> str:
    """The cleaned caption ("" for None/empty); pure, deterministic, never raises."""
    if text is None:
        return ""
    try:
        text = _as_str(text)
        return _clean(text, cfg) if text else ""
    except Exception:  # a bug here must not kill a 13M-row job: degrade to a plain clean-up
        try:
            safe = text[: _raw_limit(cfg.max_chars)].encode("utf-8", "ignore").decode("utf-8")
            return _cut(_SPACE.sub(" ", _CONTROL.sub("", safe)).strip(), cfg.max_chars)
        except Exception:
            return ""


# ----------------------------------------------------------------------------- one table


def _detail(raw: Any) -> str:
    if raw is None:
        return "caption is null"
    shown = _as_str(raw)[:DETAIL_CHARS]
    return shown if shown.strip() else f"caption is blank ({len(_as_str(raw))} characters)"


def clean_table(table: pa.Table, cfg: CaptionsConfig) -> tuple[pa.Table, pa.Table]:
    """Clean the `caption` column: (kept rows, rejected rows with reason/detail). Pure, no Ray.

    Kept rows have the same columns in the same order, `caption` replaced by the cleaned text and
    `caption_raw` (the original; left as is if the input already has one) right after it.
    """
    if "caption" not in table.column_names:
        raise ValueError(f"input has no 'caption' column (columns: {table.column_names})")
    raw_col = table.column("caption")
    raw = raw_col.to_pylist()
    cache: dict[Any, str] = {}  # web captions repeat a lot ("image", product titles): clean each once
    cleaned = []
    for c in raw:
        try:
            out_c = cache[c]
        except (KeyError, TypeError):
            out_c = clean_caption(c, cfg)
            if isinstance(c, str):
                cache[c] = out_c
        cleaned.append(out_c)
    idx = table.column_names.index("caption")
    out = table.set_column(idx, pa.field("caption", pa.string()), pa.array(cleaned, pa.string()))
    if "caption_raw" not in table.column_names:
        if not pa.types.is_string(raw_col.type):  # large_string, binary, null: as (valid) strings
            raw_col = pa.array([None if r is None else _as_str(r) for r in raw], pa.string())
        out = out.add_column(idx + 1, pa.field("caption_raw", pa.string()), raw_col)
    ok = pa.array([len(c) >= cfg.min_chars for c in cleaned], pa.bool_())
    kept = out.filter(ok)
    bad = out.filter(pc.invert(ok))
    details = [_detail(r) for r, c in zip(raw, cleaned, strict=True) if len(c) < cfg.min_chars]
    bad = bad.drop_columns([c for c in REJECTED_DROP if c in bad.column_names])
    rejected = layout.with_reason(bad, REASON_EMPTY, details)
    return kept, rejected


# ----------------------------------------------------------------------------- the step


class CaptionsWorker(runner.ShardWorker):
    """Cleans the captions of one download shard (one actor holds the config and compiled patterns)."""

    def __init__(self, in_dir: Store, out_dir: Store, captions: dict[str, Any]) -> None:
        super().__init__(in_dir, out_dir)
        self.cfg: CaptionsConfig = from_dict(CaptionsConfig, captions, "captions")

    def process(self, name: str) -> dict[str, Any]:
        t0 = time.monotonic()
        source = self.in_dir / f"{name}.parquet"
        table = layout.read_table(source, columns=list(READS))
        kept, rejected = clean_table(table, self.cfg)
        return layout.write_shard(
            self.out_dir, name, kept, rejected, table.num_rows,
            extra_stats={"seconds": round(time.monotonic() - t0, 3)}, inputs=[source],
        )  # fmt: skip


def run(cfg: PrepareConfig) -> dict[str, Any]:
    """Run the captions step for `cfg` on the current (or an embedded) Ray cluster."""
    in_dir = cfg.out / STEP_INFO.rows_from
    out = cfg.out / STEP
    names = layout.require_dataset(in_dir, STEP_INFO.rows_from)
    with runner.open_step(cfg, STEP, {"captions": output_fields(cfg.captions)}) as output:
        todo = runner.todo_shards(output, names)
        print(f"[{STEP}] {len(names)} input shards, {len(names) - len(todo)} already finished", flush=True)
        if todo:
            raystart.init_ray(cfg.ray.address, cfg.ray.num_cpus)
        runner.run_shards(
            STEP, todo, CaptionsWorker,
            {"in_dir": in_dir, "out_dir": out, "captions": to_dict(cfg.captions)},
            num_actors=cfg.captions.num_actors, num_cpus=cfg.captions.cpus_per_actor,
        )  # fmt: skip
        return runner.finish_step(output, [layout.dataset_input(in_dir)], {"captions": to_dict(cfg.captions)})


def main(argv: list[str] | None = None) -> int:
    return cli.step_main(__doc__, run, ("captions",), argv)


if __name__ == "__main__":
    sys.exit(main())
