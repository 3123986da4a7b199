"""Verify prepared datasets: every file against the size and sha256 its shard's stats recorded.

Reads:  a pipeline `output_dir` (every dataset folder in it that `pipelines.graph` names) or one dataset
        folder, on local disk or an object store.
Checks, per finished shard: each of its files (kept and rejected rows) exists, has the recorded size and
        sha256 (the whole file is read), and carries the dataset's fingerprint; the shard's rows balance
        (rows_in == kept + rejected); per dataset: `fingerprint.json` and `manifest.json` name the same
        fingerprint.
Writes: nothing, unless `--repair`: then the completion markers of damaged shards are removed, so the
        next run of the same command (`pipelines.prepare`, or the step) redoes exactly those shards, and the
        shards made from them downstream (their stats record the sha256 of what they read).
Prints one line per problem and a summary; exit code 0 when everything is intact, 1 otherwise.

Run:  python -m pipelines.verify runs/demo            # every dataset of a run
      python -m pipelines.verify runs/demo/shards --repair
      python -m pipelines.verify s3://bucket/prep     # endpoint from AWS_ENDPOINT_URL for S3-compatible stores
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

import pyarrow.parquet as pq

from breen.storage import Store
from pipelines import fingerprint, graph, layout


@dataclass
class Report:
    files: int = 0
    bytes: int = 0
    problems: list[str] = field(default_factory=list)
    damaged: dict[str, list[str]] = field(default_factory=dict)  # dataset -> shards


def _check_file(path: Store, entry: dict, fp: str) -> str | None:
    try:
        size = path.fs.get_file_info(path.path).size
        if size is None:
            return "missing"
        if size != entry["bytes"]:
            return f"{size} bytes, its stats say {entry['bytes']}"
        if layout.sha256_file(path) != entry["sha256"]:
            return "sha256 differs from its stats (the content changed)"
        with path.fs.open_input_file(path.path) as f:
            meta = pq.read_metadata(f).metadata or {}
    except OSError as e:
        return f"cannot be read ({type(e).__name__}: {e})"
    made = meta.get(fingerprint.META_KEY.encode(), b"").decode()
    if made != fp:
        return f"carries fingerprint {made[:12] or 'none'}, the dataset's is {fp[:12]}"
    return None


def verify_dataset(dataset: Store, report: Report) -> None:
    record = fingerprint.recorded(dataset)
    if record is None:
        report.problems.append(f"{dataset}: no {fingerprint.SPEC_FILE}")
        return
    fp = record["fingerprint"]
    manifest = dataset / "manifest.json"
    if not manifest.exists() or manifest.read_json().get("fingerprint") != fp:
        report.problems.append(f"{dataset}: not complete (no manifest for its fingerprint {fp[:12]})")
    names = layout.finished_shards(dataset)
    for name, stats in zip(names, layout.read_stats_many(dataset.parent, [(dataset.name, n) for n in names]),
                           strict=True):  # fmt: skip
        bad = []
        if stats is None:
            bad.append(f"{dataset / name}.stats.json: missing or unreadable")
        else:
            if stats.get("fingerprint") != fp:
                bad.append(f"{dataset / name}: stats carry fingerprint {str(stats.get('fingerprint'))[:12]}")
            if stats["rows_in"] != stats["kept"] + sum(stats["rejected"].values()):
                bad.append(f"{dataset / name}: rows do not balance ({stats['rows_in']} in, {stats['kept']} kept, "
                           f"{sum(stats['rejected'].values())} rejected)")  # fmt: skip
            if not stats.get("files"):
                bad.append(f"{dataset / name}: its stats record no file checksums (written by an older version)")
            for rel, entry in sorted(stats.get("files", {}).items()):
                report.files += 1
                report.bytes += entry["bytes"]
                why = _check_file(dataset / rel, entry, fp)
                if why:
                    bad.append(f"{dataset / rel}: {why}")
        if bad:
            report.problems += bad
            report.damaged.setdefault(str(dataset), []).append(name)


def datasets_under(root: Store) -> list[Store]:
    """`root` itself when it is a dataset, else the step datasets in it (in graph order)."""
    if (root / fingerprint.SPEC_FILE).exists() or layout.finished_shards(root):
        return [root]
    return [root / name for name in graph.DATASETS if (root / name).is_dir()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipelines.verify", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    parser.add_argument("path", help="a pipeline output_dir or one dataset folder (local, s3:// or gs://)")
    parser.add_argument("--repair", action="store_true",
                        help="remove the completion markers of damaged shards, so the next run redoes them")  # fmt: skip
    args = parser.parse_args(argv)
    root = Store.at(args.path, "path")
    datasets = datasets_under(root)
    if not datasets:
        print(f"error: {root}: no dataset there", file=sys.stderr)
        return 2
    report = Report()
    for dataset in datasets:
        verify_dataset(dataset, report)
    for line in report.problems:
        print(line)
    shards = sum(len(v) for v in report.damaged.values())
    print(f"[verify] {len(datasets)} dataset(s), {report.files} files, {report.bytes / 1e6:.1f} MB checked: "
          f"{len(report.problems)} problem(s), {shards} damaged shard(s)")  # fmt: skip
    if args.repair and report.damaged:
        for dataset, names in report.damaged.items():
            for name in names:
                layout.done_marker(Store.at(dataset), name).delete()
                print(f"[verify] {dataset}/{name}: marker removed; the next run of its step redoes it")
    return 1 if report.problems else 0


if __name__ == "__main__":
    sys.exit(main())
