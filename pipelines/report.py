"""Report: one HTML page with the accounting and the data plots of a pipeline output directory.

Reads:  the step datasets found in DIR (a local folder or s3:// / gs:// URI; those of `pipelines.graph`,
        and any other step folder):
        per-shard stats JSON (rows in / kept / rejected by reason / seconds), `manifest.json`, and
        a few columns of sampled rows of the kept and rejected Parquet shards (never image bytes).
Writes: `DIR/report/index.html` and the PNG plots it embeds next to it:
        rows per step, rejected rows per reason, image size and aspect ratio, caption length
        (cleaned vs raw), language mix, teacher feature norms, throughput per step. The page is drawn
        in a local temporary folder, then each file is written to DIR/report/ (all or nothing).

Scale: accounting comes from the stats files only; histograms read only the needed columns of
at most `max_files` shards spread over the dataset and at most `sample_rows` rows (teacher:
`teacher_rows`), so the report takes seconds on a 13M-row run. Language counts are exact (one
small string column per shard). A missing step, column or file is a note in the page, never a crash.

Run:  python -m pipelines.report runs/prep
      (then open runs/prep/report/index.html)
"""

from __future__ import annotations

import argparse
import html
import json
import math
import re
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from breen import shard_format
from breen.storage import Location, Store
from pipelines import accounting, graph, layout

# Known step datasets, in pipeline order (`pipelines.graph`); any other folder of DIR with shard markers or
# a manifest is reported too (after these). The pre-training steps are named in the page when missing.
STEPS = tuple(graph.DATASETS)
CORE_STEPS = tuple(s.name for s in graph.chain("pretrain"))
# Which step each step reads its rows from (for the "input = upstream kept" column).
UPSTREAM = {s.name: s.rows_from for s in graph.STEPS if s.rows_from}
# Pre-training steps whose kept rows carry width/height, latest first (sizes come from the first found).
IMAGE_STEPS = tuple(s.name for s in reversed(graph.chain("pretrain")) if "width" in s.writes)
FEATURES_STEP = graph.TRAINING["pretrain"]  # where the teacher features are
PLOTS = ("rows_per_step", "rejected_reasons", "image_size", "aspect_ratio", "caption_length", "language",
         "teacher_norms", "throughput")  # fmt: skip
REPORT_DIR = "report"
_SHARD_RE = re.compile(r"^(part-\d+)")


# ----------------------------------------------------------------------------- reading


@dataclass
class StepData:
    """What the report knows about one step dataset (from its stats files and manifest)."""

    name: str
    path: Store
    stats: list[dict[str, Any]] = field(default_factory=list)
    manifest: dict[str, Any] | None = None
    unfinished: int = 0  # Parquet shards without a completion marker
    notes: list[str] = field(default_factory=list)

    @property
    def counts(self) -> dict[str, Any]:
        """rows_in, kept, rejected by reason and rejected_total of the finished shards (`pipelines.accounting`)."""
        return accounting.summarize(self.stats)

    @property
    def rows_in(self) -> int:
        return self.counts["rows_in"]

    @property
    def kept(self) -> int:
        return self.counts["kept"]

    @property
    def rejected(self) -> dict[str, int]:
        return self.counts["rejected"]

    @property
    def rejected_total(self) -> int:
        return self.counts["rejected_total"]

    @property
    def balanced(self) -> bool:
        """The step and each of its shards: rows in = kept + rejected."""
        return accounting.balanced(self.counts) and all(accounting.balanced(accounting.summarize([s]))
                                                        for s in self.stats)  # fmt: skip

    @property
    def seconds(self) -> float | None:
        secs = [s["seconds"] for s in self.stats if isinstance(s.get("seconds"), (int, float))]
        return float(sum(secs)) if secs else None

    def files(self, rejected: bool = False) -> list[Store]:
        """Parquet files of finished shards (kept rows, or rejected rows)."""
        done = {s.get("shard") for s in self.stats}
        folder = self.path / layout.REJECTED if rejected else self.path
        out = []
        for p in folder.glob("part-*.parquet"):
            m = _SHARD_RE.match(p.name)
            if m and m.group(1) in done:
                out.append(p)
        return out


def load_step(path: Location) -> StepData:
    path = Store.at(path)
    step = StepData(path.name, path)
    for name in layout.finished_shards(path):
        try:
            stats = layout.stats_path(path, name).read_json()
            stats.setdefault("shard", name)
            step.stats.append(stats)
        except (OSError, ValueError) as e:
            step.notes.append(f"{name}: unreadable stats ({type(e).__name__}); shard left out")
    done = {s["shard"] for s in step.stats}
    shards = {m.group(1) for n in path.names(".parquet") if (m := _SHARD_RE.match(n))}
    step.unfinished = len(shards - done)
    try:
        step.manifest = (path / "manifest.json").read_json()
    except FileNotFoundError:
        step.notes.append("no manifest.json (step still running, or interrupted)")
    except (OSError, ValueError) as e:
        step.notes.append(f"unreadable manifest.json ({type(e).__name__})")
    return step


def discover_steps(out_dir: Location) -> list[str]:
    """Names of the step dataset folders in `out_dir` (known ones in pipeline order first)."""
    out_dir = Store.at(out_dir)
    found = [
        d.name
        for d in out_dir.dirs()
        if d.name != REPORT_DIR
        and (d.name in STEPS or (d / "manifest.json").exists() or layout.finished_shards(d))
    ]
    order = {n: i for i, n in enumerate(STEPS)}
    return sorted(found, key=lambda n: (order.get(n, len(STEPS)), n))


def _spread(items: list[Location], k: int) -> list[Location]:
    """At most k items spread evenly over the list (first and last included)."""
    if len(items) <= k:
        return items
    idx = np.unique(np.linspace(0, len(items) - 1, k).round().astype(int))
    return [items[i] for i in idx]


def iter_sample(
    files: list[Location],
    columns: list[str],
    max_rows: int,
    *,
    max_files: int = 64,
    seed: int = 0,
    batch_rows: int = 4096,
) -> Iterator[pa.Table]:
    """Yield small tables with `columns` sampled from spread files: row groups in random order,
    about max_rows / files rows from each file. Files lacking a column are skipped."""
    files = _spread(files, max_files)
    if not files or max_rows <= 0:
        return
    rng = np.random.default_rng(seed)
    quota = max(1, math.ceil(max_rows / len(files)))
    for path in files:
        try:
            # Streamed reads: only the pages of the rows taken are decoded, not the whole column chunk.
            store = Store.at(path)
            pf = pq.ParquetFile(store.fs.open_input_file(store.path), pre_buffer=False, buffer_size=1 << 20)
        except (OSError, pa.ArrowException):
            continue
        if not set(columns) <= set(pf.schema_arrow.names) or pf.metadata.num_rows == 0:
            continue
        need = quota
        for rg in rng.permutation(pf.num_row_groups):
            batches = pf.iter_batches(batch_size=min(need, batch_rows), row_groups=[int(rg)], columns=columns)
            for batch in batches:
                if batch.num_rows:
                    yield pa.Table.from_batches([batch.slice(0, need)])
                    need -= min(batch.num_rows, need)
                if need <= 0:
                    break
            if need <= 0:
                break


def sample_table(
    files: list[Location], columns: list[str], max_rows: int, *, max_files: int = 64
) -> pa.Table | None:
    parts = list(iter_sample(files, columns, max_rows, max_files=max_files))
    return pa.concat_tables(parts, promote_options="permissive") if parts else None


def _has_columns(files: list[Store], columns: list[str]) -> bool:
    for path in files[:1]:
        try:
            return set(columns) <= set(layout.read_schema(path).names)
        except (OSError, pa.ArrowException):
            return False
    return False


def _numbers(table: pa.Table, column: str) -> np.ndarray:
    col = table.column(column)
    col = pc.drop_null(col)
    return np.asarray(col.to_numpy(), dtype=np.float64) if len(col) else np.zeros(0)


# ----------------------------------------------------------------------------- plots


def _figure(width: float = 8.0, height: float = 4.0, ncols: int = 1):
    # Figure objects draw with the Agg canvas without touching pyplot's global state.
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(1, ncols)
    return fig, axes


def _save(fig, path: Path) -> str:
    fig.savefig(path, dpi=90)
    return path.name


def plot_rows(steps: list[StepData], path: Path) -> str:
    fig, ax = _figure(max(6.0, 1.6 * len(steps) + 2))
    x = np.arange(len(steps))
    w = 0.27
    for i, (label, vals, color) in enumerate([
        ("rows in", [s.rows_in for s in steps], "#4c72b0"),
        ("kept", [s.kept for s in steps], "#55a868"),
        ("rejected", [s.rejected_total for s in steps], "#c44e52"),
    ]):  # fmt: skip
        bars = ax.bar(x + (i - 1) * w, vals, w, label=label, color=color)
        ax.bar_label(bars, labels=[f"{v:,}" for v in vals], fontsize=7, rotation=90, padding=2)
    ax.set_xticks(x, [s.name for s in steps])
    ax.set_ylabel("rows")
    ax.set_title("Rows per step")
    ax.margins(y=0.2)
    ax.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0))
    return _save(fig, path)


def plot_reasons(steps: list[StepData], path: Path) -> str:
    labels, values, colors = [], [], []
    palette = ["#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860"]
    for i, s in enumerate(steps):
        for reason, n in s.rejected.items():
            labels.append(f"{s.name}: {reason}")
            values.append(n)
            colors.append(palette[i % len(palette)])
    fig, ax = _figure(8.0, max(2.5, 0.35 * len(labels) + 1))
    y = np.arange(len(labels))[::-1]
    bars = ax.barh(y, values, color=colors)
    ax.bar_label(bars, labels=[f"{v:,}" for v in values], fontsize=8, padding=2)
    ax.set_yticks(y, labels)
    ax.set_xlabel("rejected rows")
    ax.set_title("Rejected rows per reason")
    ax.margins(x=0.15)
    return _save(fig, path)


def _upper(*arrays: np.ndarray, q: float = 99.5) -> float:
    """Histogram range end: a high percentile, so a few huge values do not squash the plot."""
    vals = [float(np.percentile(a, q)) for a in arrays if a.size]
    return max([*vals, 1.0])


def _clipped_hist(ax, v: np.ndarray, top: float, bins: int, **kw) -> None:
    # Values above `top` land in the last bin (counted, not dropped).
    ax.hist(np.clip(v, None, top), bins=np.linspace(0, top, bins + 1), **kw)


def plot_image_size(table: pa.Table, step: str, path: Path) -> str:
    pairs = [("width", "height", "stored")]
    if {"original_width", "original_height"} <= set(table.column_names):
        pairs.append(("original_width", "original_height", "original"))
    fig, axes = _figure(5.0 * len(pairs), 3.8, len(pairs))
    axes = np.atleast_1d(axes)
    for ax, (wc, hc, what) in zip(axes, pairs, strict=True):
        w, h = _numbers(table, wc), _numbers(table, hc)
        top = _upper(w, h)
        _clipped_hist(ax, w, top, 50, alpha=0.6, label="width")
        _clipped_hist(ax, h, top, 50, alpha=0.6, label="height")
        ax.set_xlabel(
            f"pixels (last bin: >= {top:,.0f})" if top < max(w.max(initial=0), h.max(initial=0)) else "pixels"
        )
        ax.set_ylabel("rows (sample)")
        ax.set_title(f"{what} image size ({step}, {len(w):,} rows)")
        ax.legend()
    return _save(fig, path)


def aspect_ratios(table: pa.Table) -> np.ndarray:
    t = table.filter(pc.and_(pc.is_valid(table.column("width")), pc.is_valid(table.column("height"))))
    w, h = _numbers(t, "width"), _numbers(t, "height")
    ok = (w > 0) & (h > 0)
    return w[ok] / h[ok]


def plot_aspect(ratio: np.ndarray, step: str, path: Path) -> str:
    from matplotlib.ticker import NullLocator

    fig, ax = _figure(7.0, 3.8)
    lo, hi = float(np.min(ratio, initial=1.0)), float(np.max(ratio, initial=1.0))
    lo, hi = min(lo, 0.5), max(hi, 2.0)
    ax.hist(ratio, bins=np.geomspace(lo * 0.98, hi * 1.02, 60), color="#8172b3")
    ax.set_xscale("log")
    ticks = [(2.0**k, f"1/{2**-k}" if k < 0 else f"{2**k}") for k in range(-6, 7)]
    ticks = [(t, label) for t, label in ticks if lo * 0.98 <= t <= hi * 1.02]
    ax.set_xticks([t for t, _ in ticks], [label for _, label in ticks])
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xlabel("aspect ratio width / height (log scale)")
    ax.set_ylabel("rows (sample)")
    ax.set_title(f"Aspect ratio ({step}, {len(ratio):,} rows)")
    return _save(fig, path)


def plot_caption_length(clean: np.ndarray, raw: np.ndarray, path: Path) -> str:
    fig, ax = _figure(7.0, 3.8)
    top = _upper(raw, clean)
    _clipped_hist(ax, raw, top, 60, alpha=0.55, label="caption_raw", color="#dd8452")
    _clipped_hist(ax, clean, top, 60, alpha=0.55, label="caption (cleaned)", color="#4c72b0")
    longest = max(raw.max(initial=0), clean.max(initial=0))
    ax.set_xlabel(f"characters (last bin: >= {top:,.0f})" if top < longest else "characters")
    ax.set_ylabel("rows (sample)")
    ax.set_title(f"Caption length ({len(clean):,} kept rows of captions)")
    ax.legend()
    return _save(fig, path)


def plot_language(kept: Counter[str], rejected: Counter[str], path: Path, top: int = 15) -> str:
    total = kept + rejected
    langs = [k for k, _ in total.most_common(top)]
    other_k = sum(v for k, v in kept.items() if k not in langs)
    other_r = sum(v for k, v in rejected.items() if k not in langs)
    labels = [*langs, *(["other"] if other_k or other_r else [])]
    kv = [kept[k] for k in langs] + ([other_k] if len(labels) > len(langs) else [])
    rv = [rejected[k] for k in langs] + ([other_r] if len(labels) > len(langs) else [])
    fig, ax = _figure(max(6.0, 0.5 * len(labels) + 2), 3.8)
    x = np.arange(len(labels))
    ax.bar(x, kv, label="kept (filter)", color="#55a868")
    ax.bar(x, rv, bottom=kv, label="rejected: language", color="#c44e52")
    ax.set_xticks(x, labels, rotation=45 if len(labels) > 10 else 0)
    ax.set_ylabel("rows")
    ax.set_title("Language mix (filter step)")
    ax.legend()
    return _save(fig, path)


def plot_norms(norms: dict[str, np.ndarray], n_rows: int, path: Path) -> str:
    fig, ax = _figure(7.0, 3.8)
    for (name, v), color in zip(norms.items(), ("#4c72b0", "#dd8452"), strict=False):
        v = v[np.isfinite(v)]
        if v.size:
            ax.hist(v, bins=80, alpha=0.55, label=f"{name} ({v.size:,} tokens)", color=color)
    ax.set_xlabel("per-token L2 norm")
    ax.set_ylabel("tokens")
    ax.set_title(f"Teacher feature norms ({n_rows:,} sampled rows)")
    ax.legend()
    return _save(fig, path)


def plot_throughput(rates: list[tuple[str, float]], path: Path) -> str:
    fig, ax = _figure(max(6.0, 1.2 * len(rates) + 2), 3.8)
    bars = ax.bar([n for n, _ in rates], [r for _, r in rates], color="#937860")
    ax.bar_label(bars, labels=[f"{r:,.1f}" for _, r in rates], fontsize=8, padding=2)
    ax.set_ylabel("rows / s per worker")
    ax.set_title("Throughput per step (sum rows in / sum shard seconds)")
    ax.margins(y=0.15)
    return _save(fig, path)


# ----------------------------------------------------------------------------- teacher features


def _tensor_batch(col: pa.ChunkedArray | pa.Array) -> tuple[np.ndarray, int]:
    """(array [n, tokens, D] of the non-null rows, number of null rows) of a tensor column."""
    values, valid = shard_format.tensor_values(col)
    return values, int((~valid).sum())


def teacher_norms(files: list[Location], columns: list[str], max_rows: int, max_files: int) -> dict[str, Any]:
    norms: dict[str, list[np.ndarray]] = {c: [] for c in columns}
    info: dict[str, Any] = {"rows": 0, "nulls": Counter(), "nonfinite": Counter(), "shape": {}}
    # Small batches: a row of 100 x 1024 float16 is 200 KB, decoded a few dozen rows at a time.
    for table in iter_sample(files, columns, max_rows, max_files=max_files, seed=1, batch_rows=32):
        info["rows"] += table.num_rows
        for c in columns:
            x, nulls = _tensor_batch(table.column(c))
            info["nulls"][c] += nulls
            info["shape"][c] = list(x.shape[1:])
            for i in range(0, len(x), 128):  # float32 in slices: bounded memory whatever D is
                chunk = x[i : i + 128].astype(np.float32)
                info["nonfinite"][c] += int(np.count_nonzero(~np.isfinite(chunk)))
                norms[c].append(np.linalg.norm(chunk, axis=-1).ravel())
    info["norms"] = {c: np.concatenate(v) if v else np.zeros(0) for c, v in norms.items()}
    return info


# ----------------------------------------------------------------------------- HTML


def _e(x: Any) -> str:
    return html.escape(str(x))


def _code(text: str) -> str:
    """Escaped text with `name` shown as code."""
    return re.sub(r"`([^`]+)`", r"<code>\1</code>", _e(text))


def _fmt(x: float | None, digits: int = 1) -> str:
    return "–" if x is None or not math.isfinite(x) else f"{x:,.{digits}f}"


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _summary_row(name: str, v: np.ndarray) -> list[str]:
    if v.size == 0:
        return [_e(name), "0", "–", "–", "–", "–", "–"]
    q = np.percentile(v, [5, 50, 95])
    return [_e(name), f"{v.size:,}", _fmt(float(v.mean())), _fmt(q[0]), _fmt(q[1]), _fmt(q[2]),
            _fmt(float(v.max()))]  # fmt: skip


_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 1100px; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; vertical-align: top; }
th { background: #f3f3f3; } td:first-child { text-align: left; font-weight: 600; }
.reasons { display: block; text-align: left; font-weight: normal; }
.ok { color: #1a7f37; font-weight: 700; } .bad { color: #cf222e; font-weight: 700; }
.note { color: #7a5a00; background: #fff8c5; padding: 0.2em 0.5em; margin: 0.2em 0; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.3em 0; }
pre { background: #f6f8fa; padding: 0.6em; overflow-x: auto; font-size: 0.8em; }
"""


class _Page:
    def __init__(self, title: str) -> None:
        self.title = title
        self.parts: list[str] = []

    def h2(self, text: str) -> None:
        self.parts.append(f"<h2>{_e(text)}</h2>")

    def raw(self, text: str) -> None:
        self.parts.append(text)

    def p(self, text: str) -> None:
        self.parts.append(f"<p>{_code(text)}</p>")

    def note(self, text: str) -> None:
        self.parts.append(f'<p class="note">{_code(text)}</p>')

    def img(self, name: str, alt: str) -> None:
        self.parts.append(f'<p><img src="{_e(name)}" alt="{_e(alt)}"></p>')

    def render(self) -> str:
        body = "\n".join(self.parts)
        return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_e(self.title)}</title>"
                f"<style>{_CSS}</style></head>\n<body>\n<h1>{_e(self.title)}</h1>\n{body}\n</body></html>\n")  # fmt: skip


def _mark(ok: bool) -> str:
    return '<span class="ok">✓</span>' if ok else '<span class="bad">✗</span>'


def _accounting(page: _Page, steps: list[StepData]) -> None:
    by_name = {s.name: s for s in steps}
    rows = []
    for s in steps:
        reasons = "<br>".join(f"{_e(r)}: {n:,}" for r, n in s.rejected.items()) or "–"
        up = by_name.get(UPSTREAM.get(s.name, ""))
        if up is None:
            upstream = "–"
        else:
            upstream = f"{_mark(s.rows_in == up.kept)} kept of {_e(up.name)}: {up.kept:,}"
        rate = s.rows_in / s.seconds if s.seconds else None
        rows.append([
            _e(s.name), f"{len(s.stats):,}", f"{s.rows_in:,}", f"{s.kept:,}", f"{s.rejected_total:,}",
            f'<span class="reasons">{reasons}</span>', _mark(s.balanced), upstream,
            _fmt(s.seconds, 2), _fmt(rate),
        ])  # fmt: skip
    page.raw(_table(["step", "shards", "rows in", "kept", "rejected", "rejected by reason",
                     "in = kept + rejected", "input = upstream kept", "shard seconds", "rows/s per worker"],
                    rows))  # fmt: skip
    page.p(
        "The last-but-one column is informational: it differs while an upstream step is re-run or unfinished."
    )


@dataclass
class _Report:
    out_dir: Store
    dest: Path  # the local folder the page is drawn in
    page: _Page
    sample_rows: int
    teacher_rows: int
    max_files: int
    made: list[str] = field(default_factory=list)

    def path(self, plot: str) -> Path:
        return self.dest / f"{plot}.png"

    def img(self, plot: str, alt: str, draw: Callable[..., str], *args: Any) -> None:
        """Draw one plot; a failure becomes a note (the rest of the report still gets written)."""
        try:
            name = draw(*args, self.path(plot))
        except Exception as e:  # a plot must never take the report down
            self.page.note(f"{alt}: plot failed ({type(e).__name__}: {e})")
            return
        self.made.append(name)
        self.page.img(name, alt)


def _section_steps(r: _Report, steps: list[StepData], absent: list[str]) -> None:
    page = r.page
    page.h2("Accounting")
    if absent:
        page.note(f"steps not found in {r.out_dir}: {', '.join(absent)} (skipped)")
    if not steps:
        page.note("no step dataset with finished shards: nothing to report")
        return
    _accounting(page, steps)
    for s in steps:
        for n in s.notes:
            page.note(f"{s.name}: {n}")
        if s.unfinished:
            page.note(f"{s.name}: {s.unfinished} shard(s) without a completion marker (running or failed; "
                      "not counted)")  # fmt: skip
        if not s.balanced:
            page.note(f"{s.name}: rows in != kept + rejected: rows were lost or duplicated")
    r.img("rows_per_step", "rows per step", plot_rows, steps)
    if any(s.rejected for s in steps):
        r.img("rejected_reasons", "rejected rows per reason", plot_reasons, steps)
    else:
        page.note("no rejected rows in any step")


def _section_images(r: _Report, by_name: dict[str, StepData]) -> None:
    page = r.page
    page.h2("Image sizes")
    for name in IMAGE_STEPS:
        step = by_name.get(name)
        if step is None or not _has_columns(step.files(), ["width", "height"]):
            continue
        files = step.files()
        cols = ["width", "height"]
        if _has_columns(files, ["original_width", "original_height"]):
            cols += ["original_width", "original_height"]
        table = sample_table(files, cols, r.sample_rows, max_files=r.max_files)
        if table is None or table.num_rows == 0:
            page.note(f"{name}: no rows to sample")
            return
        page.p(f"From the kept rows of `{name}` ({table.num_rows:,} sampled rows of {step.kept:,}).")
        r.img("image_size", "image size", plot_image_size, table, name)
        ratio = aspect_ratios(table)
        r.img("aspect_ratio", "aspect ratio", plot_aspect, ratio, name)
        return
    page.note("no step with width/height columns: image size plots skipped")


def _section_captions(r: _Report, by_name: dict[str, StepData]) -> None:
    page = r.page
    page.h2("Captions")
    step = by_name.get("captions")
    if step is None:
        page.note("no captions step: caption length plot skipped")
        return
    files = step.files()
    if not _has_columns(files, ["caption", "caption_raw"]):
        page.note("captions: kept rows have no caption/caption_raw columns: plot skipped")
        return
    table = sample_table(files, ["caption", "caption_raw"], r.sample_rows, max_files=r.max_files)
    if table is None or table.num_rows == 0:
        page.note("captions: no kept rows to sample")
        return
    clean = np.asarray(pc.fill_null(pc.utf8_length(table.column("caption")), 0).to_numpy(), dtype=np.float64)
    raw = np.asarray(
        pc.fill_null(pc.utf8_length(table.column("caption_raw")), 0).to_numpy(), dtype=np.float64
    )
    changed = pc.sum(pc.fill_null(pc.not_equal(table.column("caption"), table.column("caption_raw")), True))
    r.img("caption_length", "caption length", plot_caption_length, clean, raw)
    page.raw(_table(["characters", "rows", "mean", "p5", "median", "p95", "max"],
                    [_summary_row("caption (cleaned)", clean), _summary_row("caption_raw", raw)]))  # fmt: skip
    page.p(f"Cleaning changed {changed.as_py() / table.num_rows:.1%} of the sampled captions.")


def _count_values(files: list[Store], column: str, reason: str | None = None) -> tuple[Counter[str], int]:
    """Exact counts of `column` over all files (streamed, one small column at a time)."""
    counts: Counter[str] = Counter()
    read = 0
    for path in files:
        try:
            names = layout.read_schema(path).names
        except (OSError, pa.ArrowException):
            continue
        if column not in names or (reason is not None and "reason" not in names):
            continue
        t = layout.read_table(path, columns=[column] + (["reason"] if reason is not None else []))
        if reason is not None:
            t = t.filter(pc.equal(t.column("reason"), reason))
        read += 1
        for item in pc.value_counts(t.column(column).cast(pa.string())).to_pylist():
            counts["unknown" if item["values"] is None else item["values"]] += item["counts"]
    return counts, read


def _section_language(r: _Report, by_name: dict[str, StepData]) -> None:
    page = r.page
    page.h2("Language")
    step = by_name.get("filter")
    if step is None:
        page.note("no filter step: language mix skipped")
        return
    kept, n_kept = _count_values(step.files(), "language")
    rejected, _ = _count_values(step.files(rejected=True), "language", reason="language")
    if not n_kept and not rejected:
        page.note("filter: no `language` column: language mix skipped")
        return
    n_lang_rej = step.rejected.get("language", 0)
    if n_lang_rej and sum(rejected.values()) < n_lang_rej:
        page.note(f"filter: {n_lang_rej - sum(rejected.values()):,} rows rejected for language carry no "
                  "`language` value and are not in the plot")  # fmt: skip
    r.img("language", "language mix", plot_language, kept, rejected)
    rows = [[_e(k), f"{kept[k]:,}", f"{rejected[k]:,}"] for k, _ in (kept + rejected).most_common(30)]
    page.raw(_table(["language", "kept", "rejected (language)"], rows))
    page.p("`unknown`: no language detected with enough confidence (null).")


def _section_teacher(r: _Report, by_name: dict[str, StepData]) -> None:
    page = r.page
    page.h2("Teacher features")
    step = by_name.get(FEATURES_STEP)
    if step is None:
        page.note(f"no {FEATURES_STEP} step (teacher features): feature norms skipped")
        return
    files = step.files()
    cols = [c for c in ("fine", "coarse") if _has_columns(files, [c])]
    if not cols:
        page.note(f"{FEATURES_STEP}: kept rows have no fine/coarse columns: feature norms skipped")
        return
    info = teacher_norms(files, cols, r.teacher_rows, r.max_files)
    if not info["rows"]:
        page.note(f"{FEATURES_STEP}: no rows to sample")
        return
    r.img("teacher_norms", "teacher feature norms", plot_norms, info["norms"], info["rows"])
    rows = []
    for c in cols:
        v = info["norms"][c]
        fin = v[np.isfinite(v)]
        rows.append([_e(c), _e("x".join(map(str, info["shape"].get(c, [])))), f"{info['nulls'][c]:,}",
                     f"{info['nonfinite'][c]:,}", _fmt(float(fin.mean()) if fin.size else None, 2),
                     _fmt(float(fin.min()) if fin.size else None, 2),
                     _fmt(float(fin.max()) if fin.size else None, 2)])  # fmt: skip
    page.raw(
        _table(["column", "tokens x dim", "null rows", "non-finite values", "mean norm", "min", "max"], rows)
    )
    page.p(f"{info['rows']:,} sampled rows of {step.kept:,}.")
    for c in cols:
        if info["nonfinite"][c]:
            page.note(f"{FEATURES_STEP}: {c} has non-finite values (float16 overflow?)")
    teacher_cfg = (step.manifest or {}).get("config", {}).get("teacher")
    if teacher_cfg:
        page.raw(f"<details><summary>teacher config</summary><pre>{_e(json.dumps(teacher_cfg, indent=2))}"
                 "</pre></details>")  # fmt: skip


def _section_throughput(r: _Report, steps: list[StepData]) -> None:
    page = r.page
    page.h2("Throughput")
    rates = [(s.name, s.rows_in / s.seconds) for s in steps if s.seconds]
    missing = [s.name for s in steps if not s.seconds]
    if missing:
        page.note(f"no `seconds` in the stats of: {', '.join(missing)}")
    if not rates:
        page.note("no timings: throughput plot skipped")
        return
    r.img("throughput", "throughput per step", plot_throughput, rates)
    page.p("Rows per second of one worker (sum of rows in / sum of per-shard seconds); a cluster's rate is "
           "about this times the number of workers of the step.")  # fmt: skip


def _section_manifests(r: _Report, steps: list[StepData]) -> None:
    with_manifest = [s for s in steps if s.manifest]
    if not with_manifest:
        return
    r.page.h2("Manifests")
    for s in with_manifest:
        m = s.manifest or {}
        r.page.raw(f"<details><summary>{_e(s.name)}: code {_e(m.get('code_version', '?'))}</summary>"
                   f"<pre>{_e(json.dumps({k: m.get(k) for k in ('inputs', 'config', 'versions', 'counts')}, indent=2, default=str))}"
                   "</pre></details>")  # fmt: skip


def write_report(
    out_dir: str | Path | Store, *, sample_rows: int = 20_000, teacher_rows: int = 2_000, max_files: int = 64
) -> Store:
    """Write `out_dir/report/index.html` and its PNG plots; return the HTML location."""
    out_dir = Store.at(out_dir, "out_dir")
    if not out_dir.is_dir():
        raise FileNotFoundError(f"not a pipeline output directory: {out_dir}")
    with tempfile.TemporaryDirectory(prefix="breen-report-") as work:
        return _write_report(out_dir, Path(work), sample_rows, teacher_rows, max_files)


def _write_report(out_dir: Store, work: Path, sample_rows: int, teacher_rows: int, max_files: int) -> Store:
    target = out_dir / REPORT_DIR
    for plot in PLOTS:  # no stale plot from an earlier report survives
        (target / f"{plot}.png").delete()
    found = discover_steps(out_dir)
    absent = [n for n in CORE_STEPS if n not in found]
    steps = []
    for name in found:
        step = load_step(out_dir / name)
        if step.stats:
            steps.append(step)
        else:
            absent.append(f"{name} (no finished shards)")
    by_name = {s.name: s for s in steps}
    page = _Page(f"Pipeline report: {out_dir.name}")
    page.p(f"{out_dir} — generated {time.strftime('%Y-%m-%d %H:%M:%S')}")
    r = _Report(out_dir, work, page, sample_rows, teacher_rows, max_files)
    _section_steps(r, steps, absent)
    for section in (_section_images, _section_captions, _section_language, _section_teacher):
        try:
            section(r, by_name)
        except Exception as e:  # unreadable data in one section must not lose the others
            page.note(f"{section.__name__[len('_section_') :]}: skipped ({type(e).__name__}: {e})")
    _section_throughput(r, steps)
    _section_manifests(r, steps)
    for plot in r.made:  # the plots first, the page that embeds them last
        (target / plot).write_bytes((work / plot).read_bytes())
    index = target / "index.html"
    index.write_text(page.render())
    return index


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.report", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out_dir", help="pipeline output_dir (holds download/, filter/, ...); a folder or an "
                        "s3:// or gs:// URI (endpoint from AWS_ENDPOINT_URL)")
    parser.add_argument("--sample-rows", type=int, default=20_000, help="rows sampled for histograms")
    parser.add_argument("--teacher-rows", type=int, default=2_000, help="rows sampled for feature norms")
    parser.add_argument("--max-files", type=int, default=64, help="shards sampled per dataset")
    args = parser.parse_args(argv)
    try:
        path = write_report(args.out_dir, sample_rows=args.sample_rows, teacher_rows=args.teacher_rows,
                            max_files=args.max_files)  # fmt: skip
    except FileNotFoundError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"[report] wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
