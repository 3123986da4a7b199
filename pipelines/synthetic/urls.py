"""URL lists of the synthetic corpus: one row per entry plus failing URLs (HTTP 404, connection refused),
in every format the download step reads."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np

from pipelines.synthetic.captions import english_caption
from pipelines.synthetic.corpus import LICENSES, URL_LIST_COLUMNS, URL_LIST_FORMATS, Corpus, CorpusEntry
from pipelines.synthetic.server import closed_port_url


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
        entry = CorpusEntry(f"images/missing-{k:03d}.jpg", english_caption(rng), tag, extra)
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
