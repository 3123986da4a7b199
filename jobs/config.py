"""Typed training configs: a YAML file per stage (`jobs/configs/`), stage 2 written as "stage 1 plus these changes".

`jobs/configs/stage1.yaml`, ``stage2.yaml`` (``base: stage1.yaml`` plus changes) and ``stage3.yaml``
(``base: stage2.yaml`` plus changes) hold the released recipe at full scale (reference section 2): 64
workers x 16 per worker = global batch 1024 (stages 1-2), 32 x 8 = 256 (stage 3), AdamW without weight
decay, cosine schedule with warmup 0.03 / 0.01 / 0.01, learning rates from `breen.stages.DEFAULT_LRS`
(``optim.lrs`` overrides single components), gradient checkpointing, ZeRO-3 in bf16. Fields a stage file
leaves out keep the defaults written in the dataclasses below.

Scale is configuration only: ``global_batch_size`` is fixed by the recipe and
``gradient_accumulation = global_batch_size / (micro_batch_size * num_workers)``, so 8 GPUs at 16 per GPU
train with 8 accumulation steps and the same global batch. A *profile* (`jobs/configs/profiles/NAME.yaml`)
holds the changes for a kind of machine (``cpu``: 2 CPU workers, fp32, tiny batches, for tests and the
demo). A *run file* (``jobs.train --config FILE``, e.g. `jobs/configs/demo.yaml`) has the same form:
top-level sections apply to every stage, a ``stageN:`` key to that stage only; it may start from a profile
(``base: profiles/cpu.yaml``).

Layers, later wins (`build_config`): stage file, profile, run files, then ``--set KEY=VALUE`` overrides
(`breen.settings`: the one engine of every command; values are YAML, checked against the field type). An
unknown key or a bad value raises `ConfigError` naming the field (and the file). The resolved config is
saved as JSON with the run (`train_config.json`), with every checkpoint and with the exported model, and
read back by `from_dict`.

Resume rule (OLMo-style, one rule): a run resumes from its own latest checkpoint (``output_dir/name``)
when one exists; otherwise it starts from ``model.init_from`` (weights only). A resume with a config that
differs from the run's last recorded one in any field outside `RESUME_NEUTRAL` is refused unless asked for
(`config_changes`; ``jobs.train --allow-config-change``).

Validation (`validate`): types on assignment, then every float finite (no inf/nan anywhere) and every
value in its range; an override too deeply nested to parse is a `ConfigError` naming the field. Imports
no torch, Ray or transformers (``jobs.train --help`` and ``--print-config`` answer at once).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from breen.settings import ConfigError, apply_override, build, check_finite, merge, read_yaml, update
from breen.stages import COMPONENTS, DEFAULT_LRS, STAGES
from breen.storage import Store, scheme
from pipelines.config import StorageConfig

TINY_INIT = "tiny"  # model.init_from value: build a tiny random BREEN + tokenizer (demo, no downloads)
PRECISIONS = ("bf16", "fp32")
TEXT_FIELDS = ("caption", "conversations", "auto")


# ----------------------------------------------------------------------------- sections
@dataclass
class DataSection:
    """Training shards and the CPU-side ingest (Ray Data) that feeds the workers."""

    # Training-shard directories (`pipelines.teacher` output, `breen.shard_format`: part-NNNNN.parquet + manifest.json):
    # local folders or s3:// / gs:// prefixes (`storage.endpoint_override` for S3-compatible stores).
    paths: list[str] = field(default_factory=list)
    # Which text column to train on: "caption" (plain layout, stages 1-2), "conversations" (chat layout,
    # stage 3), or "auto" (conversations when present and not null, else caption).
    text_field: str = "caption"
    # Expected teacher: the `breen.teacher` Parquet metadata value of every shard with teacher targets
    # (e.g. "ViT-L-14-336"); a shard made with another teacher fails the run before it starts. None
    # accepts any teacher as long as all shards share one (name, weights id, preprocessing).
    teacher: str | None = None
    # Whole spliced sequence (image + queries + text) per sample; longer samples are cut (text only) or
    # rejected (see `breen.data.encode_sample`).
    max_length: int = 4096
    # Stage 3: micro-batches hold one modality (image+text or text-only), as `group_by_modality_length`.
    group_by_modality: bool = False
    # Pack each micro-batch's samples back to back into one row (`breen.data.pack`): the only padding is
    # the 8-token alignment on GPU, attention stays inside each sample (flash-attn varlen, else one SDPA
    # call per sample) and the losses equal the padded batch's. False: pad every sample to the longest.
    packing: bool = True
    # Rows encoded per actor call; actors in the encode pool; CPUs per actor.
    encode_batch_size: int = 32
    encode_actors: int = 8
    encode_cpus: float = 1.0
    # Micro-batches each worker prefetches (collated in a background thread).
    prefetch_batches: int = 4
    # Held-out validation rows, never trained on (`jobs.ingest.held_out_rows`): the rows whose sha256(key)
    # falls below this fraction (the same rows whatever the seed, workers or resume). 0: none.
    val_fraction: float = 0.0
    # Or a separate validation shard set (every row held out; then val_fraction must stay 0).
    val_paths: list[str] = field(default_factory=list)


@dataclass
class ModelSection:
    # BREEN directory in Hugging Face layout (config.json + safetensors + tokenizer), e.g. from
    # `python -m breen.convert` or a previous stage's export; "tiny" builds a tiny random model.
    init_from: str | None = None
    # Tokenizer directory; None: the one saved with init_from.
    tokenizer: str | None = None
    gradient_checkpointing: bool = True
    # None: breen's default (flash attention on CUDA when installed, else SDPA).
    attn_implementation: str | None = None
    # Build the model partitioned across ranks (deepspeed.zero.Init via transformers) instead of a full
    # copy per rank: needed for the 7B preset (a full fp32 copy per rank does not fit host memory).
    zero_init: bool = True
    # Seed and teacher-feature width of the "tiny" init (clip_dim is read from the shards when None).
    tiny_seed: int = 0


@dataclass
class OptimSection:
    # Learning rate per component (`breen.stages.COMPONENTS`) and "default" (breen.stages.DEFAULT_LRS).
    lrs: dict[str, float] = field(default_factory=dict)
    warmup_ratio: float = 0.03
    min_lr_ratio: float = 0.0  # cosine decays to min_lr_ratio * lr
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # max global grad norm (HF Trainer default, used by the released scripts)
    fused: bool = True  # torch's fused AdamW kernel (CPU and GPU): one pass, no per-step temporaries


# Training workers on CPU: every thread allocates from the main heap (arena_max=1), which never hands large
# blocks to mmap (mmap_max=0) and keeps up to 1 GiB of free space (trim_threshold), so buffers freed in one
# step are reused by the next without page faults.
CPU_MALLOC_TUNABLES = (
    "glibc.malloc.arena_max=1:glibc.malloc.mmap_max=0:glibc.malloc.trim_threshold=1073741824"
)


@dataclass
class ScaleSection:
    num_workers: int = 64
    use_gpu: bool = True
    cpus_per_worker: float = 8.0  # on CPU keep it below 1 so Ray Data keeps CPUs for ingest
    micro_batch_size: int = 16  # samples per worker per forward
    global_batch_size: int = 1024  # = micro_batch_size * num_workers * gradient accumulation
    precision: str = "bf16"  # "bf16" (GPU) or "fp32" (CPU); fp16 is not supported
    zero_stage: int = 3
    # glibc malloc settings of the training workers: "auto" (CPU_MALLOC_TUNABLES on CPU, glibc's defaults on
    # GPU), "default" (glibc's defaults), or a GLIBC_TUNABLES string. On CPU, glibc serves every large
    # buffer (ZeRO-3's flat gradient partitions, optimizer temporaries) from a fresh mmap whose pages are
    # all faulted in again: 115k page faults and 0.2 s per step on the CPU bench, about 20 with the tunables.
    malloc: str = "auto"

    @property
    def grad_accum(self) -> int:
        return self.global_batch_size // (self.micro_batch_size * self.num_workers)


@dataclass
class ScheduleSection:
    epochs: int = 1
    max_steps: int | None = None  # cap on optimizer steps (the cosine schedule spans the capped run)


@dataclass
class CheckpointSection:
    every_steps: int = 100  # also one at the end of the stage
    keep_last: int = 3
    async_upload: bool = True  # intermediate checkpoints upload in the background (the last one does not)
    max_failures: int = 3  # worker-group restarts from the latest checkpoint before the run fails
    export: bool = True  # consolidated Hugging Face model (safetensors) at stage end, in <run>/export


@dataclass
class MetricsSection:
    log_every: int = 1
    tensorboard: bool = True
    # Peak dense TFLOP/s per device for the MFU estimate; None: known GPUs by name, else 1.0 on CPU.
    peak_tflops: float | None = None
    # Weights & Biases project to log to as well (rank 0, `jobs.metrics.Tracker`); None: off.
    wandb: str | None = None
    # MLflow experiment to log to as well (rank 0; server from MLFLOW_TRACKING_URI); None: off.
    mlflow: str | None = None


@dataclass
class ValidationSection:
    """Evaluation on the held-out rows (``data.val_fraction`` or ``data.val_paths``; see `jobs.validation`)."""

    enabled: bool = True  # evaluate when a held-out set exists
    every_steps: int = 100  # also at the end of the stage
    max_rows: int = 256  # held-out rows evaluated (the first ones, in file then row order)
    num_samples: int = 2  # fixed sample generations logged per evaluation (the first held-out rows)
    sample_max_new_tokens: int = 16  # greedy tokens per sample


@dataclass
class DebugSection:
    # Raise once on rank 0 when this step starts (a fault: the run restarts from the latest checkpoint).
    fail_at_step: int | None = None
    # Raise a TypeError on rank 0 every time this step starts (a bug: the job stops, no restart).
    error_at_step: int | None = None
    # End the run after this many steps (checkpoint saved, no export), as if the job had been stopped.
    stop_after_step: int | None = None


@dataclass
class TrainConfig:
    stage: str = "stage1"
    name: str = ""  # run name (Ray RunConfig name); "" -> the stage name
    # Ray Train storage: <output_dir>/<name>/ holds checkpoints, logs, export; a folder or s3:// / gs://
    output_dir: str = "runs/train"
    seed: int = 0
    data: DataSection = field(default_factory=DataSection)
    model: ModelSection = field(default_factory=ModelSection)
    optim: OptimSection = field(default_factory=OptimSection)
    scale: ScaleSection = field(default_factory=ScaleSection)
    schedule: ScheduleSection = field(default_factory=ScheduleSection)
    checkpoint: CheckpointSection = field(default_factory=CheckpointSection)
    metrics: MetricsSection = field(default_factory=MetricsSection)
    validation: ValidationSection = field(default_factory=ValidationSection)
    debug: DebugSection = field(default_factory=DebugSection)
    storage: StorageConfig = field(default_factory=StorageConfig)  # the object store's endpoint, if any

    @property
    def run_name(self) -> str:
        return self.name or self.stage

    @property
    def output(self) -> Store:
        """`output_dir` on local disk or an object store."""
        return Store.at(self.output_dir, "output_dir", self.storage.endpoint_override)

    @property
    def run_dir(self) -> Store:
        return self.output / self.run_name

    @property
    def export_dir(self) -> Store:
        return self.run_dir / "export"


# ----------------------------------------------------------------------------- stages, profiles, run files
CONFIG_DIR = Path(__file__).resolve().with_name("configs")  # stageN.yaml, profiles/, demo.yaml
PROFILE_DIR = CONFIG_DIR / "profiles"


def profiles() -> list[str]:
    """Names of the shipped profiles (`jobs/configs/profiles/NAME.yaml`)."""
    return sorted(p.stem for p in PROFILE_DIR.glob("*.yaml"))


def recipe(stage: str) -> TrainConfig:
    """The stage's shipped config (`jobs/configs/STAGE.yaml` and its ``base`` chain) with the stage's
    learning rates, before any profile, run file or override; not validated."""
    if stage not in STAGES:
        raise ConfigError(f"stage: unknown stage {stage!r} (choose one of {', '.join(STAGES)})")
    path = CONFIG_DIR / f"{stage}.yaml"
    try:
        cfg: TrainConfig = build(TrainConfig, read_yaml(path, CONFIG_DIR))
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None
    if cfg.stage != stage:
        raise ConfigError(f"{path}: stage: says {cfg.stage!r}, expected {stage!r}")
    cfg.optim.lrs = {**DEFAULT_LRS[stage], **cfg.optim.lrs}
    return cfg


def for_stage(layer: dict[str, Any], stage: str) -> dict[str, Any]:
    """The part of a profile or run file that applies to `stage`: its top-level sections, then its
    ``stageN:`` section for this stage."""
    common = {k: v for k, v in layer.items() if k not in STAGES}
    own = layer.get(stage) or {}
    if not isinstance(own, dict):
        raise ConfigError(f"{stage}: expected a mapping of this stage's changes, got {own!r}")
    return merge(common, own)


def build_config(
    stage: str, profile: str = "cluster", overrides: list[str] | None = None, files: tuple[str | Path, ...] = ()
) -> TrainConfig:
    """The stage's config, then the profile, the run files and the ``--set`` overrides (later wins);
    validated."""
    cfg = recipe(stage)
    if profile not in profiles():
        raise ConfigError(f"profile: unknown profile {profile!r} (choose one of {', '.join(profiles())}: "
                          f"the files in {PROFILE_DIR})")  # fmt: skip
    for path in (PROFILE_DIR / f"{profile}.yaml", *map(Path, files)):
        try:
            update(cfg, for_stage(read_yaml(path, CONFIG_DIR), stage))
        except ConfigError as err:
            raise ConfigError(f"{path}: {err}") from None
    for item in overrides or []:
        apply_override(cfg, item)
    validate(cfg)
    return cfg


# ----------------------------------------------------------------------------- (de)serialisation
def to_dict(cfg: TrainConfig) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def from_dict(data: dict[str, Any]) -> TrainConfig:
    """Strictly rebuild a `TrainConfig` (e.g. from a saved `train_config.json`)."""
    return build(TrainConfig, copy.deepcopy(data))


# train_config.json holds the resolved config plus, under this key, the environment that ran it
# (`breen.envlock.environment`: package versions and the lock's sha256); `load_config` drops it.
ENVIRONMENT_KEY = "environment"


def config_record(cfg: TrainConfig) -> dict[str, Any]:
    """The content of train_config.json: the resolved config and the environment that ran it."""
    from breen.envlock import environment

    return {**to_dict(cfg), ENVIRONMENT_KEY: environment()}


def save_config(cfg: TrainConfig, path: str | Path | Store) -> None:
    Store.at(path).write_json(config_record(cfg))


def load_config(path: str | Path | Store) -> TrainConfig:
    """The `TrainConfig` of a saved ``train_config.json`` (a local path or a URI); a file that is not a
    config (bad JSON, absurd nesting, unknown keys) is a ConfigError naming it."""
    store = Store.at(path)
    try:
        data = json.loads(store.read_bytes())
    except (ValueError, RecursionError) as err:
        raise ConfigError(f"{store}: not a saved training config ({type(err).__name__}: {err})") from None
    return _config_of(store, data)


# ----------------------------------------------------------------------------- the run's config history
# <run_dir>/train_config.json: the config the run's weights started from (written by a fresh start, never
# by a resume); <run_dir>/config_history/NNNN.json: one entry per start or resume of the run, in order,
# {"time", "resumed_from" (checkpoint folder or null), "changes" (`config_changes` vs the entry before),
# "config" (`config_record`)}.
HISTORY_DIR = "config_history"


def history(run_dir: str | Path | Store) -> list[Store]:
    """The run's config history entries, oldest first."""
    folder = Store.at(run_dir) / HISTORY_DIR
    return [folder / n for n in folder.names(".json") if n[:4].isdigit()]


def _config_of(path: Store, data: Any) -> TrainConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: not a saved training config (a JSON {type(data).__name__})")
    data = dict(data)
    data.pop(ENVIRONMENT_KEY, None)
    try:
        return from_dict(data)
    except ConfigError as err:
        raise ConfigError(f"{path}: {err}") from None


def last_recorded(run_dir: str | Path | Store) -> tuple[Store, TrainConfig] | None:
    """(file, config) the run last recorded: its newest history entry, else its ``train_config.json``
    (runs from before the history), else None. An unreadable record is a ConfigError naming the file."""
    run_dir = Store.at(run_dir)
    entries = history(run_dir)
    if entries:
        try:
            entry = json.loads(entries[-1].read_bytes())
        except (ValueError, RecursionError) as err:
            raise ConfigError(
                f"{entries[-1]}: unreadable config history entry ({type(err).__name__})"
            ) from None
        return entries[-1], _config_of(entries[-1], entry.get("config") if isinstance(entry, dict) else None)
    first = run_dir / "train_config.json"
    return (first, load_config(first)) if first.is_file() else None


def record_config(cfg: TrainConfig, *, resumed_from: str | None, changes: list[str]) -> Store:
    """Append `cfg` to its run's config history (returns the entry); a fresh start (`resumed_from` None)
    also writes ``train_config.json``."""
    import time

    record = config_record(cfg)
    run_dir = cfg.run_dir
    entry = run_dir / HISTORY_DIR / f"{len(history(run_dir)):04d}.json"
    entry.write_json({
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "resumed_from": resumed_from,
        "changes": changes, "config": record,
    })  # fmt: skip
    if resumed_from is None:
        (run_dir / "train_config.json").write_json(record)
    return entry


# ----------------------------------------------------------------------------- validation
def validate(cfg: TrainConfig, check_paths: bool = False) -> None:
    """Range and consistency checks (types are checked on assignment). `check_paths`: inputs exist."""

    def need(ok: bool, name: str, why: str) -> None:
        if not ok:
            raise ConfigError(f"{name}: {why}")

    check_finite(cfg)
    s = cfg.scale
    need(cfg.stage in STAGES, "stage", f"must be one of {STAGES}")
    need(bool(cfg.run_name) and "/" not in cfg.run_name, "name", "must be a non-empty name without '/'")
    need(s.num_workers >= 1, "scale.num_workers", "must be >= 1")
    need(s.micro_batch_size >= 1, "scale.micro_batch_size", "must be >= 1")
    need(s.cpus_per_worker > 0, "scale.cpus_per_worker", "must be > 0")
    need(
        s.global_batch_size % (s.micro_batch_size * s.num_workers) == 0 and s.global_batch_size > 0,
        "scale.global_batch_size",
        f"{s.global_batch_size} is not a positive multiple of micro_batch_size x num_workers = "
        f"{s.micro_batch_size} x {s.num_workers}",
    )
    need(s.precision != "fp16", "scale.precision", "fp16 is not supported (use bf16 on GPU, fp32 on CPU)")
    need(s.precision in PRECISIONS, "scale.precision", f"must be one of {PRECISIONS}")
    need(s.zero_stage == 3, "scale.zero_stage", "only ZeRO stage 3 is supported")
    need(
        s.malloc in ("auto", "default")
        or all(re.fullmatch(r"glibc\.[a-z_]+\.[a-z_]+=\w+", t) for t in s.malloc.split(":")),
        "scale.malloc",
        f"{s.malloc!r} is not 'auto', 'default' or a ':'-separated list of glibc.<namespace>.<name>=<value>",
    )
    need(cfg.data.text_field in TEXT_FIELDS, "data.text_field", f"must be one of {TEXT_FIELDS}")
    need(cfg.data.teacher is None or bool(cfg.data.teacher.strip()), "data.teacher", "must be a name or null")
    need(cfg.data.max_length > 0, "data.max_length", "must be > 0")
    need(cfg.data.encode_batch_size > 0, "data.encode_batch_size", "must be > 0")
    need(cfg.data.encode_actors > 0, "data.encode_actors", "must be > 0")
    need(cfg.data.encode_cpus > 0, "data.encode_cpus", "must be > 0")
    need(cfg.data.prefetch_batches >= 1, "data.prefetch_batches", "must be >= 1")
    need(0 <= cfg.data.val_fraction < 1, "data.val_fraction", "must be in [0, 1)")
    need(not (cfg.data.val_paths and cfg.data.val_fraction), "data.val_paths",
         "give either a validation shard set or data.val_fraction, not both")  # fmt: skip
    v = cfg.validation
    need(v.every_steps >= 1, "validation.every_steps", "must be >= 1")
    need(v.max_rows >= 1, "validation.max_rows", "must be >= 1")
    need(0 <= v.num_samples <= v.max_rows, "validation.num_samples", f"must be in [0, max_rows={v.max_rows}]")
    need(v.sample_max_new_tokens >= 1, "validation.sample_max_new_tokens", "must be >= 1")
    need(bool(cfg.optim.lrs), "optim.lrs", "needs at least a 'default' learning rate")
    for name, lr in cfg.optim.lrs.items():
        need(name in COMPONENTS or name == "default", f"optim.lrs.{name}",
             f"unknown component; known: {', '.join(COMPONENTS)} and default")  # fmt: skip
        need(lr > 0, f"optim.lrs.{name}", f"learning rates must be > 0, got {lr}")
    need(0 <= cfg.optim.warmup_ratio < 1, "optim.warmup_ratio", "must be in [0, 1)")
    need(0 <= cfg.optim.min_lr_ratio <= 1, "optim.min_lr_ratio", "must be in [0, 1]")
    need(len(cfg.optim.betas) == 2, "optim.betas", "needs two values")
    for i, beta in enumerate(cfg.optim.betas):
        need(0 <= beta < 1, f"optim.betas[{i}]", f"must be in [0, 1), got {beta}")
    need(cfg.optim.eps > 0, "optim.eps", "must be > 0")
    need(cfg.optim.weight_decay >= 0, "optim.weight_decay", "must be >= 0")
    need(cfg.optim.grad_clip >= 0, "optim.grad_clip", "must be >= 0 (0 disables clipping)")
    need(cfg.metrics.peak_tflops is None or cfg.metrics.peak_tflops > 0, "metrics.peak_tflops", "must be > 0")
    need(cfg.schedule.epochs >= 1, "schedule.epochs", "must be >= 1")
    need(cfg.schedule.max_steps is None or cfg.schedule.max_steps >= 1, "schedule.max_steps", "must be >= 1")
    need(cfg.checkpoint.every_steps >= 1, "checkpoint.every_steps", "must be >= 1")
    need(cfg.checkpoint.keep_last >= 1, "checkpoint.keep_last", "must be >= 1")
    need(cfg.checkpoint.max_failures >= 0, "checkpoint.max_failures", "must be >= 0")
    need(cfg.metrics.log_every >= 1, "metrics.log_every", "must be >= 1")
    need(cfg.metrics.wandb is None or bool(cfg.metrics.wandb.strip()), "metrics.wandb", "must be a project name or null")
    need(cfg.metrics.mlflow is None or bool(cfg.metrics.mlflow.strip()), "metrics.mlflow",
         "must be an experiment name or null")  # fmt: skip
    if check_paths:
        need(bool(cfg.data.paths), "data.paths", "no training-shard directory given (--data)")
        for i, p in enumerate(cfg.data.paths):
            need(scheme(p) is not None or Path(p).is_dir(), f"data.paths[{i}]", f"not a directory: {p}")
        init = cfg.model.init_from
        need(init is not None, "model.init_from", "no initial model given (--init-from DIR or 'tiny')")
        endpoint = cfg.storage.endpoint_override

        def has(folder: str, name: str) -> bool:  # local or on the object store
            return (Store.at(folder, "model.init_from", endpoint) / name).is_file()

        if init != TINY_INIT:
            need(has(init, "config.json"), "model.init_from", f"no config.json in {init}")
        tok = cfg.model.tokenizer or (None if init == TINY_INIT else init)
        if tok is not None:
            need(
                has(tok, "tokenizer_config.json") or has(tok, "tokenizer.json"),
                "model.tokenizer" if cfg.model.tokenizer else "model.init_from",
                f"no tokenizer files in {tok}",
            )


# ----------------------------------------------------------------------------- resume: config changes
# Fields that cannot change what a run computes, so a resumed run may change them freely: where the run
# lives (its folder is the same by construction), how checkpoints are kept and exported (resume is exact),
# logging and evaluation (the held-out rows themselves, ``data.val_*``, are compared: they change the
# training stream), fault injection, and ingest parallelism and resources (the data stream is deterministic
# whatever the timing: `jobs.ingest`). Every other field, `data.paths` and `model.*` included, is compared
# (`config_changes`). A dotted prefix covers its whole section.
RESUME_NEUTRAL = (
    "name", "output_dir", "storage", "checkpoint", "metrics", "validation", "debug",
    "data.encode_batch_size", "data.encode_actors", "data.encode_cpus", "data.prefetch_batches",
    "scale.cpus_per_worker", "scale.malloc",
)  # fmt: skip


def leaves(node: Any, where: str = "") -> dict[str, Any]:
    """{dotted name: leaf} of a `to_dict` tree (lists are leaves)."""
    if not isinstance(node, dict):
        return {where: node}
    out: dict[str, Any] = {}
    for k, v in node.items():
        out.update(leaves(v, f"{where}.{k}" if where else str(k)))
    return out


def config_changes(old: TrainConfig, new: TrainConfig) -> list[str]:
    """``a.b: old -> new`` for every field outside `RESUME_NEUTRAL` where the two configs differ, sorted."""
    before, after = leaves(to_dict(old)), leaves(to_dict(new))
    absent = "<absent>"  # a key of a dict field (optim.lrs) set on one side only
    changes = []
    for key in sorted(before.keys() | after.keys()):
        if any(key == p or key.startswith(p + ".") for p in RESUME_NEUTRAL):
            continue
        a, b = before.get(key, absent), after.get(key, absent)
        if a != b:
            changes.append(f"{key}: {json.dumps(a) if a is not absent else a} -> "
                           f"{json.dumps(b) if b is not absent else b}")  # fmt: skip
    return changes
