"""pipelines.raystart: the embedded local Ray keeps idle workers and quiets Ray Train's loggers.

Ray ends a worker that stays idle for 1 s beyond the node's CPU count, and in Ray 2.60 about 1 such
exit in 80 aborts in the worker's own shutdown ("Mutex corrupt", SIGABRT). `init_ray` starts the
embedded cluster with `EMBEDDED_SYSTEM_CONFIG`, so the workers a burst of tasks started stay alive; its
worker setup hook raises the level of loggers that warned every second under load.
"""

from __future__ import annotations

import os
import time

import psutil


def test_the_embedded_ray_keeps_the_workers_a_burst_started(ray_local):
    ray = ray_local

    @ray.remote(num_cpus=0.25)
    def busy_pid(until: float) -> int:
        # every task of the burst runs until the same moment, so the burst needs 12 workers at once
        # whatever the idle workers earlier tests left (with a fixed 1 s sleep, 4 idle workers took it all)
        time.sleep(max(0.0, until - time.time()))
        return os.getpid()

    cpus = int(ray.available_resources().get("CPU", 0))  # what earlier tests' actors left free
    until = time.time() + 15.0  # time for Ray to start the workers the burst needs, on a busy machine too
    pids = set(ray.get([busy_pid.remote(until) for _ in range(12)]))
    assert len(pids) > cpus, f"the burst ran on {len(pids)} workers: not beyond the {cpus} free CPUs"
    time.sleep(4.0)  # Ray's default would end the surplus idle workers after 1 s
    ended = [p for p in pids if not psutil.pid_exists(p)]
    assert not ended, f"{len(ended)} of {len(pids)} idle workers were ended"


def test_embedded_ray_workers_silence_the_placement_group_cleaner(ray_local):
    """Without a dashboard (no state API) Ray Train's cleaner warned every second under load (24 lines in
    20 s of a busy 1-worker run), and without an autoscaler its resource requests time out under load
    with a traceback; `init_ray`'s worker setup hook raises those loggers' level."""
    import ray

    names = ("ray.train.v2._internal.execution.controller.placement_group_cleaner",
             "ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client")  # fmt: skip

    def passes() -> list[tuple[bool, bool]]:
        import logging
        import logging.config

        # what Ray Train's controller does after the setup hook: it resets the child loggers' levels
        logging.config.dictConfig({"version": 1, "disable_existing_loggers": False,
                                   "loggers": {"ray.train": {"level": "DEBUG"}}})  # fmt: skip
        out = []
        for n in names:
            logger = logging.getLogger(n)
            warning = logger.makeRecord(n, logging.WARNING, __file__, 1, "timed out", None, None)
            error = logger.makeRecord(n, logging.ERROR, __file__, 1, "broken", None, None)
            out.append((bool(logger.filter(warning)), bool(logger.filter(error))))
        return out

    assert ray.get(ray.remote(num_cpus=0)(passes).remote()) == [(False, True), (False, True)]
