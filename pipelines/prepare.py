"""Data preparation end to end: download -> captions -> filter -> teacher into shards (+ SFT) -> report.

Reads:  the config file (see `pipelines/configs/demo.yaml`); with `input.synthetic` set it first
        generates a synthetic corpus under `<output_dir>/synthetic/` and serves it from 127.0.0.1
        for the duration of the run (demo and tests).
Writes: one dataset directory per step under `output_dir` (`pipelines/graph.py` lists them and what
        each holds; `pipelines/layout.py` the files of one), the
        training shards in `<output_dir>/shards/` (and `sft_shards/`), `<output_dir>/accounting.json`
        and an HTML report in `<output_dir>/report/index.html`. Prints the accounting table: every
        input row is either kept or rejected with a reason, per step and in total.

Every step skips shards that are already finished, so re-running the same command after a crash
redoes only the unfinished work, and re-running a finished run changes no output byte.

Run:  python -m pipelines.prepare --config pipelines/configs/demo.yaml      (embedded local Ray)
      ray job submit --working-dir . -- python -m pipelines.prepare --config my.yaml
"""

from __future__ import annotations

import contextlib
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from pipelines import accounting, cli, graph, layout, preflight, raystart, report
from pipelines.config import PrepareConfig, SftInput


@contextlib.contextmanager
def synthetic_input(cfg: PrepareConfig) -> Iterator[None]:
    """Generate and serve the synthetic corpus; point `input.urls`/`input.sft` at it."""
    if cfg.input.synthetic is None:
        yield
        return
    from pipelines import synthetic

    s = cfg.input.synthetic
    # The corpus is served from local disk: under output_dir when that is local, else in a local folder
    # named after what it holds (the same corpus, hence the same URL list, on every run).
    out = cfg.out
    root = (Path(out.path) if out.local else Path(tempfile.gettempdir()) / "breen-synthetic" /
            f"n{s.n_images}-seed{s.seed}") / "synthetic"  # fmt: skip
    corpus = synthetic.make_corpus(root, n_images=s.n_images, seed=s.seed)
    sft = synthetic.make_sft_corpus(root, corpus, seed=s.seed)
    with synthetic.serve(root, port=s.port) as server:
        url_list = root / f"urls.{s.url_list_format}"
        # A fixed port (and port 1 for "connection refused") keeps the URL list, hence every
        # checksum and output, identical from run to run.
        synthetic.write_url_list(
            corpus, server.base_url, url_list, s.url_list_format, refused_url="http://127.0.0.1:1"
        )
        cfg.input.urls = [str(url_list)]
        if cfg.input.sft is None:
            cfg.input.sft = SftInput(json=str(sft), image_folder=str(root))
        print(
            f"[prepare] synthetic corpus: {len(corpus.entries)} images served at {server.base_url}",
            flush=True,
        )
        yield


def run(cfg: PrepareConfig) -> dict[str, Any]:
    t0 = time.monotonic()
    steps = preflight.steps_of(cfg)
    with synthetic_input(cfg):
        raystart.init_ray(cfg.ray.address, cfg.ray.num_cpus)
        for step in graph.STEPS:
            if step.name not in steps:
                continue
            print(f"\n[prepare] === {step.name} ===", flush=True)
            graph.runner(step)(cfg)
    acc = accounting.collect(cfg.out)
    layout.write_json_if_changed(cfg.out / "accounting.json", acc)
    html = report.write_report(cfg.out)
    accounting.print_table(acc)
    print(
        f"\n[prepare] done in {time.monotonic() - t0:.0f}s; training shards in {cfg.out / 'shards'}; report {html}"
    )
    if not accounting.all_balanced(acc):
        raise accounting.AccountingError("row accounting does not balance; see the table above")
    return acc


def main(argv: list[str] | None = None) -> int:
    return cli.step_main(__doc__, run, preflight.steps_of, argv)


if __name__ == "__main__":
    sys.exit(main())
