"""Reliability under faults: node loss in the middle of a step, and a step killed at any moment.

A local two-node Ray cluster this module owns (`ray start --head` plus a second node with the custom
resource `node2`, each a `ray start --block` process in its own session with its own temp dir and
free ports, both on 127.0.0.1) runs the step CLIs exactly as on a cluster
(`python -m pipelines.<step> --config ... --set ray.address=127.0.0.1:PORT`):

1. download: the second node's processes (raylet, agents, workers) are SIGKILLed while it runs
   download tasks and after the first shard finished; the step (or, if it failed, a re-run of the
   same command) completes with kept and rejected rows identical to a clean run, zero lost, zero
   duplicated;
2. teacher: the same while the second node hosts a teacher actor; features are bit-identical;
3. crash safety: the download step's driver and the job's workers are SIGKILLed at several random
   moments; after every kill each visible `part-*.parquet` is a complete Parquet file, and the
   re-run redoes only the unfinished shards (finished ones keep their bytes and mtimes) and ends
   identical to the clean run.

Teardown kills exactly the process trees this module started (never `ray stop`, which would stop
other people's clusters too). Prints a table of rows lost/duplicated under each fault.

Run:  .venv/bin/python -m pytest tests/test_reliability_faults.py -m reliability
"""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from pipelines import layout, synthetic
from tests.badinput import HostileServer, encode, picture, wait_for
from tests.conftest import free_port
from tests.procs import alive, cmdline, process_tree

pytestmark = [
    pytest.mark.reliability,
    pytest.mark.slow,
    pytest.mark.skipif(not Path("/proc").is_dir(), reason="process trees are read from /proc (Linux only)"),
]

REPO = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).parent / "ray")
CONFIGS = REPO / "pipelines" / "configs"
RESULTS: dict[str, dict] = {}  # fault -> {rows, lost, duplicated, identical, note}: the printed table


# ----------------------------------------------------------------------------- processes


def kill_tree(root: int, sig: int = signal.SIGKILL, wait_s: float = 15) -> int:
    """Send `sig` to every process of the tree at once (as a node or pod dying would); returns how many."""
    pids = process_tree(root)
    for pid in pids:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass
    wait_for(lambda: not any(alive(p) for p in pids), wait_s)
    return len(pids)


def env() -> dict[str, str]:
    e = dict(os.environ)
    e.pop("RAY_ADDRESS", None)
    e.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", NO_ALBUMENTATIONS_UPDATE="1",
             PYTHONPATH=str(REPO), TOKENIZERS_PARALLELISM="false",
             # Notice a dead node within ~3 s instead of ~30 s.
             RAY_health_check_period_ms="1000", RAY_health_check_failure_threshold="3",
             RAY_health_check_timeout_ms="1000")  # fmt: skip
    return e


class Cluster:
    """Head (2 CPUs) + a second node (1 CPU, resource `node2`), processes this module owns."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.head: subprocess.Popen | None = None
        self.node2: subprocess.Popen | None = None
        self.node2_starts = 0

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = open(self.root / f"{name}.log", "w")  # noqa: SIM115 - lives as long as the process
        return subprocess.Popen([RAY, "start", *args, "--block", "--node-ip-address", "127.0.0.1",
                                 "--object-store-memory", str(200 * 1024**2), "--disable-usage-stats"],
                                stdout=log, stderr=subprocess.STDOUT, env=env(), cwd=REPO,
                                start_new_session=True)  # fmt: skip

    def alive_nodes(self) -> list[dict]:
        from ray._raylet import GcsClient

        infos = GcsClient(address=self.address).get_all_node_info(timeout=5).values()
        return [{"id": i.node_id.hex(), "resources": dict(i.resources_total)} for i in infos if i.state == 0]

    def _wait_nodes(self, n: int, what: str) -> None:
        def ok() -> bool:
            try:
                return len(self.alive_nodes()) == n
            except Exception:
                return False

        if not wait_for(ok, 120, every=0.5):
            raise TimeoutError(f"{what}: {self.logs()}")

    def start(self) -> Cluster:
        self.head = self._start("head", ["--head", "--port", str(self.port), "--num-cpus", "2",
                                         "--include-dashboard=false", "--ray-client-server-port", str(free_port()),
                                         "--temp-dir", str(self.root / "h")])  # fmt: skip
        self._wait_nodes(1, "head")
        return self.start_node2()

    def start_node2(self) -> Cluster:
        self.node2_starts += 1
        self.node2 = self._start(f"node2-{self.node2_starts}", [
            "--address", self.address, "--num-cpus", "1", "--resources", '{"node2": 1}',
            "--temp-dir", str(self.root / f"w{self.node2_starts}"),
        ])  # fmt: skip
        self._wait_nodes(2, "second node")
        return self

    def node2_running(self, title: str) -> bool:
        """Whether a process of the second node is executing `title` (Ray sets it as the process title)."""
        return self.node2 is not None and any(title in cmdline(p) for p in process_tree(self.node2.pid))

    def kill_node2(self) -> int:
        assert self.node2 is not None
        n = kill_tree(self.node2.pid)
        self.node2.wait(timeout=10)
        self.node2 = None
        return n

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-2000:]}" for p in sorted(self.root.glob("*.log")))

    def stop(self) -> None:
        for p in (self.node2, self.head):
            if p is not None:  # a polite SIGTERM, then SIGKILL for whatever is left of the tree
                kill_tree(p.pid, signal.SIGTERM, wait_s=3)
                kill_tree(p.pid, signal.SIGKILL)
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    pass


@pytest.fixture(scope="module")
def cluster():
    # Short root: Ray's Unix socket paths (session dir + sockets/...) must stay under 108 bytes.
    root = Path(tempfile.mkdtemp(prefix="brr-", dir="/tmp"))
    c = Cluster(root)
    try:
        yield c.start()
    finally:
        c.stop()
        shutil.rmtree(root, ignore_errors=True)
        print_results()


_PRINTED: list[int] = [0]  # how many results the last printed table had


def print_results() -> None:
    """Print the table (uncaptured), unless it was already printed with these very results."""
    if not RESULTS or _PRINTED[0] == len(RESULTS):
        return
    _PRINTED[0] = len(RESULTS)
    lines = ["", "== reliability: faults (rows lost / duplicated vs a clean run) ==",
             f"{'fault':<44} {'rows':>5} {'lost':>5} {'dup':>4}  {'same result':<11} note"]  # fmt: skip
    for name, r in RESULTS.items():
        lines.append(f"{name:<44} {r['rows']:>5} {r['lost']:>5} {r['duplicated']:>4}  "
                     f"{'yes' if r['identical'] else 'NO':<11} {r['note']}")  # fmt: skip
    sys.__stdout__.write("\n".join(lines) + "\n")
    sys.__stdout__.flush()


# ----------------------------------------------------------------------------- running steps


class Step:
    """One step CLI run against the cluster, as a process group of its own."""

    def __init__(self, cluster: Cluster, step: str, cfg: Path, log: Path) -> None:
        self.log = log
        self.proc = subprocess.Popen(
            [sys.executable, "-m", f"pipelines.{step}", "--config", str(cfg), "--set", f"ray.address={cluster.address}"],
            stdout=open(log, "a"), stderr=subprocess.STDOUT, env=env(), cwd=REPO, start_new_session=True,  # noqa: SIM115
        )  # fmt: skip

    def wait(self, timeout: float = 300) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            kill_tree(self.proc.pid)
            raise

    def output(self) -> str:
        return self.log.read_text()[-6000:]


def run_step(cluster: Cluster, step: str, cfg: Path, log: Path, timeout: float = 300) -> None:
    s = Step(cluster, step, cfg, log)
    assert s.wait(timeout) == 0, s.output()


def dataset_rows(dataset: Path, drop: tuple[str, ...] = ()) -> tuple[list[dict], list[dict]]:
    """(kept rows, rejected rows) of the finished shards, each sorted by key."""
    kept, rejected = [], []
    for name in layout.finished_shards(dataset):
        kept += pq.read_table(dataset / f"{name}.parquet").drop_columns(list(drop)).to_pylist()
        rejected += pq.read_table(dataset / layout.REJECTED / f"{name}.parquet").to_pylist()
    return sorted(kept, key=lambda r: r["key"]), sorted(rejected, key=lambda r: r["key"])


def compare(
    name: str, clean: Path, faulted: Path, rows_in: int, note: str, drop: tuple[str, ...] = ()
) -> None:
    """Record and assert: same kept rows (every column), same rejected rows, none lost or duplicated."""
    ck, cr = dataset_rows(clean, drop)
    fk, fr = dataset_rows(faulted, drop)
    seen = Counter(r["key"] for r in fk + fr)
    duplicated = sum(n - 1 for n in seen.values() if n > 1)
    lost = rows_in - len(seen)
    identical = ck == fk and cr == fr
    RESULTS[name] = {
        "rows": rows_in,
        "lost": lost,
        "duplicated": duplicated,
        "identical": identical,
        "note": note,
    }
    assert len(ck) + len(cr) == rows_in
    assert (lost, duplicated) == (0, 0), RESULTS[name]
    assert [r["key"] for r in fk] == [r["key"] for r in ck]
    assert [(r["key"], r["reason"]) for r in fr] == [(r["key"], r["reason"]) for r in cr]
    assert identical, f"{name}: same keys and reasons but different values"
    for s in layout.read_stats(faulted):
        assert s["rows_in"] == s["kept"] + sum(s["rejected"].values()), s


def visible_shards_are_complete(dataset: Path) -> list[str]:
    """Problems: a visible `part-*.parquet` that is not a complete Parquet file, a marker without files."""
    problems = []
    for f in [*dataset.glob("part-*.parquet"), *dataset.glob(f"{layout.REJECTED}/part-*.parquet")]:
        try:
            pq.read_table(f)
        except Exception as e:
            problems.append(f"{f}: {layout.error_detail(e)}")
    for name in layout.finished_shards(dataset):
        for f in (dataset / f"{name}.parquet", dataset / layout.REJECTED / f"{name}.parquet",
                  layout.stats_path(dataset, name)):  # fmt: skip
            if not f.exists():
                problems.append(f"{name}: marker without {f.name}")
    return problems


def snapshot(dataset: Path) -> dict[str, tuple[int, bytes]]:
    """mtime and bytes of every file of the finished shards."""
    out = {}
    for name in layout.finished_shards(dataset):
        for f in (dataset / f"{name}.parquet", dataset / layout.REJECTED / f"{name}.parquet",
                  layout.stats_path(dataset, name), layout.done_marker(dataset, name)):  # fmt: skip
            f = Path(str(f))  # a local dataset: the markers' Store is a plain path here
            out[str(f)] = (f.stat().st_mtime_ns, f.read_bytes())
    return out


# ----------------------------------------------------------------------------- inputs


N_URLS, ROWS_PER_SHARD = 60, 4


@pytest.fixture(scope="module")
def site():
    """A slow-ish server (0.25 s per image) so that a download step lasts long enough to be hit."""
    with HostileServer() as server:
        server.set_slow(0.25)
        rows = []
        for i in range(N_URLS):
            if i % 10 == 3:
                url = server.url("status/404")
            elif i % 10 == 7:
                url = server.url("slow/corrupt")
            elif i % 15 == 11:
                url = "http://10.0.0.1/x.jpg"  # refused at vetting, never contacted
            else:
                server.add(f"img{i}.jpg", encode(picture(i, 320 + 8 * (i % 5), 240), "JPEG", quality=90))
                url = server.url(f"slow/img{i}.jpg")
            rows.append({"url": url, "caption": f"A test picture number {i} of a quiet street", "n": str(i)})
        server.add("corrupt", b"\xff\xd8\xff\xe0 not a jpeg", "image/jpeg")
        yield server, rows


def download_config(root: Path, urls: Path, out: Path) -> Path:
    cfg = root / f"{out.name}.yaml"
    cfg.write_text(f"""
output_dir: {out}
input: {{urls: [{urls}]}}
# One download task per CPU: 3 worker processes per run (each spends ~4 s of CPU importing img2dataset).
download: {{rows_per_shard: {ROWS_PER_SHARD}, threads_per_shard: 2, timeout_s: 5, allow_private: ["127.0.0.1"],
            cpus_per_shard: 1, max_shard_retries: 3}}
teacher: {{model_config: {CONFIGS / "tiny-vit.json"}, random_init_seed: 0, batch_size: 8, num_actors: 3,
           cpus_per_actor: 0.8}}  # 2 actors fit on the head: the third must live on the second node
shards: {{rows_per_file: {T_ROWS}}}  # one training shard per teacher-input shard
""")
    return cfg


@pytest.fixture(scope="module")
def url_list(tmp_path_factory, site):
    import pyarrow as pa

    root = tmp_path_factory.mktemp("faults")
    path = root / "urls.parquet"
    pq.write_table(pa.Table.from_pylist(site[1]), path)
    return root, path


@pytest.fixture(scope="module")
def clean_download(cluster, url_list):
    root, urls = url_list
    out = root / "clean"
    run_step(cluster, "download", download_config(root, urls, out), root / "clean-download.log")
    return out / "download"


# ----------------------------------------------------------------------------- tests


def kill_node2_during(cluster, step_name: str, cfg: Path, dataset: Path, on_node2: str, shards: int,
                      log: Path, timeout_s: float) -> tuple[int, str]:
    """Run `step_name` as a job, SIGKILL the second node once it runs `on_node2` (a task or actor name)
    and a shard of `dataset` is finished, then let the job end; a failed job is re-run to completion (the
    acceptable outcome). Returns (shards finished at the kill, note for the fault table)."""
    if cluster.node2 is None:
        cluster.start_node2()
    step = Step(cluster, step_name, cfg, log)
    hit = wait_for(lambda: layout.finished_shards(dataset) and cluster.node2_running(on_node2), timeout_s, every=0.02)
    done_at_kill = len(layout.finished_shards(dataset))
    assert hit, f"the second node never ran {on_node2}\n{step.output()}"
    killed = cluster.kill_node2()
    note = f"killed {killed} node-2 processes with {done_at_kill}/{shards} shards done"
    if step.wait() != 0:  # acceptable: the job failed, a re-run of the same command must complete
        note += "; job failed, re-run completed"
        run_step(cluster, step_name, cfg, log.with_name(f"{log.stem}-rerun.log"))
    else:
        note += "; job completed"
    assert done_at_kill < shards, "the kill came after the step had finished"
    return done_at_kill, note


def test_node_lost_during_download(cluster, url_list, clean_download):
    root, urls = url_list
    out = root / "node-loss"
    _, note = kill_node2_during(cluster, "download", download_config(root, urls, out), out / "download",
                                "download_one_shard", N_URLS // ROWS_PER_SHARD, root / "node-loss.log", 120)  # fmt: skip
    compare("node killed mid-download", clean_download, out / "download", N_URLS, note)
    assert not visible_shards_are_complete(out / "download")


T_SHARDS, T_ROWS = 12, 32  # teacher input: 3 actors take ~1.5 s per shard once started


@pytest.fixture(scope="module")
def teacher_input(url_list):
    """The datasets the teacher step reads (T_SHARDS shards x T_ROWS images, 1 in 200 undecodable): the
    images in download/, the captions in captions/, the kept keys in filter/."""
    root, _ = url_list
    src = root / "teacher-input"
    rng = np.random.default_rng(0)
    shards = []
    for s in range(T_SHARDS):
        rows = []
        for i in range(T_ROWS):
            key = f"{s * T_ROWS + i:012d}"
            if (s * T_ROWS + i) % 200 == 5:
                img = b"\xff\xd8 broken"
            else:
                arr = rng.integers(0, 255, (24, 32, 3), np.uint8)
                img = encode(
                    Image.fromarray(arr).resize((320, 240), Image.Resampling.BILINEAR), "JPEG", quality=85
                )
            rows.append((key, f"caption {key}", img))
        shards.append(rows)
    synthetic.write_teacher_inputs(src, shards)
    return src, T_SHARDS * T_ROWS


def _teacher_dir(root: Path, name: str, src: Path) -> Path:
    out = root / name
    shutil.copytree(src, out)
    return out


def test_node_lost_during_teacher(cluster, url_list, teacher_input):
    root, urls = url_list
    src, rows_in = teacher_input
    clean = _teacher_dir(root, "teacher-clean", src)
    if cluster.node2 is None:
        cluster.start_node2()
    run_step(cluster, "teacher", download_config(root, urls, clean), root / "teacher-clean.log")

    out = _teacher_dir(root, "teacher-node-loss", src)
    _, note = kill_node2_during(cluster, "teacher", download_config(root, urls, out), out / "shards",
                                "TeacherWorker", T_SHARDS, root / "teacher-node-loss.log", 180)  # fmt: skip
    compare("node killed mid-teacher", clean / "shards", out / "shards", rows_in, note)
    for name in layout.finished_shards(out / "shards"):  # same teacher identity in every file
        a = pq.read_schema(clean / "shards" / f"{name}.parquet").metadata
        b = pq.read_schema(out / "shards" / f"{name}.parquet").metadata
        assert a == b


def test_step_killed_at_random_moments_is_crash_safe(cluster, url_list, clean_download):
    """SIGKILL the download step (driver and the job's workers) at random moments; nothing half-written
    is ever visible; each re-run redoes only unfinished shards; the end result equals a clean run."""
    root, urls = url_list
    out = root / "crash"
    cfg = download_config(root, urls, out)
    dataset = out / "download"
    rng = random.Random(7)
    kills = []
    for attempt in range(3):
        before = snapshot(dataset)
        step = Step(cluster, "download", cfg, root / f"crash-{attempt}.log")
        # First kill while starting up or on the first shards, later ones deeper into the run.
        started = time.monotonic()
        if attempt == 0:  # during start-up (Ray connection, input shards, first tasks)
            time.sleep(rng.uniform(1.0, 4.0))
        else:  # right after a shard finished, or a little later
            done0 = len(before) // 4
            wait_for(lambda d=done0: len(layout.finished_shards(dataset)) > d, 60, every=0.02)
            time.sleep(rng.uniform(0.0, 1.0))
        workers = [p for p in _job_workers(cluster) if "download_one_shard" in cmdline(p)]
        kill_tree(step.proc.pid)
        for p in workers:  # the step's tasks die with it, mid-write if they were writing
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        step.proc.wait(timeout=30)
        kills.append(f"{time.monotonic() - started:.1f}s")
        problems = visible_shards_are_complete(dataset)
        assert not problems, problems
        after = snapshot(dataset)
        rewritten = [f for f in before if after.get(f) != before[f]]
        assert not rewritten, f"finished shards were redone: {rewritten[:3]}"
        if len(layout.finished_shards(dataset)) == N_URLS // ROWS_PER_SHARD:
            break
    before = snapshot(dataset)
    run_step(cluster, "download", cfg, root / "crash-final.log")
    after = snapshot(dataset)
    redone = [f for f in before if after.get(f) != before[f]]
    assert not redone, f"finished shards were redone: {redone[:3]}"
    done_before = len([f for f in before if f.endswith(".done")])
    note = f"{len(kills)} kills at {', '.join(kills)} after start; {done_before} shards kept, rest redone"
    compare("step killed at random moments (x3)", clean_download, dataset, N_URLS, note)


def _job_workers(cluster: Cluster) -> list[int]:
    assert cluster.head is not None
    pids = process_tree(cluster.head.pid)
    if cluster.node2 is not None:
        pids |= process_tree(cluster.node2.pid)
    return sorted(pids)


def test_fault_table_counts_lost_duplicated_and_changed_rows(tmp_path, monkeypatch):
    """The comparison every fault test ends with (`compare`: its row of the printed table, then the goals:
    zero lost, zero duplicated, identical to the clean run) fails on each kind of damage. No cluster: the
    datasets are written here, so it passes alone (each fault test asserts its own goals)."""
    import pyarrow as pa

    from pipelines import fingerprint

    monkeypatch.setattr(sys.modules[__name__], "RESULTS", {})  # these rows stay out of the printed table

    def dataset(name: str, kept: dict[str, str], rejected: tuple[str, ...] = ("r9",)) -> Path:
        d = tmp_path / name
        fingerprint.record(d, {"step": name})
        bad = layout.with_reason(
            pa.table({"key": list(rejected), "v": ["x"] * len(rejected)}), "download_error"
        )
        layout.write_shard(d, layout.shard_name(0), pa.table({"key": list(kept), "v": list(kept.values())}), bad,
                           len(kept) + len(rejected))  # fmt: skip
        return d

    rows = {f"r{i}": f"v{i}" for i in range(4)}
    clean = dataset("clean", rows)
    compare("same", clean, dataset("same", rows), 5, "no fault")
    assert RESULTS["same"] == {"rows": 5, "lost": 0, "duplicated": 0, "identical": True, "note": "no fault"}
    damaged = {
        "lost": ({k: v for k, v in rows.items() if k != "r3"}, ("r9",)),
        "duplicated": (rows, ("r9", "r0")),
        "changed": ({**rows, "r1": "other"}, ("r9",)),
    }
    for name, (kept, rejected) in damaged.items():
        with pytest.raises(AssertionError):
            compare(name, clean, dataset(name, kept, rejected), 5, name)
    assert {n: (r["lost"], r["duplicated"], r["identical"]) for n, r in RESULTS.items() if n != "same"} == {
        "lost": (1, 0, False),
        "duplicated": (0, 1, False),
        "changed": (0, 0, False),
    }
