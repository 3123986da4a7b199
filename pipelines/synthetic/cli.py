"""`python -m pipelines.synthetic OUT_DIR [--serve]`: write the corpus, its URL list and SFT records; serve them."""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

from pipelines.synthetic.corpus import URL_LIST_FORMATS, make_corpus
from pipelines.synthetic.server import serve
from pipelines.synthetic.sft import make_sft_corpus
from pipelines.synthetic.urls import write_url_list


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
