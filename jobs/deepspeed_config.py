"""DeepSpeed ZeRO-3 configuration built from a `TrainConfig` (the released ``scripts/zero3.json`` plus
our choices), as a plain dict passed to ``deepspeed.initialize``.

- ZeRO stage 3 without offload; overlap_comm and contiguous_gradients as released;
  ``stage3_gather_16bit_weights_on_model_save`` so the stage-end export can gather full weights.
- Bucket sizes follow the Hugging Face "auto" rules from the hidden size H: reduce bucket H^2, prefetch
  bucket 0.9 H^2, parameters below 10 H stay unpartitioned.
- bf16 on GPU, fp32 on CPU (fp16 fails on CPU and is refused by config validation).
- The optimizer is a client ``torch.optim.AdamW`` (no "optimizer" block: DeepSpeed's own would JIT-compile
  fused Adam) and the learning-rate schedule is set by the training loop (no "scheduler" block).
- Batch: ``train_micro_batch_size_per_gpu`` and ``gradient_accumulation_steps``; DeepSpeed derives
  ``train_batch_size`` from the real world size (never set it here).

On CPU, `release_shm_buffer` unlinks the shared-memory all-reduce buffer DeepSpeed's CPU backend creates
per rank (64 MiB in ``/dev/shm``, which DeepSpeed never unlinks: every CPU run, killed worker and restart
used to leave one per rank behind, held in RAM until reboot).
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

from jobs.config import TrainConfig


def deepspeed_config(cfg: TrainConfig, hidden_size: int) -> dict[str, Any]:
    s = cfg.scale
    h2 = hidden_size * hidden_size
    return {
        "train_micro_batch_size_per_gpu": s.micro_batch_size,
        "gradient_accumulation_steps": s.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "bf16": {"enabled": s.precision == "bf16"},
        "fp16": {"enabled": False},
        "zero_optimization": {
            "stage": 3,
            "overlap_comm": s.use_gpu,
            "contiguous_gradients": True,
            "reduce_bucket_size": h2,
            "stage3_prefetch_bucket_size": int(0.9 * h2),
            "stage3_param_persistence_threshold": 10 * hidden_size,
            "stage3_max_live_parameters": int(1e9),
            "stage3_max_reuse_distance": int(1e9),
            "stage3_gather_16bit_weights_on_model_save": True,
        },
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


# DeepSpeed's CPU all-reduce buffers (deepspeed/ops/csrc/cpu/comm/shm.cpp): one POSIX shared-memory object
# per rank, "<prefix>_<uid>_<MASTER_ADDR>_<MASTER_PORT>_<rank>", created when every rank of the job is on one
# node (LOCAL_SIZE == world size) and mapped by all of them during `deepspeed.init_distributed`.
SHM_BUFFER_PREFIX = "deepspeed_allreduce_buffer"


def shm_buffer_path(rank: int) -> str:
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    return f"/dev/shm/{SHM_BUFFER_PREFIX}_{os.getuid()}_{addr}_{port}_{rank}"


def release_shm_buffer() -> None:
    """Collective (every rank, CPU runs, after ``deepspeed.initialize``): once every rank has mapped every
    buffer (the barrier), unlink this rank's name. The mappings stay valid until the processes exit, so
    the memory is freed when the job ends, however it ends (a SIGKILLed worker included)."""
    import torch.distributed as dist

    dist.barrier()
    with contextlib.suppress(FileNotFoundError):
        os.unlink(shm_buffer_path(dist.get_rank()))
