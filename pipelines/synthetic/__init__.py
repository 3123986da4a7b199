"""Synthetic image-caption corpus with realistic bad cases, served from 127.0.0.1.

The demo and the tests need a web-scale-looking input without the internet. This package writes:

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

Modules: `corpus` (the tags, `make_corpus`), `images` (drawing, encoding, bad files), `captions`, `server`
(the local HTTP server), `urls` (URL lists), `sft` (SFT records), `teacher_inputs` (the teacher step's
inputs, written directly), `cli` (the command below).

Run it:

    python -m pipelines.synthetic demo_out/corpus --n 300 --seed 0          # write files only
    python -m pipelines.synthetic demo_out/corpus --serve [--port 8765]     # write, then serve

With `--serve` the URL list points at the live server (printed on stdout) and the server runs
until Ctrl-C. From Python:

    corpus = make_corpus(tmp / "corpus", n_images=60)
    with serve(corpus.root) as server:
        write_url_list(corpus, server.base_url, tmp / "urls.parquet", "parquet")
"""

from pipelines.synthetic.captions import english_caption
from pipelines.synthetic.cli import main
from pipelines.synthetic.corpus import (
    EXPECT_TAGS,
    EXTRA_COLUMNS,
    LICENSES,
    URL_LIST_COLUMNS,
    URL_LIST_FORMATS,
    URL_ONLY_TAGS,
    Corpus,
    CorpusEntry,
    make_corpus,
    min_corpus_size,
)
from pipelines.synthetic.images import BOMB_SIDE, NOT_IMAGE_HTML, bomb_png, draw, encode
from pipelines.synthetic.server import LocalServer, closed_port_url, serve
from pipelines.synthetic.sft import SFT_EXPECT_TAGS, make_sft_corpus
from pipelines.synthetic.teacher_inputs import write_teacher_inputs
from pipelines.synthetic.urls import url_list_rows, write_url_list

__all__ = [
    "BOMB_SIDE",
    "EXPECT_TAGS",
    "EXTRA_COLUMNS",
    "LICENSES",
    "NOT_IMAGE_HTML",
    "SFT_EXPECT_TAGS",
    "URL_LIST_COLUMNS",
    "URL_LIST_FORMATS",
    "URL_ONLY_TAGS",
    "Corpus",
    "CorpusEntry",
    "LocalServer",
    "bomb_png",
    "closed_port_url",
    "draw",
    "encode",
    "english_caption",
    "main",
    "make_corpus",
    "make_sft_corpus",
    "min_corpus_size",
    "serve",
    "url_list_rows",
    "write_teacher_inputs",
    "write_url_list",
]
