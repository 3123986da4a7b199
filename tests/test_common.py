"""pipelines.raystart: the embedded Ray keeps idle workers (Ray 2.60 aborts some idle exits); pipelines.layout,
shard bookkeeping: a listing that lags behind the upstream manifest is an error, not fewer shards.

Ray ends a worker that stays idle for 1 s beyond the node's CPU count, and in Ray 2.60 about 1 such
exit in 80 aborts in the worker's own shutdown ("Mutex corrupt", SIGABRT). `init_ray` starts the
embedded cluster with `EMBEDDED_SYSTEM_CONFIG`, so the workers a burst of tasks started stay alive.
"""

from __future__ import annotations

import os
import time

import psutil


def test_the_embedded_ray_keeps_the_workers_a_burst_started(ray_local):
    ray = ray_local

    @ray.remote(num_cpus=0.25)
    def busy_pid() -> int:
        time.sleep(1.0)  # overlap, so the burst needs many workers at once
        return os.getpid()

    cpus = int(ray.available_resources().get("CPU", 0))  # what earlier tests' actors left free
    pids = set(ray.get([busy_pid.remote() for _ in range(12)]))
    assert len(pids) > cpus, f"the burst ran on {len(pids)} workers: not beyond the {cpus} free CPUs"
    time.sleep(4.0)  # Ray's default would end the surplus idle workers after 1 s
    ended = [p for p in pids if not psutil.pid_exists(p)]
    assert not ended, f"{len(ended)} of {len(pids)} idle workers were ended"


def test_a_listing_behind_the_upstream_manifest_is_an_error_not_fewer_shards(tmp_path):
    import pyarrow as pa
    import pytest

    from pipelines import fingerprint, layout

    empty = layout.with_reason(pa.table({"key": pa.array([], pa.string())}), [], [])
    fp = fingerprint.record(tmp_path, {"step": "download"})
    for i in range(2):
        layout.write_shard(tmp_path, layout.shard_name(i), pa.table({"key": [f"k{i}"]}), empty, 1)
    layout.write_manifest(tmp_path, "download", [], {}, fp)
    assert layout.require_dataset(tmp_path, "download") == ["part-00000", "part-00001"]
    assert layout.unfinished(tmp_path, ["part-00000", "part-00001", "part-00002"]) == ["part-00002"]
    (tmp_path / "part-00001.done").unlink()  # what a listing that lags behind the writes would show
    with pytest.raises(RuntimeError, match="shows 1 finished shards but its manifest counts 2"):
        layout.require_dataset(tmp_path, "download")
