"""Data preparation end to end: download -> captions -> filter -> teacher into shards (+ SFT) -> report.

Reads:  the config file (see `pipelines/configs/demo.yaml`); with `input.synthetic` set it first
        generates a synthetic corpus under `<output_dir>/synthetic/` and serves it from 127.0.0.1
        for the duration of the run (demo and tests).
Writes: one dataset directory per step under `output_dir` (`pipelines/graph.py` lists them and what
        each holds; `pipelines/common.py` the files of one), the
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

from pipelines import common, graph, preflight, report
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


def accounting(cfg: PrepareConfig) -> dict[str, Any]:
    """Per-step counts from the manifests and, per chain (`graph.accounting`), input = kept + all rejected."""
    steps = {}
    for name in graph.DATASETS:
        m = cfg.out / name / "manifest.json"
        if m.exists():
            steps[name] = m.read_json()["counts"]
    return {"steps": steps, **graph.accounting(steps)}


def print_table(acc: dict[str, Any]) -> None:
    print("\n== accounting: rows in = kept + rejected ==")
    print(f"{'step':<12} {'in':>8} {'kept':>8} {'rejected':>9}  reasons")
    for name, c in acc["steps"].items():
        reasons = ", ".join(f"{r}={n}" for r, n in c["rejected"].items()) or "-"
        ok = "ok" if c["rows_in"] == c["kept"] + c["rejected_total"] else "MISMATCH"
        print(f"{name:<12} {c['rows_in']:>8} {c['kept']:>8} {c['rejected_total']:>9}  {reasons}  [{ok}]")
    for chain, what in (("pretrain", "input URLs"), ("sft", "SFT records")):
        if chain in acc:
            p = acc[chain]
            print(f"total: {p['input_rows']} {what} = {p['kept']} training rows + {p['rejected']} rejected "
                  f"[{'ok' if p['balanced'] else 'MISMATCH'}]")  # fmt: skip


def run(cfg: PrepareConfig) -> dict[str, Any]:
    t0 = time.monotonic()
    steps = preflight.steps_of(cfg)
    with synthetic_input(cfg):
        common.init_ray(cfg.ray.address, cfg.ray.num_cpus)
        for step in graph.STEPS:
            if step.name not in steps:
                continue
            print(f"\n[prepare] === {step.name} ===", flush=True)
            graph.runner(step)(cfg)
    acc = accounting(cfg)
    common.write_json_if_changed(cfg.out / "accounting.json", acc)
    html = report.write_report(cfg.out)
    print_table(acc)
    print(
        f"\n[prepare] done in {time.monotonic() - t0:.0f}s; training shards in {cfg.out / 'shards'}; report {html}"
    )
    balanced = all(c["rows_in"] == c["kept"] + c["rejected_total"] for c in acc["steps"].values())
    if not balanced or not all(acc[chain]["balanced"] for chain in ("pretrain", "sft") if chain in acc):
        raise common.AccountingError("row accounting does not balance; see the table above")
    return acc


def main(argv: list[str] | None = None) -> int:
    return common.step_main(__doc__, run, preflight.steps_of, argv)


if __name__ == "__main__":
    sys.exit(main())
