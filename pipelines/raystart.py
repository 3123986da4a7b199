"""Ray start-up for data preparation and training: attach to a cluster, or start an embedded one that
keeps idle workers and quiets the warnings about what it lacks on purpose (no dashboard, no autoscaler).

Used by every step (`pipelines.runner`), `pipelines.prepare`, `jobs.train`, the benchmarks and the tests.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

# Ray 2.60 bug: a worker that the raylet ends for being idle sometimes aborts in its own shutdown
# ("Mutex corrupt: waiting writer with no waiters", SIGABRT in the OpenCensus metrics thread of
# _raylet.so; 4 aborts in about 310 idle exits measured, with pyarrow 25.0.0 and 26.0.1 alike, so no
# package pin avoids it). No task runs in that worker then, so nothing is lost, but the log shows a
# fatal error. The embedded cluster lives only as long as its driver, so it keeps idle workers instead
# of ending them: no idle exits, no such abort (README "Known upstream issues").
EMBEDDED_SYSTEM_CONFIG = {"idle_worker_killing_time_threshold_ms": 24 * 3600 * 1000}


def init_ray(address: str | None = None, num_cpus: int | None = None) -> None:
    """Attach to a cluster (address, RAY_ADDRESS, or a job's cluster) or start an embedded one."""
    import ray

    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    root = str(Path(__file__).resolve().parent.parent)
    env = {
        "env_vars": {"NO_ALBUMENTATIONS_UPDATE": "1", "PYTHONPATH": root},
        "worker_process_setup_hook": "pipelines.raystart.quiet_embedded_ray",
    }
    if address or os.environ.get("RAY_ADDRESS"):
        # A cluster (or a `ray job submit` job): keep the job's runtime env (working_dir) as it is.
        ray.init(address=address or os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        ray.init(
            address="local",
            num_cpus=num_cpus or max(4, os.cpu_count() or 1),
            include_dashboard=False,
            runtime_env=env,
            log_to_driver=True,
            _system_config=EMBEDDED_SYSTEM_CONFIG,
        )
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = sys.stderr.isatty()
    ctx.execution_options.verbose_progress = False


# Ray Train loggers that only warn about what an embedded Ray lacks on purpose (see `quiet_embedded_ray`).
EMBEDDED_QUIET_LOGGERS = (
    # no dashboard, hence no state API: the placement-group cleaner warns every second that it cannot
    # query the controller (harmless: the embedded cluster ends with the driver)
    "ray.train.v2._internal.execution.controller.placement_group_cleaner",
    # no autoscaler: under CPU load the 5 s request to the autoscaling coordinator times out and logs a
    # warning with a traceback, though there is nothing to scale
    "ray.train.v2._internal.execution.scaling_policy.autoscaling_coordinator_client",
)


def quiet_embedded_ray() -> None:
    """Worker setup hook of the embedded Ray: `EMBEDDED_QUIET_LOGGERS` pass errors only. A filter, not a
    level: Ray Train's controller configures the ``ray.train`` logger with `logging.config.dictConfig`
    after this hook, which resets its child loggers' levels (but keeps their filters)."""
    import logging

    def errors_only(record: logging.LogRecord) -> bool:
        return record.levelno >= logging.ERROR

    for name in EMBEDDED_QUIET_LOGGERS:
        logger = logging.getLogger(name)
        if errors_only.__name__ not in {getattr(f, "__name__", "") for f in logger.filters}:
            logger.addFilter(errors_only)
