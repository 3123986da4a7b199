"""jobs.driver: the training workers' environment (glibc malloc settings on CPU, measured page faults)."""

from __future__ import annotations

from jobs import config as jc
from jobs import driver


def test_worker_env_malloc_settings():
    cpu, gpu = jc.build_config("stage1", "cpu"), jc.build_config("stage1")
    assert driver.worker_env(cpu) == {"DS_ACCELERATOR": "cpu", "GLIBC_TUNABLES": jc.CPU_MALLOC_TUNABLES}
    assert driver.worker_env(gpu) == {}  # auto: glibc's defaults next to a GPU
    assert driver.worker_env(jc.build_config("stage1", "cpu", ["scale.malloc=default"])) == {
        "DS_ACCELERATOR": "cpu"
    }
    mine = "glibc.malloc.arena_max=2"
    assert driver.worker_env(jc.build_config("stage1", overrides=[f"scale.malloc={mine}"])) == {
        "GLIBC_TUNABLES": mine
    }


_FAULTS = """
import resource, torch
for i in range(30):  # a 64 MiB buffer allocated, written and freed each "step", as ZeRO-3's flat gradients
    if i == 20:  # the heap has grown past the aligned allocations' fragmentation by then
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(16 << 20).fill_(1.0)
print(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def test_cpu_malloc_tunables_stop_page_faults_on_reused_large_buffers():
    """glibc ignores tunables it does not know: this checks ours are spelt right and do what config.py says."""
    import os
    import subprocess
    import sys

    def faults(tunables: str | None) -> int:
        env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
        env.update({"GLIBC_TUNABLES": tunables} if tunables else {})
        return int(subprocess.run([sys.executable, "-c", _FAULTS], env=env, capture_output=True, text=True,
                                  check=True).stdout)  # fmt: skip

    default, tuned = faults(None), faults(jc.CPU_MALLOC_TUNABLES)
    assert default > 10 * 16384, default  # 10 steps x 64 MiB of 4 KiB pages faulted in again
    assert tuned < 1000, tuned


