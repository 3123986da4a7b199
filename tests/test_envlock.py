"""breen.envlock: the lock parses, this environment matches it, and a drifted one fails the check.

The drifted environment is real: pip installs (offline, from a project this test writes) a distribution
that shadows a locked package with another version, plus one the lock does not name, into a folder put
first on PYTHONPATH of a fresh interpreter; `python -m breen.envlock check` must name both.
"""

from __future__ import annotations

import json
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest

from breen import envlock

REPO = Path(__file__).resolve().parent.parent


def run_check(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "breen.envlock", "check", *args],
        cwd=REPO, capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip


def test_the_lock_pins_every_package_once_with_hashes():
    pins = envlock.read_lock(envlock.LOCK)
    assert len(pins) > 100
    applying = [p for p in pins if p.applies()]
    names = [p.name for p in applying]
    assert len(names) == len(set(names)), "a package is pinned twice for this interpreter"
    for direct in ("torch", "transformers", "ray", "pyarrow", "deepspeed", "numpy", "uv"):
        assert direct in names, direct
    # numpy forks on the Python version: exactly one of its pins applies here
    numpy = [p for p in pins if p.name == "numpy"]
    assert sum(p.applies() for p in numpy) == 1 and all(p.marker for p in numpy), numpy
    text = envlock.LOCK.read_text()
    assert text.count("==") >= len(pins) and text.count("--hash=sha256:") >= len(pins)
    uv = envlock.entry(envlock.LOCK, "uv")
    assert uv.startswith("uv==") and "--hash=sha256:" in uv and "# via" not in uv
    gpu = {p.name for p in envlock.read_lock(envlock.GPU_LOCK)}
    assert "flash-attn" in gpu


def test_the_installed_environment_matches_the_lock():
    import ray  # noqa: F401 (puts its vendored ray/thirdparty_files on sys.path: not the environment's)

    assert any(p.endswith("thirdparty_files") for p in sys.path)
    assert envlock.differences() == []
    done = run_check()
    assert done.returncode == 0, done.stderr
    n = sum(p.applies() for p in envlock.read_lock(envlock.LOCK))
    assert f"environment matches requirements.lock ({n} packages" in done.stdout


def write_project(root: Path, name: str, version: str) -> Path:
    root.mkdir(parents=True)
    (root / "pyproject.toml").write_text(
        '[build-system]\nrequires = ["setuptools"]\nbuild-backend = "setuptools.build_meta"\n'
        f'[project]\nname = "{name}"\nversion = "{version}"\n[tool.setuptools]\npy-modules = []\n'
    )
    return root


def test_a_drifted_environment_fails_the_check(tmp_path):
    locked = metadata.version("PyYAML")
    target = tmp_path / "site"
    for name, version in (("PyYAML", "0.0.1"), ("breen-drift-probe", "1.0")):
        project = write_project(tmp_path / name, name, version)
        subprocess.run(
            [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--no-build-isolation",
             "--target", str(target), str(project)],
            check=True, capture_output=True, timeout=300,
        )  # fmt: skip
    lock = tmp_path / "requirements.lock"
    lock.write_text(
        envlock.LOCK.read_text() + "zzz-never-installed==1.0 \\\n    --hash=sha256:" + "0" * 64 + "\n"
    )

    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"}
    done = run_check("--lock", str(lock), env=env)
    assert done.returncode == 1, done.stdout + done.stderr
    assert f"wrong version: pyyaml 0.0.1 installed, {locked} locked" in done.stderr
    assert "not in the lock: breen-drift-probe==1.0" in done.stderr
    assert "missing: zzz-never-installed==1.0" in done.stderr
    assert "rm -rf .venv && make install" in done.stderr
    # --allow-extra (a container on a base image) still refuses the wrong and the missing version
    done = run_check("--lock", str(lock), "--allow-extra", env=env)
    assert done.returncode == 1 and "breen-drift-probe" not in done.stderr
    assert "pyyaml 0.0.1" in done.stderr and "zzz-never-installed" in done.stderr
    # the same interpreter without the shadowing folder matches the real lock again
    assert run_check(env={"PATH": "/usr/bin:/bin"}).returncode == 0


def test_a_venv_from_another_lock_is_stale(tmp_path):
    venv = tmp_path / "venv"
    assert envlock.is_stale(venv)  # nothing there
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").touch()
    assert envlock.is_stale(venv)  # no record of a lock
    envlock.write_stamp([envlock.LOCK], prefix=venv)
    assert not envlock.is_stale(venv)
    record = json.loads(envlock.stamp_path(venv).read_text())
    record["requirements.lock"] = "0" * 64  # installed from an older lock
    envlock.stamp_path(venv).write_text(json.dumps(record))
    assert envlock.is_stale(venv)
    done = subprocess.run([sys.executable, "-m", "breen.envlock", "stale", "--venv", str(venv)], cwd=REPO,
                          capture_output=True, timeout=60)  # fmt: skip
    assert done.returncode == 0  # exit 0: make install re-creates it


def test_environment_records_the_lock_next_to_the_versions():
    env = envlock.environment()
    assert env["lock_sha256"] == envlock.sha256(envlock.LOCK)  # make install stamped this very lock
    assert env["transformers"] == metadata.version("transformers")
    assert env["python"] == ".".join(map(str, sys.version_info[:3]))


def test_a_malformed_lock_line_names_its_file_and_line(tmp_path):
    bad = tmp_path / "bad.lock"
    bad.write_text("torch==2.15.0 \\\n    --hash=sha256:00\nnot a pin\n")
    with pytest.raises(ValueError, match=r"bad\.lock:3: not a 'name==version' lock line"):
        envlock.read_lock(bad)
