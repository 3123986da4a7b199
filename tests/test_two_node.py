"""A two-node Ray cluster on this machine, driven the way a real cluster is: `ray job submit`.

A Ray head (`ray start --head`, with the job server) and a second node (`ray start --address ...`,
2 CPUs and a custom resource `node2`) are started as processes this test owns, each with its own
temp dir and free ports. Then, through `ray job submit` with the repository as working dir:

1. the demo data preparation (`python -m pipelines.prepare`, 60 synthetic images): the job must exit 0,
   the training shards must exist and the row accounting must balance at every step;
2. stage 1 (`python -m jobs.train --stage stage1 --profile cpu --init-from tiny`) on those shards: the
   job must exit 0 and leave its resolved config, a checkpoint and the exported model.

Teardown stops exactly the processes the test started (the two `ray start --block` processes and all
their descendants), never `ray stop`, which would also stop other Ray clusters on the machine.

Run:  .venv/bin/python -m pytest tests/test_two_node.py -m slow
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from tests.conftest import free_port
from tests.procs import alive, process_tree

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc").is_dir(), reason="process-tree teardown reads /proc (Linux only)"),
]

REPO = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent
RAY = str(VENV_BIN / "ray")
# Uploaded with every job: the repository minus what .gitignore already drops (.venv, runs, ...).
RUNTIME_ENV = json.dumps(
    {"working_dir": ".", "excludes": [".git", ".venv", "runs", ".pytest_cache", ".ruff_cache"]}
)


def ray_env() -> dict[str, str]:
    env = dict(os.environ)
    env.pop("RAY_ADDRESS", None)
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", NO_ALBUMENTATIONS_UPDATE="1")
    # Job entrypoints say `python`: it must be this environment's interpreter on every node.
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    return env


def stop_processes(procs: list[subprocess.Popen], grace_s: float = 10.0) -> None:
    """SIGTERM every process of the trees, wait, SIGKILL what is left, reap the roots."""
    pids: set[int] = set()
    for p in procs:
        pids |= process_tree(p.pid)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            if alive(pid):
                try:
                    os.kill(pid, sig)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(alive(pid) for pid in pids):
            time.sleep(0.2)
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


def alive_nodes(dashboard: str) -> list[dict]:
    with urllib.request.urlopen(f"{dashboard}/api/v0/nodes?limit=100&detail=true", timeout=10) as r:
        nodes = json.loads(r.read())["data"]["result"]["result"]
    return [n for n in nodes if n.get("state") == "ALIVE"]


class TwoNodeCluster:
    """A head (with the job server) and a second node, both `ray start --block` processes we own."""

    def __init__(self, root: Path):
        self.root = root
        self.port, self.dashboard_port = free_port(), free_port()
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.procs: list[subprocess.Popen] = []

    def _start(self, name: str, args: list[str]) -> None:
        log = open(self.root / f"{name}.log", "w")  # noqa: SIM115 (closed with the process)
        self.procs.append(
            subprocess.Popen(
                [RAY, "start", *args, "--block"],
                stdout=log,
                stderr=subprocess.STDOUT,
                env=ray_env(),
                cwd=self.root,
                start_new_session=True,
            )
        )

    def _wait(self, what: str, ok, timeout_s: float = 120.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p in self.procs):
                raise RuntimeError(f"a ray start process exited while waiting for {what}:\n{self.logs()}")
            try:
                if ok():
                    return
            except OSError:
                pass
            time.sleep(1)
        raise TimeoutError(f"timed out waiting for {what}:\n{self.logs()}")

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.root.glob("*.log")))

    @staticmethod
    def _own_ports() -> list[str]:
        """Free ports for every per-node server whose default port is fixed (52365, 10001, ...), so another
        Ray on the machine cannot take them: a busy agent port leaves the job server with no agent."""
        return ["--dashboard-agent-listen-port", str(free_port()), "--dashboard-agent-grpc-port", str(free_port()),
                "--runtime-env-agent-port", str(free_port()), "--metrics-export-port", str(free_port())]  # fmt: skip

    def start(self) -> TwoNodeCluster:
        self._start("head", ["--head", "--port", str(self.port), "--num-cpus", "2", "--dashboard-port",
                             str(self.dashboard_port), "--ray-client-server-port", str(free_port()),
                             "--disable-usage-stats", "--temp-dir", str(self.root / "h"), *self._own_ports()])  # fmt: skip
        self._wait("the head's job server", lambda: len(alive_nodes(self.dashboard)) == 1)
        self._start("node2", ["--address", f"127.0.0.1:{self.port}", "--num-cpus", "2", "--resources",
                              '{"node2": 1}', "--temp-dir", str(self.root / "w"), *self._own_ports()])  # fmt: skip
        self._wait("the second node", lambda: len(alive_nodes(self.dashboard)) == 2)
        return self

    def submit(self, entrypoint: list[str], timeout_s: float = 900) -> str:
        """`ray job submit ... -- ENTRYPOINT` from the repository root; returns its output, asserts exit 0."""
        cmd = [
            RAY,
            "job",
            "submit",
            "--address",
            self.dashboard,
            "--runtime-env-json",
            RUNTIME_ENV,
            "--",
            *entrypoint,
        ]
        for _ in range(60):  # the head's job agent registers a little after the node is alive
            out = subprocess.run(
                cmd, cwd=REPO, env=ray_env(), capture_output=True, text=True, timeout=timeout_s
            )
            text = out.stdout + out.stderr
            if out.returncode == 0 or "No available agent to submit job" not in text:
                break
            time.sleep(2)
        assert out.returncode == 0, f"{' '.join(entrypoint)} failed (exit {out.returncode}):\n{text[-8000:]}"
        assert "succeeded" in text
        return text

    def stop(self) -> None:
        stop_processes(self.procs)


@pytest.fixture(scope="module")
def cluster():
    # Short root: Ray's Unix socket paths (session dir + sockets/...) must stay under 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="breen2n-", dir="/tmp"))
    c = TwoNodeCluster(root)
    try:
        yield c.start()
    finally:
        c.stop()


@pytest.fixture(scope="module")
def prepared(cluster):
    out = cluster.root / "out"
    log = cluster.submit(["python", "-m", "pipelines.prepare", "--config", "pipelines/configs/demo.yaml",
                          "--set", f"output_dir={out}", "--set", "input.synthetic.n_images=60",
                          "--set", f"input.synthetic.port={free_port()}"])  # fmt: skip
    return out, log


def test_cluster_has_two_nodes(cluster):
    nodes = alive_nodes(cluster.dashboard)
    assert len(nodes) == 2
    assert sum("node2" in (n.get("resources_total") or {}) for n in nodes) == 1


def test_data_preparation_job(prepared):
    out, log = prepared
    acc = json.loads((out / "accounting.json").read_text())
    assert acc["pretrain"]["balanced"], acc
    for step, counts in acc["steps"].items():
        assert counts["rows_in"] == counts["kept"] + counts["rejected_total"], step
    shards = sorted((out / "shards").glob("part-*.parquet"))
    assert shards, "no training shards"
    rows = sum(pq.read_metadata(s).num_rows for s in shards)
    assert rows == acc["steps"]["shards"]["kept"] == acc["pretrain"]["kept"] > 0
    table = pq.read_table(shards[0])
    assert {"key", "image_shard", "image_row", "caption", "fine", "coarse"} <= set(table.column_names)
    assert sorted((out / "sft_shards").glob("part-*.parquet")), "no SFT shards"
    assert "accounting" in log


def test_stage1_job(cluster, prepared):
    out, _ = prepared
    train = cluster.root / "train"
    cluster.submit(["python", "-m", "jobs.train", "--stage", "stage1", "--data", str(out / "shards"),
                    "--init-from", "tiny", "--profile", "cpu", "--output-dir", str(train),
                    "schedule.max_steps=4"])  # fmt: skip
    run = train / "stage1"
    config = json.loads((run / "train_config.json").read_text())
    assert config["stage"] == "stage1" and config["data"]["paths"] == [str(out / "shards")]
    assert sorted(run.glob("step-*")), f"no checkpoint in {run}"
    assert (run / "export" / "config.json").exists(), "stage 1 exported no model"
