"""Train BREEN: one stage, or all three chained, on Ray Train + DeepSpeed ZeRO-3, fed by Ray Data.

Reads:  training shards (`pipelines.teacher` output, `breen.shard_format`: ``--data`` for stages 1-2, ``--sft-data`` for stage 3);
        an initial BREEN directory (``--init-from``: Hugging Face layout with tokenizer, e.g. from
        ``python -m breen.convert``; ``tiny`` builds a tiny random model offline); for stage 2/3 the
        previous stage's export by default.
Writes: ``<output_dir>/<stage>/`` (Ray Train storage for the run; a folder or ``s3://`` / ``gs://``,
        `breen.storage`, with ``storage.endpoint_override=HOST:PORT`` for S3-compatible stores):
        ``train_config.json`` (the resolved
        config the run started with; never rewritten by a resume), ``config_history/NNNN.json`` (every
        start and resume: config, changes), ``step-NNNNNNN/`` checkpoints (ZeRO-3 shards + client state +
        completion markers, last K kept; torn ones moved aside to ``torn-step-NNNNNNN-<time>/``),
        ``metrics.jsonl``, ``samples.jsonl`` and ``tensorboard/`` (rank 0), and at stage end ``export/`` (consolidated
        Hugging Face model, safetensors, tokenizer) that `breen.generate` and the next stage load.

Run with (embedded local Ray when no cluster address is given or found; the command line and the config
layers are `jobs.launch`'s, the stage files `jobs/configs/`):
    python -m jobs.train --stage stage1 --data runs/prep/shards --init-from /models/breen-7b-init
    python -m jobs.train --stage stage2 --data runs/prep/shards            # init: stage1/export
    python -m jobs.train --stage stage3 --sft-data runs/prep/sft_shards    # init: stage2/export
    python -m jobs.train --stage all --config jobs/configs/demo.yaml      # the demo, on 2 CPU workers
On a cluster:
    ray job submit --working-dir . -- python -m jobs.train --stage stage1 --data /data/shards \\
        --init-from /models/breen-7b-init --set scale.num_workers=64
Overrides are ``--set KEY=VALUE`` (``--set scale.num_workers=8 --set optim.lrs.patch_embed=2e-4``; with
``--stage all`` ``--set stage2.schedule.max_steps=100`` touches one stage); ``--profile cpu`` is the CPU/test
scale (`jobs/configs/profiles/`); ``--print-config`` shows the resolved configs. Rerunning the same command resumes the run from its latest complete checkpoint (a torn
one is reported by name and skipped: `jobs.checkpoint.fall_back`); a resume whose config differs from the
run's last recorded one in a field that can change the weights (`jobs.config.RESUME_NEUTRAL` lists the
others) is refused before Ray starts, listing each change, unless ``--allow-config-change`` is given (the
changes are then printed and kept in the run's config history). Scale (workers, batch sizes) cannot change
on resume even then: the data position is counted in global batches. Remote model
directories (``--init-from``, checkpoints' model configs) are fetched once per node into
``$BREEN_CACHE`` (default ``~/.cache/breen``).

The step loop is in `train_worker` (one Ray Train worker per accelerator): resume rule, trainable set
(`breen.stages.set_trainable`), client AdamW with per-component learning rates, DeepSpeed engine, then
for each step: learning rate, micro-batches (forward, backward, step), validation when due
(`jobs.validation`: held-out rows, ``data.val_fraction`` or ``data.val_paths``), metrics, checkpoint. Each
stage, and ``--stage all``, ends with a table of the final validation values.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # the command line lives in jobs.launch, which imports this module (and with it
    from jobs.launch import main  # torch, Ray, DeepSpeed) only once the configs are checked

    sys.exit(main())

import itertools
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from breen.storage import StorageError, Store, fetch_dir
from jobs import ingest, validation
from jobs.checkpoint import (
    MODEL_DIR,
    CheckpointCorrupt,
    NoCompleteCheckpoint,
    TrainState,
    checkpoint_name,
    export_model,
    fall_back,
    latest_checkpoint,
    local_checkpoint,
    registered_checkpoints,
    restore_checkpoint,
    save_checkpoint,
    verify_files,
)
from jobs.config import (
    CPU_MALLOC_TUNABLES,
    TINY_INIT,
    ConfigError,
    TrainConfig,
    config_changes,
    config_record,
    from_dict,
    last_recorded,
    record_config,
    to_dict,
    validate,
)
from jobs.ingest import MODEL_KEYS
from jobs.metrics import read_metrics


# ----------------------------------------------------------------------------- schedule
def lr_factor(step: int, total_steps: int, warmup_ratio: float, min_lr_ratio: float = 0.0) -> float:
    """Cosine with linear warmup, as transformers' ``get_cosine_schedule_with_warmup`` (`step` is the
    0-based optimizer step about to run; warmup = ceil(ratio x total) steps, starting from 0)."""
    warmup = math.ceil(warmup_ratio * total_steps)
    if step < warmup:
        return step / max(1, warmup)
    progress = (step - warmup) / max(1, total_steps - warmup)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


# ----------------------------------------------------------------------------- the worker
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
    import torch.distributed as dist
    from ray.train import Checkpoint
    from ray.train.v2.api.report_config import CheckpointUploadMode

    cfg: TrainConfig = from_dict(loop_config["config"])
    plan: dict[str, Any] = loop_config["plan"]
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
    from jobs.metrics import Tracker, mfu, peak_tflops

    def print0(*args) -> None:
        if rank == 0:
            print(*args, flush=True)

    device = ray.train.torch.get_device()
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    s = cfg.scale
    accum, micro_bs, total_steps = s.grad_accum, s.micro_batch_size, plan["total_steps"]

    # --- resume rule: this run's latest checkpoint if any, else init_from (weights only)
    checkpoint = ray.train.get_checkpoint()
    endpoint = cfg.storage.endpoint_override
    with local_checkpoint(checkpoint, ctx.get_local_rank()) as ckpt_dir:
        if ckpt_dir:  # sizes and sha256 of what this rank reads (CheckpointCorrupt: the driver falls back)
            verify_files(ckpt_dir, rank, name=Path(checkpoint.path).name)
        source = (
            Path(ckpt_dir, MODEL_DIR)
            if ckpt_dir
            else fetch_dir(plan["init_dir"], "model.init_from", endpoint)
        )
        model_config = BreenConfig.from_pretrained(source)
        tokenizer = ingest.load_tokenizer(
            source if ckpt_dir else fetch_dir(plan["tokenizer_dir"], "model.tokenizer", endpoint)
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
            print0(
                f"[{cfg.stage}] resumed at step {state.step}/{total_steps} (data position {state.data_position})"
            )
        else:
            state = TrainState(
                stage=cfg.stage, total_steps=total_steps, num_workers=world,
                micro_batch_size=micro_bs, global_batch_size=s.global_batch_size,
            )  # fmt: skip

    # --- data: this worker's deterministic stream of micro-batches (see jobs.ingest)
    shard = ray.train.get_dataset_shard("train")
    batches = iter(
        shard.iter_torch_batches(
            batch_size=micro_bs,
            collate_fn=ingest.Collate(model_config, 8 if s.use_gpu else None, packing=cfg.data.packing),
            prefetch_batches=cfg.data.prefetch_batches,
            device=device,
        )
    )

    def next_batch(step: int, micro: int) -> dict[str, torch.Tensor]:
        """The micro-batch this rank must train on, checked against the deterministic order."""
        want = ingest.expected_pos(step, micro, rank, world, micro_bs, accum)
        while True:
            try:
                batch = next(batches)
            except StopIteration:
                raise RuntimeError(f"rank {rank}: the data stream ended before position {want}") from None
            got = int(batch["pos"][0])
            if got == want:
                return batch
            if got > want or (want - got) % (micro_bs * world):
                raise RuntimeError(f"rank {rank}: data stream out of order (got position {got}, want {want})")
            # got < want: the stream started before our data position (resume without read-time skip)

    tracker = Tracker(
        cfg.run_dir, total_steps, enabled=rank == 0, tensorboard=cfg.metrics.tensorboard,
        log_every=cfg.metrics.log_every, wandb=cfg.metrics.wandb, mlflow=cfg.metrics.mlflow,
        config=to_dict(cfg),
    )  # fmt: skip
    peak = peak_tflops(cfg.metrics.peak_tflops, s.use_gpu)
    validator = validation.build(cfg, plan["validation"], tokenizer, model_config, rank, world, device, print0)
    reasons = ingest.REJECT_REASONS
    last_good: dict[str, torch.Tensor] | None = None
    engine.train()
    print0(
        f"[{cfg.stage}] {total_steps} steps x global batch {s.global_batch_size} "
        f"({micro_bs} per worker x {world} workers x {accum} accumulation), {plan['total_rows']} rows x "
        f"{cfg.schedule.epochs} epoch(s)"
    )

    # --- the step loop
    for step in range(state.step, total_steps):
        maybe_fail(cfg, step, rank)
        t0 = time.perf_counter()
        factor = lr_factor(step, total_steps, cfg.optim.warmup_ratio, cfg.optim.min_lr_ratio)
        lrs = {}
        for group in engine.optimizer.param_groups:
            group["lr"] = base_lrs[group["name"]] * factor
            lrs[group["name"]] = group["lr"]
        # sums: loss, lm, fine x rows, coarse x rows, micro-batches, aligned rows, samples, tokens, FLOPs,
        # tokens incl. padding, then rejected samples by reason (summed over micro-batches, then ranks)
        sums = torch.zeros(10 + len(reasons), dtype=torch.float64)
        data_wait = 0.0  # seconds this rank waited for micro-batches (data starving the trainer)
        for micro in range(accum):
            t_data = time.perf_counter()
            batch = next_batch(step, micro)
            data_wait += time.perf_counter() - t_data
            for code in batch["reject"][batch["reject"] >= 0].tolist():
                sums[10 + code] += 1
            weight = 1.0
            if "input_ids" not in batch:  # every row rejected: replay the last batch with zero weight
                if last_good is None:
                    raise RuntimeError(f"rank {rank}: first micro-batch has no usable sample")
                batch, weight = last_good, 0.0
            last_good = batch
            out = engine(**{k: batch[k] for k in MODEL_KEYS if k in batch})
            engine.backward(out.loss * weight)
            engine.step()
            lengths = sample_lengths(batch)
            rows = int(batch["align_mask"].sum())
            loss, lm, fine, coarse = (
                t.detach().float().item()
                for t in (out.loss, out.lm_loss, out.align_loss_fine, out.align_loss_coarse)
            )
            flops = sum(model_config.flops_per_token(n) * n for n in lengths)
            sums[:10] += weight * torch.tensor(
                [
                    loss,
                    lm,
                    fine * rows,
                    coarse * rows,
                    1.0,
                    rows,
                    len(lengths),
                    sum(lengths),
                    flops,
                    batch["input_ids"].numel(),
                ],
                dtype=torch.float64,
            )
        grad_norm = engine.get_global_grad_norm()
        sums = sums.to(device)
        dist.all_reduce(sums)
        sums = sums.cpu().tolist()
        step_time = time.perf_counter() - t0
        n, rows = max(sums[4], 1e-9), max(sums[5], 1e-9)
        state.step = step + 1
        progress["steps"] += 1
        state.data_position = state.step * s.global_batch_size
        state.samples_seen += int(sums[6])
        state.tokens_seen += int(sums[7])
        for code, reason in enumerate(reasons):
            if sums[10 + code]:
                state.rejected[reason] = state.rejected.get(reason, 0) + int(sums[10 + code])
        record = {
            "step": state.step, "loss": sums[0] / n, "lm_loss": sums[1] / n, "align_fine": sums[2] / rows,
            "align_coarse": sums[3] / rows, "lr": lrs, "grad_norm": float(grad_norm or 0.0),
            "samples": int(sums[6]), "tokens": int(sums[7]), "padding": 1.0 - sums[7] / max(sums[9], 1.0),
            "step_time": step_time, "data_wait": data_wait,
            "samples_per_s": sums[6] / step_time, "tokens_per_s": sums[7] / step_time,
            "mfu": mfu(sums[8], step_time, world, peak), "tokens_seen": state.tokens_seen,
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


def make_optimizer(cfg: TrainConfig, groups: list[dict[str, Any]]):
    """The client AdamW (DeepSpeed steps it on its flat fp32 partitions)."""
    import torch

    o = cfg.optim
    return torch.optim.AdamW(
        groups,
        lr=groups[0]["lr"],
        betas=tuple(o.betas),
        eps=o.eps,
        weight_decay=o.weight_decay,
        fused=o.fused,
    )


def worker_env(cfg: TrainConfig) -> dict[str, str]:
    """Environment of the training worker processes: DeepSpeed's accelerator and glibc's malloc settings."""
    s = cfg.scale
    env = {} if s.use_gpu else {"DS_ACCELERATOR": "cpu"}
    if s.malloc == "auto":
        tunables = None if s.use_gpu else CPU_MALLOC_TUNABLES
    else:
        tunables = None if s.malloc == "default" else s.malloc
    if tunables:
        env["GLIBC_TUNABLES"] = tunables
    return env


def sample_lengths(batch: dict[str, Any]) -> list[int]:
    """Real tokens of every sample in a micro-batch, packed (``cu_seqlens``) or padded."""
    if "cu_seqlens" in batch:
        return [hi - lo for lo, hi in itertools.pairwise(batch["cu_seqlens"].tolist())]
    return batch["attention_mask"].sum(dim=1).tolist()


def build_model(cfg: TrainConfig, model_config, init_dir: Path | None, ds_config: dict[str, Any], rank: int):
    """The model, with weights from `init_dir` (or from the config only: a checkpoint fills them next).

    With ``model.zero_init`` the model is built inside ``deepspeed.zero.Init`` (each module partitioned
    across ranks as soon as it is built, so no rank holds a full copy) and the safetensors weights are
    copied in one tensor at a time (rank 0 reads, the gather/scatter distributes). Without it every
    rank loads the full model (`from_pretrained`) and DeepSpeed partitions it at initialisation.
    """
    import deepspeed
    import torch

    from breen.model import BreenForCausalLM

    dtype = torch.bfloat16 if cfg.scale.precision == "bf16" else torch.float32
    attn = cfg.model.attn_implementation
    if not cfg.model.zero_init:
        if init_dir is not None:
            model = BreenForCausalLM.from_pretrained(init_dir, dtype=dtype, attn_implementation=attn)
        else:
            model = BreenForCausalLM._from_config(model_config, dtype=dtype, attn_implementation=attn)
    else:
        from transformers.initialization import no_init_weights

        # No init rules: every weight is loaded next (the rules index full tensors, absent here). The dtype
        # comes from the DeepSpeed config: zero.Init(dtype=torch.float32) gives bf16 on CPU (DeepSpeed 0.19).
        with no_init_weights(), deepspeed.zero.Init(config_dict_or_path=ds_config):
            model = BreenForCausalLM._from_config(model_config, dtype=dtype, attn_implementation=attn)
        if model_config.tie_word_embeddings:
            model.tie_weights()
        if init_dir is not None:
            load_weights_zero3(model, init_dir, rank)
    model.config.use_cache = False
    return model


def load_weights_zero3(model, directory: Path, rank: int) -> None:
    """Copy a Hugging Face safetensors checkpoint into a ZeRO-3-partitioned model, tensor by tensor."""
    import deepspeed
    import torch
    from safetensors import safe_open

    params = dict(model.named_parameters(remove_duplicate=False))
    files = sorted(Path(directory).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"model.init_from: no *.safetensors in {directory}")
    seen: set[str] = set()
    with torch.no_grad():
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                for key in sorted(f.keys()):
                    if key not in params:
                        raise KeyError(f"model.init_from: unexpected weight {key!r} in {file}")
                    param = params[key]
                    with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                        if rank == 0:
                            tensor = f.get_tensor(key)
                            if tuple(tensor.shape) != tuple(param.shape):
                                raise ValueError(
                                    f"{key}: shape {tuple(tensor.shape)} != {tuple(param.shape)}"
                                )
                            param.copy_(tensor.to(param.dtype))
                    seen.add(key)
    tied = {"lm_head.weight"} if model.config.tie_word_embeddings else set()
    missing = sorted(set(params) - seen - tied)
    if missing:
        raise KeyError(f"model.init_from: {directory} lacks {len(missing)} weights, e.g. {missing[:3]}")


def check_same_scale(state: TrainState, cfg: TrainConfig, world: int) -> None:
    s = cfg.scale
    now = (world, s.micro_batch_size, s.global_batch_size)
    then = (state.num_workers, state.micro_batch_size, state.global_batch_size)
    if now != then:
        raise ConfigError(
            f"scale.num_workers/micro_batch_size/global_batch_size = {now} but the checkpoint was written "
            f"with {then}: resume with the same scale, or start a new run from an export (model.init_from)"
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


# ----------------------------------------------------------------------------- the driver
@dataclass
class DatasetFactory:
    """Builds the training Dataset when Ray Train starts (or restarts) the worker group, skipping the
    positions already consumed by the run's latest checkpoint before anything is read or decoded. The
    tokenizer comes from that checkpoint too (the one the plan named may have been rotated out by
    ``checkpoint.keep_last`` or set aside as torn since); ``kwargs["tokenizer_dir"]`` serves a fresh start."""

    files: list[ingest.ShardFile]
    run_dir: Store
    kwargs: dict[str, Any]
    progress_bars: bool = False

    def __call__(self):
        from ray.data import DataContext

        DataContext.get_current().enable_progress_bars = self.progress_bars  # runs in the controller
        latest = latest_checkpoint(self.run_dir)
        skip = int(latest[1].get("data_position", 0)) if latest else 0
        kwargs = dict(self.kwargs)
        if latest:
            kwargs["tokenizer_dir"] = (latest[0] / MODEL_DIR).uri
        return ingest.build_dataset(self.files, skip=skip, **kwargs)


def tiny_init_dir(cfg: TrainConfig, files: list[ingest.ShardFile]) -> Store:
    """Where ``model.init_from=tiny`` builds its model: under output_dir, named by clip_dim (read from the
    shards) and seed (what the resolved config records as ``model.init_from``)."""
    return cfg.output / f"init-tiny-d{tiny_clip_dim(files)}-s{cfg.model.tiny_seed}"


def tiny_clip_dim(files: list[ingest.ShardFile]) -> int:
    dims = {f.clip_dim for f in files if f.clip_dim}
    return dims.pop() if len(dims) == 1 else 32


def resolve_init(cfg: TrainConfig, files: list[ingest.ShardFile]) -> tuple[str, str]:
    """(model directory, tokenizer directory) to start from, as paths or URIs (every worker fetches a
    remote one: `breen.storage.fetch_dir`); builds the tiny model for ``tiny`` under output_dir."""
    if cfg.model.init_from == TINY_INIT:
        import tempfile

        from jobs.tiny import save_tiny_breen

        out = tiny_init_dir(cfg, files)
        if not (out / "config.json").exists():
            with tempfile.TemporaryDirectory(prefix="breen-tiny-") as tmp:
                save_tiny_breen(Path(tmp), clip_dim=tiny_clip_dim(files), seed=cfg.model.tiny_seed)
                out.upload_dir(tmp, last=("config.json",))
            print(f"[{cfg.stage}] tiny random BREEN written to {out}", flush=True)
        cfg.model.init_from = out.uri
    init = cfg.model.init_from
    return init, cfg.model.tokenizer or init


def absolute_paths(cfg: TrainConfig) -> None:
    """Every location as the workers need it: a local path made absolute (Ray Train workers do not run in
    the driver's directory), a URI normalised (`breen.storage`: an unknown scheme or a URI with
    credentials fails here, naming the field)."""
    from breen.storage import Store

    def fix(p: str | None, field: str) -> str | None:
        if p is None or p == TINY_INIT:
            return p
        try:
            store = Store.at(p, field, cfg.storage.endpoint_override)
        except ValueError as e:  # StorageError
            raise ConfigError(str(e)) from None
        return store.path if store.local else store.uri

    cfg.output_dir = fix(cfg.output_dir, "output_dir")
    cfg.data.paths = [fix(p, f"data.paths[{i}]") for i, p in enumerate(cfg.data.paths)]
    cfg.data.val_paths = [fix(p, f"data.val_paths[{i}]") for i, p in enumerate(cfg.data.val_paths)]
    cfg.model.init_from = fix(cfg.model.init_from, "model.init_from")
    cfg.model.tokenizer = fix(cfg.model.tokenizer, "model.tokenizer")


def check_inputs(cfg: TrainConfig) -> list[ingest.ShardFile]:
    """Validate the config and find its training shards (fails fast naming the field); paths made absolute."""
    absolute_paths(cfg)
    validate(cfg)
    flag = "--sft-data" if cfg.stage == "stage3" else "--data"
    if not cfg.data.paths:
        raise ConfigError(f"data.paths: no training-shard directory given for {cfg.stage} ({flag})")
    for i, p in enumerate(cfg.data.paths):
        where = Store.at(p, f"data.paths[{i}]", cfg.storage.endpoint_override)
        try:
            where.check_readable(f"data.paths[{i}]")
        except StorageError as e:
            raise ConfigError(str(e)) from None
        if not where.is_dir():
            raise ConfigError(f"data.paths[{i}]: not a directory: {p}")
    try:
        cfg.output.check_writable("output_dir")
    except StorageError as e:
        raise ConfigError(str(e)) from None
    try:
        return ingest.list_shards(cfg.data.paths, cfg.storage.endpoint_override)
    except FileNotFoundError as err:
        raise ConfigError(f"data.paths: {err}") from None
    except ingest.ShardError as err:
        raise ConfigError(str(err)) from None


def check_resume_config(
    cfg: TrainConfig, files: list[ingest.ShardFile], allow: bool = False, report: bool = True
) -> list[str]:
    """On a resume (the run has registered checkpoints), the changes of `cfg` from the run's last recorded
    config (`jobs.config.last_recorded`, `config_changes`): a ConfigError listing them, or with `allow`
    the list (printed when `report`). [] on a fresh start or when nothing changed. Reads only small
    files (before Ray starts)."""
    if not registered_checkpoints(cfg.run_dir):
        return []
    if cfg.model.init_from == TINY_INIT:  # the resolved config records the tiny model's folder
        cfg.model.init_from = tiny_init_dir(cfg, files).uri
    recorded = last_recorded(cfg.run_dir)
    if recorded is None:
        return []
    where, old = recorded
    changes = config_changes(old, cfg)
    if not changes:
        return []
    listing = "\n  ".join(changes)
    if not allow:
        raise ConfigError(
            f"resume of {cfg.run_dir} with a changed config (vs {where}):\n  {listing}\nRerun with the recorded "
            "settings, start a new run (--name or output_dir), or pass --allow-config-change to continue with "
            "the new ones (recorded in the run's config_history/)"
        )
    if report:
        print(f"[{cfg.stage}] --allow-config-change: resuming {cfg.run_dir} with a changed config (vs {where}):\n"
              f"  {listing}", flush=True)  # fmt: skip
    return changes


def stage_plan(cfg: TrainConfig, allow_config_change: bool = False) -> dict[str, Any]:
    """Check inputs and settle everything the workers need (fails fast, naming the field): on a resume,
    the config against the run's record (`check_resume_config`) and the latest checkpoint's completeness
    (`fall_back`: a torn one is reported and set aside; `StageFailed` when none is complete)."""
    from breen.config import BreenConfig

    files = check_inputs(cfg)
    changes = check_resume_config(cfg, files, allow_config_change)
    try:
        fall_back(cfg.run_dir, log=lambda line: print(f"[{cfg.stage}] {line}", flush=True))
    except NoCompleteCheckpoint as err:
        raise StageFailed(f"{cfg.stage}: {err}") from None
    resume = latest_checkpoint(cfg.run_dir)
    if resume is not None:
        init_dir = tokenizer_dir = (resume[0] / MODEL_DIR).uri
        print(f"[{cfg.stage}] resuming {cfg.run_dir} from {resume[0].name}", flush=True)
    else:
        if cfg.model.init_from is None:
            raise ConfigError("model.init_from: no initial model given (--init-from DIR or 'tiny')")
        validate(cfg, check_paths=cfg.model.init_from != TINY_INIT)
        init_dir, tokenizer_dir = resolve_init(cfg, files)
    model_config = BreenConfig.from_pretrained(
        fetch_dir(init_dir, "model.init_from", cfg.storage.endpoint_override)
    )
    try:
        ingest.check_shards(files, model_config, cfg.data.text_field, teacher=cfg.data.teacher)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    files, val = validation.plan(cfg, files, model_config)
    print(validation.describe(cfg.stage, val, cfg.validation.every_steps), flush=True)
    rows = ingest.total_rows(files)
    steps = rows * cfg.schedule.epochs // cfg.scale.global_batch_size
    if cfg.schedule.max_steps is not None:
        steps = min(steps, cfg.schedule.max_steps)
    if steps < 1:
        raise ConfigError(
            f"scale.global_batch_size: {rows} rows x {cfg.schedule.epochs} epoch(s) hold no full global "
            f"batch of {cfg.scale.global_batch_size}"
        )
    return {
        "files": files, "model_config": model_config, "init_dir": str(init_dir),
        "tokenizer_dir": str(tokenizer_dir), "total_steps": steps, "total_rows": rows,
        "resumed_from": resume[0].name if resume else None, "config_changes": changes, "validation": val,
    }  # fmt: skip


def run_stage(
    cfg: TrainConfig,
    address: str | None = None,
    num_cpus: int | None = None,
    allow_config_change: bool = False,
) -> dict[str, Any]:
    """Run (or resume) one stage to its end on Ray Train; returns a summary. Raises on failure.
    `allow_config_change`: resume even when the config changed (``--allow-config-change``)."""
    from ray.train import CheckpointConfig, DataConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from pipelines.raystart import init_ray

    plan = stage_plan(cfg, allow_config_change)
    init_ray(address, num_cpus)
    check_resources(cfg, address)
    record_config(cfg, resumed_from=plan["resumed_from"], changes=plan["config_changes"])
    s = cfg.scale
    resources = {"CPU": s.cpus_per_worker, **({"GPU": 1} if s.use_gpu else {})}
    factory = DatasetFactory(
        progress_bars=sys.stderr.isatty(),
        files=plan["files"],
        run_dir=cfg.run_dir,
        kwargs={
            "tokenizer_dir": plan["tokenizer_dir"], "model_config": plan["model_config"].to_dict(),
            "text_field": cfg.data.text_field, "max_length": cfg.data.max_length, "seed": cfg.seed,
            "epochs": cfg.schedule.epochs, "micro_batch_size": s.micro_batch_size,
            "group_by_modality": cfg.data.group_by_modality, "encode_actors": cfg.data.encode_actors,
            "encode_cpus": cfg.data.encode_cpus, "chunk_rows": cfg.data.encode_batch_size,
            "endpoint_override": cfg.storage.endpoint_override, "val_fraction": cfg.data.val_fraction,
        },
    )  # fmt: skip
    env = {"RAY_TRAIN_ENABLE_PRINT_PATCH": "0", **worker_env(cfg)}  # plain print: rank-0 lines once

    def make_trainer() -> TorchTrainer:  # one per attempt; the same run name makes a new one resume
        return TorchTrainer(
            train_worker,
            train_loop_config={
                "config": to_dict(cfg),
                "plan": {k: plan[k] for k in ("init_dir", "tokenizer_dir", "total_steps", "total_rows", "validation")},
            },
            scaling_config=ScalingConfig(
                num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker=resources
            ),
            torch_config=TorchConfig(backend="nccl" if s.use_gpu else "gloo"),
            run_config=RunConfig(
                name=cfg.run_name,
                storage_path=cfg.output.path,
                storage_filesystem=None if cfg.output.local else cfg.output.fs,
                # Restarts after a fault are ours (`fit_with_restarts`): Ray Train would also restart
                # after a deterministic error. Preemptions keep Ray Train's own (separate) budget.
                failure_config=FailureConfig(max_failures=0),
                checkpoint_config=CheckpointConfig(num_to_keep=cfg.checkpoint.keep_last),
                worker_runtime_env={"env_vars": env},
            ),
            datasets={"train": factory},
            dataset_config=DataConfig(execution_options=ingest.ingest_options(), enable_shard_locality=False),
        )

    t0 = time.time()
    result = fit_with_restarts(cfg, make_trainer)
    summary = {
        "stage": cfg.stage, "run_dir": str(cfg.run_dir), "steps": plan["total_steps"],
        "metrics": result.metrics, "seconds": round(time.time() - t0, 1),
        "export": str(cfg.export_dir) if cfg.checkpoint.export and (cfg.export_dir / "config.json").exists() else None,
        "validation": validation.last_values(read_metrics(cfg.run_dir)),
    }  # fmt: skip
    print(f"[{cfg.stage}] done in {summary['seconds']} s: {summary}", flush=True)
    if summary["validation"]:
        print(f"[{cfg.stage}] last validation:\n{validation.table({cfg.stage: summary['validation']})}", flush=True)
    return summary


class StageFailed(RuntimeError):
    """A stage stopped on an error that restarting would not mend (see `FirstStepError`)."""


def fit_with_restarts(cfg: TrainConfig, make_trainer):
    """Run the stage; after a worker-group failure start it again from its latest complete checkpoint
    (`fall_back`), up to ``checkpoint.max_failures`` times, unless a rank failed before its first step
    (`FirstStepError`): then raise `StageFailed` at once, with that rank's traceback. A rank that found
    the checkpoint it restores torn or unreadable (`CheckpointCorrupt`) makes the driver set that
    checkpoint aside and start again from the one before (not counted as a restart: each one removes a
    checkpoint); `StageFailed` when none is left."""
    from ray.train import TrainingFailedError, WorkerGroupError

    def log(line: str) -> None:
        print(f"[{cfg.stage}] {line}", flush=True)

    restarts = 0
    while True:
        try:  # Ray Train 2.60 raises a failed run's error from fit() (older versions returned it)
            result = make_trainer().fit()
            err = result.error
        except TrainingFailedError as failed:
            err = failed
        if err is None:
            return result
        failures = getattr(err, "worker_failures", {}) or {}
        torn = {rank: e for rank, e in sorted(failures.items()) if isinstance(e, CheckpointCorrupt)}
        if torn:
            rank, first = next(iter(torn.items()))
            if first.name not in registered_checkpoints(cfg.run_dir):
                raise StageFailed(f"{cfg.stage}: rank {rank}: {first}")
            try:
                fall_back(cfg.run_dir, log=log, torn={first.name: f"rank {rank}: {first}"})
            except NoCompleteCheckpoint as none_left:
                raise StageFailed(f"{cfg.stage}: {none_left}") from None
            continue
        bugs = {rank: e for rank, e in sorted(failures.items()) if isinstance(e, FirstStepError)}
        if bugs:
            rank, first = next(iter(bugs.items()))
            raise StageFailed(
                f"{cfg.stage}: rank {rank} failed before its first step, not restarted (the same error "
                f"would recur on every restart):\n{first.trace or first.summary}"
            )
        if not isinstance(err, WorkerGroupError) or restarts >= cfg.checkpoint.max_failures:
            raise err
        restarts += 1
        kinds = ", ".join(f"rank {r}: {type(e).__name__}" for r, e in sorted(failures.items()))
        print(f"[{cfg.stage}] worker group failed ({kinds}); restart {restarts} of "
              f"{cfg.checkpoint.max_failures} from the latest complete checkpoint", flush=True)  # fmt: skip
        try:
            fall_back(cfg.run_dir, log=log)
        except NoCompleteCheckpoint as none_left:
            raise StageFailed(f"{cfg.stage}: {none_left}") from None


def check_resources(cfg: TrainConfig, address: str | None) -> None:
    """On an embedded local Ray, fail fast when the workers cannot be placed (instead of waiting)."""
    import ray

    if address or os.environ.get("RAY_ADDRESS"):
        return  # a cluster may autoscale: let Ray Train wait for resources
    s = cfg.scale
    total = ray.cluster_resources()
    if s.use_gpu and total.get("GPU", 0) < s.num_workers:
        raise ConfigError(
            f"scale.use_gpu: {s.num_workers} GPU workers requested but local Ray has "
            f"{int(total.get('GPU', 0))} GPUs (use --profile cpu, or scale.num_workers)"
        )
    need = s.num_workers * s.cpus_per_worker + cfg.data.encode_cpus
    if total.get("CPU", 0) < need:
        raise ConfigError(
            f"scale.cpus_per_worker: workers and one encode actor need {need} CPUs, local Ray has "
            f"{total.get('CPU', 0)}"
        )
