"""The driver of ``python -m jobs.train``: check a stage's inputs, settle its plan, start Ray, run the
workers (`jobs.train`) and restart them after a fault.

Reads:  the stage's config (`jobs.config.TrainConfig`, resolved by `jobs.launch`), its training shards'
        manifests and the initial model's ``config.json`` (small files, before Ray starts); on a resume
        the run's checkpoint registry and config history (`jobs.checkpoint`, `jobs.config.last_recorded`).
Writes: ``<output_dir>/<stage>/`` through Ray Train and the workers (see `jobs.train`); itself the run's
        ``config_history/`` record (`jobs.config.record_config`), the tiny model for ``model.init_from=tiny``
        and torn checkpoints moved aside (`jobs.checkpoint.fall_back`).

Not run directly: `jobs.launch.main` (``python -m jobs.train``) imports it once the configs are checked and
calls `run_stages`. In order, for each stage: `check_inputs` (config, shards, output folder: fails fast
naming the field), `check_resume_config` (a resume whose config differs from the run's last recorded one
in a field that can change the weights, `jobs.config.RESUME_NEUTRAL` lists the others, is refused listing
each change unless ``--allow-config-change``; scale cannot change on resume even then: the data position
is counted in global batches), `stage_plan` (latest complete checkpoint or ``model.init_from``, shard
checks, validation split, step count: a `StagePlan`), then `run_stage`: Ray (embedded local one when no
cluster address is given or found, `check_resources`), a `TorchTrainer` running `jobs.train.train_worker`,
restarts from the latest complete checkpoint after a fault (`fit_with_restarts`, ``checkpoint.max_failures``;
none after an error before the first step, `jobs.train.FirstStepError`: `StageFailed`).
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from breen.config import BreenConfig
from breen.storage import StorageError, Store, fetch_dir
from jobs import ingest, validation
from jobs.checkpoint import (
    MODEL_DIR,
    CheckpointCorrupt,
    NoCompleteCheckpoint,
    fall_back,
    latest_checkpoint,
    registered_checkpoints,
)
from jobs.config import (
    CPU_MALLOC_TUNABLES,
    TINY_INIT,
    ConfigError,
    TrainConfig,
    config_changes,
    last_recorded,
    record_config,
    to_dict,
    validate,
)
from jobs.metrics import read_metrics
from jobs.train import FirstStepError, WorkerPlan, train_worker


class StageFailed(RuntimeError):
    """A stage stopped on an error that restarting would not mend (see `jobs.train.FirstStepError`)."""


@dataclass
class StagePlan:
    """What `stage_plan` settled for one stage: the workers' part (`worker`, sent to every Ray Train worker
    in ``train_loop_config``) and what only the driver needs."""

    worker: WorkerPlan
    files: list[ingest.ShardFile]  # the training shards (validation rows held out)
    model_config: BreenConfig  # of the model the stage starts from
    resumed_from: str | None  # the checkpoint's name, None on a fresh start
    config_changes: list[str]  # vs the run's last recorded config (allowed by --allow-config-change)


def run_stages(
    cfgs: list[TrainConfig], address: str | None, num_cpus: int | None, allow_config_change: bool
) -> None:
    """Train the stages in order (each one's inputs and resumed config checked before the first trains);
    ends with a table of every stage's last validation values."""
    for cfg in cfgs:
        check_resume_config(cfg, check_inputs(cfg), allow_config_change, report=False)
    finals = {cfg.stage: run_stage(cfg, address, num_cpus, allow_config_change)["validation"] for cfg in cfgs}
    if len(cfgs) > 1 and any(finals.values()):
        print(f"final validation, per stage:\n{validation.table(finals)}", flush=True)


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


def stage_plan(cfg: TrainConfig, allow_config_change: bool = False) -> StagePlan:
    """Check inputs and settle everything the workers need (fails fast, naming the field): on a resume,
    the config against the run's record (`check_resume_config`) and the latest checkpoint's completeness
    (`fall_back`: a torn one is reported and set aside; `StageFailed` when none is complete)."""
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
    worker = WorkerPlan(
        init_dir=str(init_dir), tokenizer_dir=str(tokenizer_dir), total_steps=steps, total_rows=rows, validation=val
    )
    return StagePlan(
        worker=worker, files=files, model_config=model_config,
        resumed_from=resume[0].name if resume else None, config_changes=changes,
    )  # fmt: skip


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
    record_config(cfg, resumed_from=plan.resumed_from, changes=plan.config_changes)
    s = cfg.scale
    resources = {"CPU": s.cpus_per_worker, **({"GPU": 1} if s.use_gpu else {})}
    factory = DatasetFactory(
        progress_bars=sys.stderr.isatty(),
        files=plan.files,
        run_dir=cfg.run_dir,
        kwargs={
            "tokenizer_dir": plan.worker.tokenizer_dir, "model_config": plan.model_config.to_dict(),
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
            train_loop_config={"config": to_dict(cfg), "plan": plan.worker},  # pickled to every worker
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
        "stage": cfg.stage, "run_dir": str(cfg.run_dir), "steps": plan.worker.total_steps,
        "metrics": result.metrics, "seconds": round(time.time() - t0, 1),
        "export": str(cfg.export_dir) if cfg.checkpoint.export and (cfg.export_dir / "config.json").exists() else None,
        "validation": validation.last_values(read_metrics(cfg.run_dir)),
    }  # fmt: skip
    print(f"[{cfg.stage}] done in {summary['seconds']} s: {summary}", flush=True)
    if summary["validation"]:
        print(f"[{cfg.stage}] last validation:\n{validation.table({cfg.stage: summary['validation']})}", flush=True)
    return summary


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
