"""Train BREEN: one stage, or all three chained, on Ray Train + DeepSpeed ZeRO-3, fed by Ray Data.

Reads:  training shards (`breen.shard_format`, from `pipelines.teacher`: ``--data``, stage 3 ``--sft-data``); an
        initial BREEN directory (``--init-from``: Hugging Face layout with tokenizer, e.g. from `breen.convert`;
        ``tiny``: a tiny random model, offline); stages 2-3 start from the previous stage's export by default.
Writes: ``<output_dir>/<stage>/`` (a folder or ``s3://`` / ``gs://``, `breen.storage`): ``train_config.json``,
        ``config_history/``, ``step-NNNNNNN/`` checkpoints (ZeRO-3 shards, client state, completion markers;
        last K kept), ``metrics.jsonl``, ``samples.jsonl``, ``tensorboard/`` (rank 0) and at stage end
        ``export/`` (Hugging Face model + tokenizer) for `breen.generate` and the next stage.

Run with (an embedded local Ray when no cluster address is given or found):
    python -m jobs.train --stage stage1 --data runs/prep/shards --init-from /models/breen-7b-init
    python -m jobs.train --stage stage2 --data runs/prep/shards            # init: stage1/export
    python -m jobs.train --stage stage3 --sft-data runs/prep/sft_shards    # init: stage2/export
    python -m jobs.train --stage all --config jobs/configs/demo.yaml      # the demo, on 2 CPU workers
    ray job submit --working-dir . -- python -m jobs.train --stage stage1 ... --set scale.num_workers=64
The command line and config layers (``--set``, ``--profile``, ``--print-config``) are `jobs.launch`'s; the driver
(input and resume-config checks, stage plan, Ray, restarts) is `jobs.driver`. Rerunning resumes the run.

This file is what each Ray Train worker runs (`train_worker`, one per accelerator): resume rule (this run's
latest checkpoint, else ``model.init_from`` weights only), trainable set (`breen.stages.set_trainable`), client
AdamW with per-component learning rates, DeepSpeed engine, then for each step: learning rate, micro-batches
(forward, backward, step), statistics summed over ranks (`jobs.metrics.StepStats`), validation when due
(`jobs.validation`), metrics, checkpoint; at the end the export.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # the command line lives in jobs.launch, which imports the driver (and with it
    from jobs.launch import main  # torch, Ray and DeepSpeed) only once the configs are checked

    sys.exit(main())

import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from breen.storage import fetch_dir
from jobs import ingest, validation
from jobs.checkpoint import (
    MODEL_DIR,
    CheckpointCorrupt,
    TrainState,
    check_same_scale,
    checkpoint_name,
    export_model,
    local_checkpoint,
    restore_checkpoint,
    save_checkpoint,
    verify_files,
)
from jobs.config import TrainConfig, config_record, from_dict, to_dict
from jobs.ingest import MODEL_KEYS
from jobs.model_init import build_model


def lr_factor(step: int, total_steps: int, warmup_ratio: float, min_lr_ratio: float = 0.0) -> float:
    """Cosine with linear warmup, as transformers' ``get_cosine_schedule_with_warmup`` (`step` is the
    0-based optimizer step about to run; warmup = ceil(ratio x total) steps, starting from 0)."""
    warmup = math.ceil(warmup_ratio * total_steps)
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total_steps - warmup)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


class FirstStepError(RuntimeError):
    """A worker failed before the first step of this attempt completed, and not because a worker, a node
    or a collective failed: a bug or a bad input that every restart would hit again. The driver stops
    at once on it instead of spending `checkpoint.max_failures` restarts. Args: (summary, traceback)."""

    def __init__(self, summary: str, trace: str = ""):
        super().__init__(summary, trace)
        self.summary, self.trace = summary, trace

    def __str__(self) -> str:
        return self.summary


def is_fault(err: BaseException) -> bool:
    """True for what restarts are for: a lost worker or node (Ray's actor errors) or a broken collective
    (torch.distributed errors, which the surviving ranks raise when a peer goes away)."""
    import ray.exceptions
    import torch.distributed as dist

    seen: BaseException | None = err
    while seen is not None:  # the fault may be the cause of what the step loop raised
        if isinstance(seen, (ray.exceptions.RayActorError, ray.exceptions.NodeDiedError, dist.DistError)):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


@dataclass(frozen=True)
class WorkerPlan:
    """What the driver settled for the workers (`jobs.driver.stage_plan`); travels pickled in
    ``train_loop_config["plan"]``."""

    init_dir: str  # the model to start from (path or URI): model.init_from, or the latest checkpoint's
    tokenizer_dir: str
    total_steps: int
    total_rows: int
    validation: dict[str, Any] | None  # held-out rows (`jobs.validation.plan`)


def train_worker(loop_config: dict[str, Any]) -> None:
    """One Ray Train worker (see `run_worker`). An error before this attempt's first step completes that
    is not a fault (`is_fault`) nor a torn checkpoint (`CheckpointCorrupt`: the driver falls back) becomes
    a `FirstStepError` with the real traceback."""
    import traceback

    progress = {"steps": 0}
    try:
        run_worker(loop_config, progress)
    except Exception as err:
        if progress["steps"] or is_fault(err) or isinstance(err, CheckpointCorrupt):
            raise
        import ray.train

        summary = f"rank {ray.train.get_context().get_world_rank()}: {type(err).__name__}: {err}"
        raise FirstStepError(summary, "".join(traceback.format_exception(err))) from err


def run_worker(loop_config: dict[str, Any], progress: dict[str, int]) -> None:
    """Model (resume rule), DeepSpeed ZeRO-3 engine, then the step loop; counts the steps it completes
    in ``progress["steps"]``."""
    import ray.train
    import torch
    from ray.train import Checkpoint
    from ray.train.v2.api.report_config import CheckpointUploadMode

    cfg: TrainConfig = from_dict(loop_config["config"])
    plan: WorkerPlan = loop_config["plan"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    if not cfg.scale.use_gpu:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
        # DeepSpeed's CPU accelerator counts devices with `numactl --hardware` (a subprocess on every
        # gradient bucket) unless LOCAL_SIZE is set, as its own launcher does.
        os.environ.setdefault("LOCAL_SIZE", str(ctx.get_local_world_size()))
    import deepspeed

    from breen.config import BreenConfig
    from breen.stages import param_groups, set_trainable
    from jobs.deepspeed_config import deepspeed_config, release_shm_buffer
    from jobs.metrics import StepStats, Tracker, mfu, peak_tflops

    def print0(*args) -> None:
        if rank == 0:
            print(*args, flush=True)

    device = ray.train.torch.get_device()
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    s = cfg.scale
    accum, micro_bs, total_steps = s.grad_accum, s.micro_batch_size, plan.total_steps

    # --- resume rule: this run's latest checkpoint if any, else init_from (weights only)
    checkpoint = ray.train.get_checkpoint()
    endpoint = cfg.storage.endpoint_override
    with local_checkpoint(checkpoint, ctx.get_local_rank()) as ckpt_dir:
        if ckpt_dir:  # sizes and sha256 of what this rank reads (CheckpointCorrupt: the driver falls back)
            verify_files(ckpt_dir, rank, name=Path(checkpoint.path).name)
        source = Path(ckpt_dir, MODEL_DIR) if ckpt_dir else fetch_dir(plan.init_dir, "model.init_from", endpoint)
        model_config = BreenConfig.from_pretrained(source)
        tokenizer = ingest.load_tokenizer(
            source if ckpt_dir else fetch_dir(plan.tokenizer_dir, "model.tokenizer", endpoint)
        )
        ds_config = deepspeed_config(cfg, model_config.hidden_size)
        model = build_model(cfg, model_config, None if ckpt_dir else source, ds_config, rank)
        print0(f"[{cfg.stage}] model from {'checkpoint ' + str(ckpt_dir) if ckpt_dir else source}")
        set_trainable(model, cfg.stage, log=print0)
        if cfg.model.gradient_checkpointing:
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        groups = param_groups(model, cfg.stage, cfg.optim.lrs, cfg.optim.weight_decay)
        base_lrs = {g["name"]: g["lr"] for g in groups}
        optimizer = make_optimizer(cfg, groups)
        engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        if not s.use_gpu:
            release_shm_buffer()
        if ckpt_dir:
            state = restore_checkpoint(engine, ckpt_dir, rank, name=Path(checkpoint.path).name)
            check_same_scale(state, cfg, world)
            print0(f"[{cfg.stage}] resumed at step {state.step}/{total_steps} (data position {state.data_position})")
        else:
            state = TrainState(
                stage=cfg.stage, total_steps=total_steps, num_workers=world,
                micro_batch_size=micro_bs, global_batch_size=s.global_batch_size,
            )  # fmt: skip

    # --- data: this worker's deterministic stream of micro-batches (see jobs.ingest)
    batches = iter(
        ray.train.get_dataset_shard("train").iter_torch_batches(
            batch_size=micro_bs,
            collate_fn=ingest.Collate(model_config, 8 if s.use_gpu else None, packing=cfg.data.packing),
            prefetch_batches=cfg.data.prefetch_batches,
            device=device,
        )
    )
    tracker = Tracker(
        cfg.run_dir, total_steps, enabled=rank == 0, tensorboard=cfg.metrics.tensorboard,
        log_every=cfg.metrics.log_every, wandb=cfg.metrics.wandb, mlflow=cfg.metrics.mlflow,
        config=to_dict(cfg),
    )  # fmt: skip
    peak = peak_tflops(cfg.metrics.peak_tflops, s.use_gpu)
    validator = validation.build(cfg, plan.validation, tokenizer, model_config, rank, world, device, print0)
    last_good: dict[str, torch.Tensor] | None = None
    engine.train()
    print0(
        f"[{cfg.stage}] {total_steps} steps x global batch {s.global_batch_size} "
        f"({micro_bs} per worker x {world} workers x {accum} accumulation), {plan.total_rows} rows x "
        f"{cfg.schedule.epochs} epoch(s)"
    )

    # --- the step loop
    for step in range(state.step, total_steps):
        maybe_fail(cfg, step, rank)
        t0 = time.perf_counter()
        factor = lr_factor(step, total_steps, cfg.optim.warmup_ratio, cfg.optim.min_lr_ratio)
        lrs = {}
        for group in engine.optimizer.param_groups:
            group["lr"] = lrs[group["name"]] = base_lrs[group["name"]] * factor
        stats = StepStats()  # this rank's sums over the step's micro-batches
        data_wait = 0.0  # seconds this rank waited for micro-batches (data starving the trainer)
        for micro in range(accum):
            t_data = time.perf_counter()
            want = ingest.expected_pos(step, micro, rank, world, micro_bs, accum)
            batch = next_batch(batches, want, rank, stride=micro_bs * world)
            data_wait += time.perf_counter() - t_data
            stats.add_rejected(batch["reject"])
            weight = 1.0
            if "input_ids" not in batch:  # every row rejected: replay the last batch with zero weight
                if last_good is None:
                    raise RuntimeError(f"rank {rank}: first micro-batch has no usable sample")
                batch, weight = last_good, 0.0
            last_good = batch
            out = engine(**{k: batch[k] for k in MODEL_KEYS if k in batch})
            engine.backward(out.loss * weight)
            engine.step()
            stats.add(out, batch, weight, model_config)
        grad_norm = engine.get_global_grad_norm()
        stats = stats.all_reduce(device)  # every rank's sums
        step_time = time.perf_counter() - t0
        state.step = step + 1
        progress["steps"] += 1
        state.data_position = state.step * s.global_batch_size
        state.samples_seen += int(stats.samples)
        state.tokens_seen += int(stats.tokens)
        for reason, count in stats.rejected.items():
            state.rejected[reason] = state.rejected.get(reason, 0) + count
        record = {
            "step": state.step, **stats.record(), "grad_norm": float(grad_norm or 0.0),
            "lr": lrs, "step_time": step_time, "data_wait": data_wait,
            "samples_per_s": stats.samples / step_time, "tokens_per_s": stats.tokens / step_time,
            "mfu": mfu(stats.flops, step_time, world, peak), "tokens_seen": state.tokens_seen,
            "rejected": sum(state.rejected.values()),
        }  # fmt: skip
        val, samples = validation.evaluate_if_due(validator, engine, state.step, total_steps)
        tracker.log({**record, **val})
        tracker.log_samples(state.step, samples)

        # --- checkpoint: every N steps, at the end, or when asked to stop
        finished = state.step == total_steps
        stop = cfg.debug.stop_after_step is not None and state.step >= cfg.debug.stop_after_step
        if state.step % cfg.checkpoint.every_steps == 0 or finished or stop:
            t_ckpt = time.perf_counter()
            local = save_checkpoint(
                engine, state, rank=rank, train_config=config_record(cfg), model_config=model_config,
                tokenizer=tokenizer, world_size=world,
            )  # fmt: skip
            asynchronous = cfg.checkpoint.async_upload and not (finished or stop)
            tracker.sync()  # remote run folder: the metrics so far go up with the checkpoint
            ray.train.report(
                {"step": state.step, "data_position": state.data_position, "loss": record["loss"],
                 "tokens_seen": state.tokens_seen, "stage": cfg.stage},
                checkpoint=Checkpoint.from_directory(local),
                checkpoint_dir_name=checkpoint_name(state.step),
                checkpoint_upload_mode=CheckpointUploadMode.ASYNC if asynchronous else CheckpointUploadMode.SYNC,
                delete_local_checkpoint_after_upload=True,
            )  # fmt: skip
            # The stall: what the step loop waited for this checkpoint (save, plus the upload when SYNC).
            print0(f"[{cfg.stage}] checkpoint {checkpoint_name(state.step)}: step loop stalled "
                   f"{time.perf_counter() - t_ckpt:.2f} s ({'async' if asynchronous else 'sync'} upload)")  # fmt: skip
        if stop and not finished:
            print0(f"[{cfg.stage}] debug.stop_after_step={cfg.debug.stop_after_step}: stopping")
            tracker.close()
            return

    # --- stage end: consolidated Hugging Face export (collective)
    if cfg.checkpoint.export:
        export_model(
            engine, cfg.export_dir, rank=rank, model_config=model_config, tokenizer=tokenizer,
            train_config=config_record(cfg), state=state,
        )  # fmt: skip
        print0(f"[{cfg.stage}] exported {cfg.export_dir}")
    if state.rejected:
        print0(f"[{cfg.stage}] samples left out by the ingest: {state.rejected}")
    tracker.close()


def next_batch(batches, want: int, rank: int, stride: int) -> dict[str, Any]:
    """The micro-batch at position `want` of this rank's stream (`jobs.ingest.expected_pos`), checked
    against the deterministic order; earlier ones (a resume without a read-time skip) are passed over."""
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            raise RuntimeError(f"rank {rank}: the data stream ended before position {want}") from None
        got = int(batch["pos"][0])
        if got == want:
            return batch
        if got > want or (want - got) % stride:
            raise RuntimeError(f"rank {rank}: data stream out of order (got position {got}, want {want})")


def make_optimizer(cfg: TrainConfig, groups: list[dict[str, Any]]):
    """The client AdamW (DeepSpeed steps it on its flat fp32 partitions)."""
    import torch

    o = cfg.optim
    return torch.optim.AdamW(
        groups, lr=groups[0]["lr"], betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay, fused=o.fused
    )


def maybe_fail(cfg: TrainConfig, step: int, rank: int) -> None:
    """``debug.fail_at_step``: rank 0 raises once when `step` steps are done (a marker file under the
    run directory makes the restarted attempt go on). ``debug.error_at_step``: rank 0 raises a TypeError
    every time that step starts, as a bug would (each one is counted in ``debug-errors``)."""
    if rank == 0 and step == cfg.debug.error_at_step:
        errors = cfg.run_dir / "debug-errors"
        errors.write_text((errors.read_text() if errors.exists() else "") + f"step {step}\n")
        raise TypeError(f"debug.error_at_step={step}: injected deterministic error on rank 0")
    if cfg.debug.fail_at_step is None or step != cfg.debug.fail_at_step or rank != 0:
        return
    marker = cfg.run_dir / f"debug-failed-at-step-{step}"
    if marker.exists():
        return
    marker.write_text("injected failure\n")
    raise RuntimeError(f"debug.fail_at_step={step}: injected failure on rank 0")
