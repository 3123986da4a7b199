"""Fingerprints: what a dataset was made from, so a step reuses finished work only when it would produce
the same output, and no dataset mixes two runs.

A step's *spec* is everything its output depends on:

    step     the step's name
    inputs   for an external input its checksum (URL lists, SFT JSON: sha256; an image folder: a checksum
             of its listing, names and sizes); for an upstream dataset that dataset's fingerprint
    config   the resolved config sections that affect the output (`pipelines.config.output_fields`:
             resource settings such as actor counts and batch sizes are left out)
    code     a digest per source file of the step's module and every project module it imports, of the
             parsed code without docstrings and comments (editing prose invalidates nothing)
    lock     the sha256 of `requirements.lock`

and its *fingerprint* the sha256 of the spec as canonical JSON. A dataset folder records both in
`fingerprint.json`; its `manifest.json`, every shard's stats and every Parquet file's metadata
(`breen.fingerprint`) carry the fingerprint.

`Output` (entered by every step before it writes anything):
1. takes the dataset's lease (`breen.lease`: a second run on the same dataset fails at once, or waits up
   to `wait_s`), and checks that no run holds the lease of a dataset the step reads;
2. compares the spec with the recorded one. The same: finished shards are reused. Another: the step
   refuses, listing each difference (`config.filter.min_short_side: 200 -> 400`, `inputs.filter: the
   upstream dataset changed`, `code: pipelines/filter.py changed`), unless `redo` is set (`--redo`),
   which empties the folder and recomputes it;
3. checks every finished shard against the upstream files it was made from (each shard's stats record
   their sha256): a shard whose inputs were redone since is redone too, and a shard made with another
   fingerprint is refused (one dataset never mixes fingerprints).

A downstream step takes an upstream dataset's fingerprint only when that dataset is complete: its
`manifest.json` (written when its step finished) names the same fingerprint as its `fingerprint.json`.
"""

from __future__ import annotations

import ast
import hashlib
import json
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

from breen import envlock, lease
from breen.storage import Location, Store

SPEC_FILE = "fingerprint.json"
META_KEY = "breen.fingerprint"  # Parquet key-value metadata of every file a step writes
PACKAGES = ("breen", "pipelines")  # project code that can change what a step writes
ROOT = Path(__file__).resolve().parent.parent


class FingerprintMismatch(RuntimeError):
    """A dataset folder holds the output of another spec (config, input, code or environment)."""


class IncompleteUpstream(RuntimeError):
    """An upstream dataset is missing, unfinished or being written by another run."""


def digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()).hexdigest()


# ----------------------------------------------------------------------------- code


def _module_file(name: str) -> Path | None:
    base = ROOT / Path(*name.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _without_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):  # fmt: skip
                node.body = body[1:] or [ast.Pass()]
    return tree


def _module_level(tree: ast.Module) -> list[ast.stmt]:
    """The module's own statements, with those nested in `if`/`try` blocks, but none inside a function or
    class (a command-line helper's lazy imports are not what the step computes with)."""
    out, todo = [], list(tree.body)
    while todo:
        node = todo.pop()
        out.append(node)
        if isinstance(node, ast.If | ast.Try):
            todo += [*node.body, *node.orelse, *getattr(node, "finalbody", []),
                     *(s for h in getattr(node, "handlers", []) for s in h.body)]  # fmt: skip
    return out


@cache
def code_digest(module: str) -> dict[str, str]:
    """{source file: digest} of `module` and every project module (`PACKAGES`) it imports at module level,
    transitively. Imports inside functions are not followed: project code a step computes with is imported
    at the top of its module (`tests/test_fingerprint.py` checks that each step's own helpers are in)."""
    out: dict[str, str] = {}
    todo, seen = [module], set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        path = _module_file(name)
        if path is None:
            continue
        tree = ast.parse(path.read_text(), str(path))
        for node in _module_level(tree):
            if isinstance(node, ast.Import):
                todo += [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                todo += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        todo = [t for t in todo if t.split(".")[0] in PACKAGES]
        code = ast.dump(_without_docstrings(tree))
        out[path.relative_to(ROOT).as_posix()] = hashlib.sha256(code.encode()).hexdigest()[:16]
    return dict(sorted(out.items()))


# ----------------------------------------------------------------------------- specs


def spec(step: str, inputs: dict[str, Any], config: dict[str, Any], module: str) -> dict[str, Any]:
    """The spec of `step` (see the module docstring); `module` is the module that runs it."""
    return {"step": step, "inputs": inputs, "config": config, "code": code_digest(module),
            "lock": envlock.lock_sha256()}  # fmt: skip


def of(spec_: dict[str, Any]) -> str:
    return digest(spec_)


def folder_digest(folder: Store) -> dict[str, Any]:
    """An input folder (the SFT images) by its listing: file names and sizes (not times: a copy of the same
    folder is the same input)."""
    listing = sorted(folder.sizes().items())
    return {"path": str(folder), "files": len(listing), "listing_sha256": digest(listing)}


def differences(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """One line per changed leaf of two specs, e.g. ``config.filter.min_short_side: 200 -> 400``."""
    lines = []
    for key in sorted(set(old) | set(new)):
        where = f"{prefix}{key}"
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if a == b:
            continue
        if where == "code":
            changed = sorted(f for f in set(a) | set(b) if a.get(f) != b.get(f))
            lines.append(f"code: {', '.join(changed)} changed")
        elif isinstance(a, dict) and isinstance(b, dict):
            lines += differences(a, b, where + ".")
        elif prefix == "inputs." and isinstance(a, str) and isinstance(b, str):
            lines.append(f"{where}: the upstream dataset changed (fingerprint {a[:12]} -> {b[:12]})")
        else:
            lines.append(f"{where}: {json.dumps(a, default=str)} -> {json.dumps(b, default=str)}")
    return lines


# ----------------------------------------------------------------------------- upstream datasets


def recorded(dataset: Location) -> dict[str, Any] | None:
    """The dataset's `fingerprint.json` ({"fingerprint", "spec"}), or None."""
    path = Store.at(dataset) / SPEC_FILE
    return path.read_json() if path.exists() else None


def upstream(dataset: Location, produced_by: str) -> str:
    """The fingerprint of a complete upstream dataset; `IncompleteUpstream` naming why not."""
    dataset = Store.at(dataset)
    who = lease.holder(dataset)
    if who is not None:
        raise IncompleteUpstream(f"{dataset} is being written by another run ({who}); wait for it to finish")
    record = recorded(dataset)
    manifest = dataset / "manifest.json"
    done = manifest.read_json().get("fingerprint") if manifest.exists() else None
    if record is None or done != record["fingerprint"]:
        raise IncompleteUpstream(f"{dataset} is not complete (no manifest for its fingerprint): run the "
                                 f"`{produced_by}` step to its end first")  # fmt: skip
    return record["fingerprint"]


# ----------------------------------------------------------------------------- the output of a step


@dataclass
class Output:
    """A step's dataset folder while the step writes it: held lease, settled fingerprint."""

    dataset: Store
    spec: dict[str, Any]
    fingerprint: str
    lease: lease.Lease

    def check(self) -> None:
        """Raise if the lease was lost (call before each phase and before the manifest)."""
        self.lease.check()

    def close(self) -> None:
        self.lease.release()

    def __enter__(self) -> Output:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_output(dataset: Location, spec_: dict[str, Any], *, redo: bool = False, wait_s: float = 0.0,
                reads: tuple[Location, ...] = ()) -> Output:  # fmt: skip
    """Take `dataset`'s lease and settle its fingerprint (the module docstring's steps 1-2); `reads` are
    the upstream datasets, checked for other runs' leases."""
    dataset = Store.at(dataset)
    held = lease.acquire(dataset, wait_s=wait_s)
    try:
        for up in reads:
            who = lease.holder(up)
            if who is not None:
                raise IncompleteUpstream(f"{up} (read by {spec_['step']}) is being written by another run: {who}")
        fp = of(spec_)
        _settle(dataset, spec_, fp, redo)
    except BaseException:
        held.release()
        raise
    return Output(dataset, spec_, fp, held)


def _settle(dataset: Store, spec_: dict[str, Any], fp: str, redo: bool) -> None:
    step = spec_["step"]
    old = recorded(dataset)
    if old is not None and old["fingerprint"] == fp:
        return
    markers = dataset.files(".done")
    if old is None and not markers:  # a fresh folder (or one with nothing finished yet)
        _record(dataset, spec_, fp)
        return
    what = (differences(old["spec"], spec_) if old is not None else
            [f"{len(markers)} finished shard(s) but no {SPEC_FILE} (made by an older version, or copied)"])  # fmt: skip
    if not redo:
        raise FingerprintMismatch(
            f"{dataset} holds the output of another {step} run; what differs:\n  " + "\n  ".join(what)
            + f"\nRerun with --redo to recompute {step} (and what follows), or use another output_dir"
        )
    print(f"[{step}] --redo: {dataset} was made from another spec ({'; '.join(what)}); recomputing it",
          flush=True)  # fmt: skip
    clear(dataset, keep_spec=False)
    _record(dataset, spec_, fp)


def clear(dataset: Location, keep_spec: bool = True) -> None:
    """Remove every file of the dataset but its lease (and its `fingerprint.json`, with `keep_spec`)."""
    keep = {lease.LEASE_FILE, *([SPEC_FILE] if keep_spec else [])}
    dataset = Store.at(dataset)
    for f in dataset.files():
        if f.relative_to_dir(dataset) not in keep:
            f.delete()


def _record(dataset: Store, spec_: dict[str, Any], fp: str) -> None:
    (dataset / SPEC_FILE).write_json({"fingerprint": fp, "spec": spec_})


def record(dataset: Location, spec_: dict[str, Any]) -> str:
    """Record `spec_` as the dataset's own without any check (fixtures that write datasets directly)."""
    fp = of(spec_)
    _record(Store.at(dataset), spec_, fp)
    return fp


def stale_shards(dataset: Location, fp: str, names: list[str]) -> list[str]:
    """The finished shards among `names` to redo because an upstream file they were made from changed
    since (a shard's stats record the sha256 of each file it read); `FingerprintMismatch` for a shard made
    with another fingerprint."""
    from pipelines import layout

    dataset = Store.at(dataset)
    root = dataset.parent
    finished = [n for n in names if n in set(layout.finished_shards(dataset))]
    stats = dict(zip(finished, layout.read_stats(dataset, finished), strict=True))
    alien = [n for n, s in stats.items() if s.get("fingerprint") != fp]
    if alien:
        raise FingerprintMismatch(
            f"{dataset}: {len(alien)} finished shard(s) ({alien[0]} first) were made with fingerprint "
            f"{stats[alien[0]].get('fingerprint')!s:.12}, not this dataset's {fp:.12}: the folder mixes runs; "
            "rerun with --redo"
        )
    wanted = sorted({f for s in stats.values() for f in s.get("inputs", {})})
    by_shard: dict[tuple[str, str], list[str]] = {}
    for rel in wanted:  # "download/part-00001.parquet" -> the download dataset's stats of part-00001
        up, _, file = rel.rpartition("/")
        by_shard.setdefault((up, file.split(".")[0]), []).append(rel)
    current: dict[str, str | None] = {}
    keys = sorted(by_shard)
    for (up, shard), got in zip(keys, layout.read_stats_many(root, keys), strict=True):
        for rel in by_shard[(up, shard)]:
            entry = (got or {}).get("files", {}).get(rel[len(up) + 1 :]) or {}
            current[rel] = entry.get("sha256")
    return [n for n, s in stats.items() if any(current.get(f) != h for f, h in s.get("inputs", {}).items())]
