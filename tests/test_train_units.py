"""Fast unit tests for the training side (jobs/): config, schedule, stage chaining, ingest, CLI errors.

Everything runs on real training shards written by `jobs.tiny.write_tiny_shards` (well under a second)
and, for the model side, a BREEN directory holding only ``config.json`` and the tiny tokenizer (the driver
never reads weights). One test builds the Ray Data ingest on the session's local Ray (`ray_local`); no
DeepSpeed (end-to-end training is `tests/test_train.py`).

Run:  .venv/bin/python -m pytest tests/test_train_units.py
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from importlib import metadata
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from breen import envlock
from breen import shard_format as sf
from breen.config import BreenConfig
from breen.stages import DEFAULT_LRS, STAGES
from jobs import config as jc
from jobs import driver, ingest, launch, train
from jobs.checkpoint import TrainState, check_same_scale
from jobs.config import ConfigError
from jobs.tiny import tiny_tokenizer, write_tiny_shards
from tests.conftest import with_set

CLIP_DIM = 32
CPU = ["--profile", "cpu"]


# ----------------------------------------------------------------------------- helpers
def flat(d: dict, prefix: str = "") -> dict[str, object]:
    """Nested dict -> {dotted key: leaf} (lists are leaves)."""
    out: dict[str, object] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, dict):
            out.update(flat(v, key))
        else:
            out[key] = v
    return out


def differing_keys(a: jc.TrainConfig, b: jc.TrainConfig) -> set[str]:
    fa, fb = flat(jc.to_dict(a)), flat(jc.to_dict(b))
    return {k for k in fa.keys() | fb.keys() if fa.get(k, "<absent>") != fb.get(k, "<absent>")}


def rewrite(
    path: Path,
    *,
    drop: tuple[str, ...] = (),
    teacher: str | None = None,
    replace: dict[str, pa.Array] | None = None,
    meta: dict[str, str | None] | None = None,
) -> None:
    """Rewrite one shard file in place: without some columns, with another `breen.teacher`, columns
    replaced (name -> array) and/or metadata keys set (None removes one). Its stats' size and sha256
    follow when the stats list the file (as the data pipeline writes them)."""
    table = pq.read_table(path)
    md = dict(table.schema.metadata or {})
    table = table.drop_columns(list(drop)) if drop else table
    for name, array in (replace or {}).items():
        table = table.set_column(table.schema.get_field_index(name), name, array)
    if teacher is not None:
        md[b"breen.teacher"] = teacher.encode()
    for key, value in (meta or {}).items():
        md.pop(key.encode(), None) if value is None else md.__setitem__(key.encode(), value.encode())
    pq.write_table(table.replace_schema_metadata(md), path)
    stats = json.loads(stats_file(path).read_text())
    if path.name in stats.get("files", {}):
        record_in_stats(path)


def stats_file(path: Path) -> Path:
    return path.with_name(path.name.replace(".parquet", ".stats.json"))


def record_in_stats(path: Path) -> None:
    """Record the file's size and sha256 in its shard's stats (``files``), as the data pipeline does."""
    stats = json.loads(stats_file(path).read_text())
    entry = {"bytes": path.stat().st_size, "sha256": hashlib.sha256(path.read_bytes()).hexdigest()}
    stats.setdefault("files", {})[path.name] = entry
    stats_file(path).write_text(json.dumps(stats))


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory) -> Path:
    """A BREEN directory as the driver sees it: config.json + tokenizer (no weights needed)."""
    out = tmp_path_factory.mktemp("init")
    BreenConfig.preset("tiny", clip_dim=CLIP_DIM).save_pretrained(out)
    tiny_tokenizer().save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def model_config(init_dir) -> BreenConfig:
    return BreenConfig.from_pretrained(init_dir)


@pytest.fixture
def shards(tmp_path) -> Path:
    """20 caption rows in files of 8, 8, 4 rows."""
    return write_tiny_shards(tmp_path / "shards", 20, clip_dim=CLIP_DIM, rows_per_file=8)


# ============================================================================= jobs.config
def test_stage2_is_stage1_plus_the_documented_changes():
    s1, s2 = jc.recipe("stage1"), jc.recipe("stage2")
    assert differing_keys(s1, s2) == {
        "stage",
        "optim.lrs.patch_embed",  # stage 2: one learning rate for everything
        "optim.warmup_ratio",
        "checkpoint.every_steps",
    }
    assert s2.optim.lrs == DEFAULT_LRS["stage2"] and s2.optim.warmup_ratio == 0.01
    assert s2.checkpoint.every_steps == 200


def test_stage3_is_stage2_plus_the_documented_changes():
    s2, s3 = jc.recipe("stage2"), jc.recipe("stage3")
    assert differing_keys(s2, s3) == {
        "stage",
        "data.text_field",
        "data.group_by_modality",
        "optim.lrs.default",
        "scale.num_workers",
        "scale.micro_batch_size",
        "scale.global_batch_size",
    }
    assert s3.data.text_field == "conversations" and s3.data.group_by_modality
    assert s3.optim.lrs == DEFAULT_LRS["stage3"]
    assert (s3.scale.num_workers, s3.scale.micro_batch_size) == (32, 8)


@pytest.mark.parametrize(("stage", "global_batch"), [("stage1", 1024), ("stage2", 1024), ("stage3", 256)])
def test_full_scale_global_batch_and_accumulation(stage, global_batch):
    full = jc.build_config(stage)
    s = full.scale
    assert s.global_batch_size == global_batch
    assert s.micro_batch_size * s.num_workers * s.grad_accum == global_batch and s.grad_accum == 1
    # 8 workers: same global batch, more accumulation
    eight = jc.build_config(stage, overrides=["scale.num_workers=8"]).scale
    assert eight.global_batch_size == global_batch
    assert eight.grad_accum == global_batch // (eight.micro_batch_size * 8)
    assert eight.grad_accum == {"stage3": 4}.get(stage, 8)


def test_dotted_overrides_parse_typed_values():
    cfg = jc.build_config(
        "stage1",
        overrides=[
            "scale.num_workers=8",
            "scale.cpus_per_worker=2",
            "scale.use_gpu=false",
            "optim.lrs.patch_embed=1e-4",
            "optim.warmup_ratio=0.05",
            "optim.betas=[0.8, 0.95]",
            "data.paths=a,b",
            "data.teacher=ViT-L-14-336",
            "schedule.max_steps=null",
            "debug.fail_at_step=3",
            "model.attn_implementation=sdpa",
        ],
    )
    assert cfg.scale.num_workers == 8 and type(cfg.scale.num_workers) is int
    assert cfg.scale.cpus_per_worker == 2.0 and type(cfg.scale.cpus_per_worker) is float
    assert cfg.scale.use_gpu is False
    assert cfg.optim.lrs == {"default": 4e-5, "patch_embed": 1e-4}
    assert type(cfg.optim.lrs["patch_embed"]) is float
    assert cfg.optim.warmup_ratio == 0.05 and cfg.optim.betas == [0.8, 0.95]
    assert cfg.data.paths == ["a", "b"]
    assert cfg.data.teacher == "ViT-L-14-336"
    assert cfg.schedule.max_steps is None and cfg.debug.fail_at_step == 3
    assert cfg.model.attn_implementation == "sdpa"
    assert jc.recipe("stage1").data.teacher is None  # default: any single teacher


@pytest.mark.parametrize(
    ("override", "field", "why"),
    [
        ("scale.num_worker=8", "scale.num_worker", "unknown key"),
        ("scale.num_workers=eight", "scale.num_workers", "integer"),
        ("scale.use_gpu=1", "scale.use_gpu", "true/false"),
        ("optim.warmup_ratio=fast", "optim.warmup_ratio", "number"),
        ("data.paths=7", "data.paths", "list"),
        ("model.gradient_checkpointing.x=1", "model.gradient_checkpointing.x", "not a section"),
        ("scale.global_batch_size=1000", "scale.global_batch_size", "not a positive multiple"),
        ("data.teacher=' '", "data.teacher", "name"),
        ("scale.num_workers", "scale.num_workers", "KEY=VALUE"),
        ("scale.malloc=fast", "scale.malloc", "glibc.<namespace>.<name>=<value>"),
        ("scale.malloc='glibc.malloc.arena_max=1;rm'", "scale.malloc", "not 'auto', 'default'"),
    ],
)
def test_bad_overrides_raise_config_error_naming_the_field(override, field, why):
    with pytest.raises(ConfigError) as err:
        jc.build_config("stage1", overrides=[override])
    assert field in str(err.value) and why in str(err.value), str(err.value)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optim.lrs.default=inf", "optim.lrs.default: must be a finite number, got inf"),
        ("optim.lrs.patch_embed=nan", "optim.lrs.patch_embed: must be a finite number, got nan"),
        ("optim.lrs.default=-.inf", "optim.lrs.default: must be a finite number, got -inf"),
        ("optim.warmup_ratio=.nan", "optim.warmup_ratio: must be a finite number, got nan"),
        ("optim.betas=[0.9, .inf]", "optim.betas[1]: must be a finite number, got inf"),
        ("optim.grad_clip=1e400", "optim.grad_clip: must be a finite number, got inf"),
        ("scale.cpus_per_worker=inf", "scale.cpus_per_worker: must be a finite number, got inf"),
        ("data.encode_cpus=nan", "data.encode_cpus: must be a finite number, got nan"),
        ("metrics.peak_tflops=inf", "metrics.peak_tflops: must be a finite number, got inf"),
        ("optim.lrs.default=0", "optim.lrs.default: learning rates must be > 0, got 0.0"),
        ("optim.lrs.patch_embed=-4e-4", "optim.lrs.patch_embed: learning rates must be > 0, got -0.0004"),
        ("optim.betas=[0.9, 1.0]", "optim.betas[1]: must be in [0, 1), got 1.0"),
        ("optim.eps=0", "optim.eps: must be > 0"),
        ("optim.min_lr_ratio=1.5", "optim.min_lr_ratio: must be in [0, 1]"),
        ("optim.warmup_ratio=-0.1", "optim.warmup_ratio: must be in [0, 1)"),
        ("metrics.peak_tflops=-1", "metrics.peak_tflops: must be > 0"),
    ],
)
def test_float_values_must_be_finite_and_in_range(override, message):
    with pytest.raises(ConfigError) as err:
        jc.build_config("stage1", "cpu", [override])
    assert str(err.value) == message


def test_absurdly_nested_values_are_config_errors_naming_the_field_or_file(tmp_path, capsys):
    for deep in ("[" * 5000 + "]" * 5000, "{a: " * 3000 + "1" + "}" * 3000):
        with pytest.raises(ConfigError, match=r"^optim\.lrs\.default: value nested too deeply to parse"):
            jc.build_config("stage1", "cpu", [f"optim.lrs.default={deep}"])
    code, err = run_main(stage1_argv(tmp_path, tmp_path, "tiny", "data.paths=" + "[" * 5000), capsys)
    assert code == 2 and "config error: data.paths: value nested too deeply to parse" in err, err[-500:]
    saved = tmp_path / "train_config.json"
    saved.write_text('{"optim": ' + "[" * 100000 + "]" * 100000 + "}")
    with pytest.raises(ConfigError) as err:
        jc.load_config(saved)
    assert str(err.value).startswith(f"{saved}: not a saved training config (RecursionError")


def test_config_changes_name_every_field_that_can_change_the_weights():
    old = jc.build_config("stage1", "cpu")
    new = jc.build_config("stage1", "cpu", [
        "seed=1", "optim.lrs.patch_embed=0.375", "optim.lrs.image_experts=1e-4", "schedule.max_steps=5",
        "data.max_length=100", "data.paths=/elsewhere",
        # cannot change the weights: where the run lives, checkpoints, logging, faults, ingest parallelism
        "output_dir=/other", "checkpoint.every_steps=5", "checkpoint.keep_last=9", "metrics.log_every=3",
        "debug.stop_after_step=2", "data.encode_actors=3", "data.prefetch_batches=7", "scale.cpus_per_worker=0.25",
        "storage.endpoint_override=127.0.0.1:9",
    ])  # fmt: skip
    assert jc.config_changes(old, new) == [
        "data.max_length: 4096 -> 100",
        'data.paths: [] -> ["/elsewhere"]',
        "optim.lrs.image_experts: <absent> -> 0.0001",
        "optim.lrs.patch_embed: 0.0004 -> 0.375",
        "schedule.max_steps: null -> 5",
        "seed: 0 -> 1",
    ]
    assert jc.config_changes(old, jc.build_config("stage1", "cpu")) == []
    flat_keys = set(flat(jc.to_dict(old)))  # every neutral prefix names a real field or section
    assert all(any(k == p or k.startswith(p + ".") for k in flat_keys) for p in jc.RESUME_NEUTRAL)


def test_inconsistent_batch_in_a_profile_stage_is_rejected():
    # cpu profile: 2 workers x micro 2; a global batch of 6 is no multiple of 4
    with pytest.raises(ConfigError, match=r"scale\.global_batch_size: 6 is not"):
        jc.build_config("stage3", "cpu", ["scale.global_batch_size=6"])


def test_resolved_config_round_trips_through_save_config(tmp_path):
    cfg = jc.build_config(
        "stage3", "cpu", ["data.paths=x,y", "optim.lrs.patch_embed=3e-4", "data.teacher=ViT-L-14-336"]
    )
    path = tmp_path / "deep" / "train_config.json"
    jc.save_config(cfg, path)
    record = json.loads(path.read_text())
    environment = record.pop(jc.ENVIRONMENT_KEY)
    assert record == jc.to_dict(cfg)
    assert environment["lock_sha256"] == envlock.lock_sha256() != "unlocked"  # make install stamps it
    assert environment["transformers"] == metadata.version("transformers")
    assert jc.load_config(path) == cfg
    assert jc.from_dict(jc.to_dict(cfg)) == cfg
    assert not list(path.parent.glob(".*.tmp"))  # atomic write leaves no temporary file
    bad = jc.to_dict(cfg)
    bad["data"]["bogus"] = 1
    with pytest.raises(ConfigError, match=r"data\.bogus: unknown key"):
        jc.from_dict(bad)
    old = jc.to_dict(cfg)
    del old["data"]["teacher"]  # a train_config.json written before data.teacher existed
    assert jc.from_dict(old).data.teacher is None


# ============================================================================= jobs.train: schedule
@pytest.mark.parametrize(
    ("warmup_ratio", "min_lr_ratio"), [(0.03, 0.0), (0.1, 0.0), (0.1, 0.1), (0.0, 0.0), (0.2, 0.25)]
)
def test_lr_factor_matches_transformers_cosine_with_warmup(warmup_ratio, min_lr_ratio):
    import torch
    from transformers import get_cosine_schedule_with_warmup, get_cosine_with_min_lr_schedule_with_warmup

    total = 50
    warmup = math.ceil(warmup_ratio * total)  # as transformers' TrainingArguments.get_warmup_steps
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    if min_lr_ratio:
        sched = get_cosine_with_min_lr_schedule_with_warmup(opt, warmup, total, min_lr_rate=min_lr_ratio)
    else:
        sched = get_cosine_schedule_with_warmup(opt, warmup, total)
    ours, theirs = [], []
    for step in range(total):
        theirs.append(opt.param_groups[0]["lr"])
        ours.append(train.lr_factor(step, total, warmup_ratio, min_lr_ratio))
        opt.step()
        sched.step()
    np.testing.assert_allclose(ours, theirs, rtol=1e-12, atol=1e-12)
    rising, falling = ours[: warmup + 1], ours[warmup:]
    assert ours[0] == (0.0 if warmup else 1.0)
    assert all(a < b for a, b in itertools.pairwise(rising)) and rising[-1] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(falling))  # cosine decay
    assert min_lr_ratio <= ours[-1] < min_lr_ratio + 0.01
    assert train.lr_factor(total, total, warmup_ratio, min_lr_ratio) == pytest.approx(min_lr_ratio)


# ============================================================================= jobs.train: chaining
def test_chain_configs_scoped_overrides_and_init_chain(tmp_path):
    out = str(tmp_path / "runs")
    cfgs = launch.chain_configs(
        list(STAGES), data=["d1", "d2"], sft_data=["s"], init_from="tiny", output_dir=out,
        profile="cpu", overrides=["stage2.schedule.max_steps=3", "seed=7", "stage3.optim.lrs.default=1e-5"],
        name="ignored-for-a-chain",
    )  # fmt: skip
    assert [c.stage for c in cfgs] == list(STAGES)
    assert [c.schedule.max_steps for c in cfgs] == [None, 3, None]
    assert [c.optim.lrs["default"] for c in cfgs] == [4e-5, 4e-5, 1e-5]
    assert all(c.seed == 7 and c.output_dir == out for c in cfgs)
    assert [c.run_name for c in cfgs] == list(STAGES)
    assert cfgs[0].model.init_from == "tiny"
    assert cfgs[1].model.init_from == str(cfgs[0].export_dir) == str(Path(out, "stage1", "export"))
    assert cfgs[2].model.init_from == str(cfgs[1].export_dir) == str(Path(out, "stage2", "export"))
    assert cfgs[0].data.paths == cfgs[1].data.paths == ["d1", "d2"] and cfgs[2].data.paths == ["s"]
    assert cfgs[2].scale.global_batch_size == 4  # the cpu profile's stage-3 entry


def test_chain_configs_lone_stage_defaults_to_the_previous_export(tmp_path):
    out = str(tmp_path / "runs")
    kw = dict(data=["d"], sft_data=["s"], output_dir=out, profile="cpu", overrides=[])
    (s2,) = launch.chain_configs(["stage2"], init_from=None, **kw)
    assert s2.model.init_from == str(Path(out) / "stage1" / "export")
    (s3,) = launch.chain_configs(["stage3"], init_from=None, name="sft-a", **kw)
    assert s3.model.init_from == str(Path(out) / "stage2" / "export") and s3.run_name == "sft-a"
    (given,) = launch.chain_configs(["stage2"], init_from="/models/x", **kw)
    assert given.model.init_from == "/models/x"
    (s1,) = launch.chain_configs(["stage1"], init_from=None, **kw)
    assert s1.model.init_from is None  # stage 1 has no previous stage: main reports it (model.init_from)
    with pytest.raises(ConfigError, match=r"scale\.num_worker"):
        launch.chain_configs(["stage2"], init_from=None, **{**kw, "overrides": ["stage2.scale.num_worker=1"]})


def test_check_same_scale():
    cfg = jc.build_config("stage1", "cpu")
    state = TrainState(num_workers=2, micro_batch_size=2, global_batch_size=8)
    check_same_scale(state, cfg, world=2)
    with pytest.raises(ConfigError, match=r"scale\.num_workers.*\(4, 2, 8\).*\(2, 2, 8\)"):
        check_same_scale(state, cfg, world=4)


def test_step_stats_travel_as_one_vector_and_give_the_step_metrics():
    """`StepStats`: named sums (a replayed micro-batch, weight 0, adds nothing), rejected samples per
    reason; the one all_reduce sends them as one vector (fields, then REJECT_REASONS in order)."""
    import types

    import torch

    from jobs.metrics import StepStats

    out = types.SimpleNamespace(loss=torch.tensor(2.0), lm_loss=torch.tensor(1.5),
                                align_loss_fine=torch.tensor(0.5), align_loss_coarse=torch.tensor(0.25))  # fmt: skip
    batch = {"attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]), "align_mask": torch.tensor([1, 0]),
             "input_ids": torch.zeros(2, 4, dtype=torch.long)}  # fmt: skip
    model_config = types.SimpleNamespace(flops_per_token=lambda n: 10 * n)
    stats = StepStats()
    stats.add(out, batch, 1.0, model_config)
    stats.add(out, batch, 0.0, model_config)
    stats.add_rejected(torch.tensor([-1, 2, 2, 0]))
    assert (stats.samples, stats.tokens, stats.flops, stats.padded_tokens) == (2, 5, 130, 8)
    assert stats.rejected == {ingest.REJECT_REASONS[2]: 2, ingest.REJECT_REASONS[0]: 1}
    vector = stats.to_vector()
    assert len(vector) == 10 + len(ingest.REJECT_REASONS) and vector[10 + 2] == 2
    assert StepStats.from_vector(vector) == stats
    assert stats.record() == {"loss": 2.0, "lm_loss": 1.5, "align_fine": 0.5, "align_coarse": 0.25,
                              "samples": 2, "tokens": 5, "padding": 1 - 5 / 8}  # fmt: skip


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


# ============================================================================= jobs.ingest: shard files
def test_list_shards_reads_footers_and_honours_done_markers(tmp_path, shards):
    files = ingest.list_shards([shards])
    assert [Path(f.path).name for f in files] == [
        "part-00000.parquet",
        "part-00001.parquet",
        "part-00002.parquet",
    ]
    assert [f.rows for f in files] == [8, 8, 4] and ingest.total_rows(files) == 20
    assert all(f.clip_dim == CLIP_DIM for f in files)
    assert files[0].teacher == ("synthetic", "random:0", "none")
    assert {"key", "image", "caption", "fine", "coarse"} <= set(files[0].columns)

    (shards / "part-00001.done").unlink()  # an unfinished file (markers exist) is left out
    assert [Path(f.path).name for f in ingest.list_shards([shards])] == [
        "part-00000.parquet",
        "part-00002.parquet",
    ]
    for marker in shards.glob("part-*.done"):  # no markers at all: every file counts
        marker.unlink()
    assert len(ingest.list_shards([shards])) == 3

    other = write_tiny_shards(tmp_path / "a-other", 4, clip_dim=CLIP_DIM)
    both = ingest.list_shards([shards, other])  # directory order, then name
    assert [Path(f.path).parent for f in both] == [shards] * 3 + [other]


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_list_shards_without_shards_names_the_directory(tmp_path, kind):
    d = tmp_path / "nothing-here"
    if kind == "empty":
        d.mkdir()
        (d / "part-00000.txt").write_text("")
    with pytest.raises(FileNotFoundError, match=r"part-\*\.parquet") as err:
        ingest.list_shards([d])
    assert str(d) in str(err.value)


def test_check_shards_accepts_matching_shards(tmp_path, shards, model_config):
    files = ingest.list_shards([shards])
    ingest.check_shards(files, model_config, "caption")
    ingest.check_shards(files, model_config, "caption", teacher="synthetic")
    ingest.check_shards(files, model_config, "auto")
    sft = ingest.list_shards([write_tiny_shards(tmp_path / "sft", 6, clip_dim=CLIP_DIM, sft=True)])
    ingest.check_shards(sft, model_config, "conversations", teacher="synthetic")


def test_check_shards_teacher_width_differs_from_clip_dim(tmp_path, model_config):
    files = ingest.list_shards([write_tiny_shards(tmp_path / "wide", 10, clip_dim=16, rows_per_file=8)])
    with pytest.raises(ValueError, match=r"data\.paths") as err:
        ingest.check_shards(files, model_config, "caption")
    msg = str(err.value)
    assert files[0].path in msg and "width 16" in msg and f"clip_dim is {CLIP_DIM}" in msg


def test_check_shards_different_teachers(tmp_path, shards, model_config):
    other = write_tiny_shards(tmp_path / "other", 8, clip_dim=CLIP_DIM, seed=1)  # weights id random:1
    files = ingest.list_shards([shards, other])
    with pytest.raises(ValueError, match=r"data\.paths: shards come from different teachers") as err:
        ingest.check_shards(files, model_config, "caption")
    assert str(other / "part-00000.parquet") in str(err.value) and "random:1" in str(err.value)


def test_check_shards_data_teacher_names_field_and_first_offending_file(tmp_path, shards, model_config):
    files = ingest.list_shards([shards])
    with pytest.raises(ValueError) as err:
        ingest.check_shards(files, model_config, "caption", teacher="ViT-L-14-336")
    msg = str(err.value)
    assert msg.startswith("data.teacher='ViT-L-14-336'") and files[0].path in msg and "'synthetic'" in msg

    rewrite(shards / "part-00001.parquet", teacher="EVA-CLIP")  # only the second file differs
    files = ingest.list_shards([shards])
    with pytest.raises(ValueError, match=r"data\.teacher='synthetic'") as err:
        ingest.check_shards(files, model_config, "caption", teacher="synthetic")
    assert files[1].path in str(err.value) and files[0].path not in str(err.value)
    assert "'EVA-CLIP'" in str(err.value)


def test_check_shards_missing_text_or_target_columns(tmp_path, shards, model_config):
    files = ingest.list_shards([shards])
    with pytest.raises(ValueError, match=r"data\.text_field=conversations") as err:
        ingest.check_shards(files, model_config, "conversations")
    assert files[0].path in str(err.value)

    rewrite(shards / "part-00002.parquet", drop=("fine", "coarse"))
    files = ingest.list_shards([shards])
    assert files[2].clip_dim is None
    with pytest.raises(ValueError, match=r"data\.text_field=caption") as err:
        ingest.check_shards(files, model_config, "caption")
    assert files[2].path in str(err.value) and "fine/coarse" in str(err.value)
    ingest.check_shards(files, model_config, "auto")  # SFT-style data may lack targets

    rewrite(shards / "part-00001.parquet", drop=("caption",))
    with pytest.raises(ValueError, match=r"data\.text_field=caption") as err:
        ingest.check_shards(ingest.list_shards([shards]), model_config, "caption")
    assert str(shards / "part-00001.parquet") in str(err.value) and "caption column" in str(err.value)


def fine_like(path: Path, tokens: int, dim: int, dtype=np.float16) -> pa.Array:
    n = pq.read_metadata(path).num_rows
    return sf.tensor_array(np.zeros((n, tokens, dim), dtype)) if dtype == np.float16 else pa.ExtensionArray.from_storage(
        pa.fixed_shape_tensor(pa.from_numpy_dtype(dtype), [tokens, dim]),
        pa.FixedSizeListArray.from_arrays(pa.array(np.zeros(n * tokens * dim, dtype)), tokens * dim),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("column", "make", "problem"),
    [
        ("fine", lambda p: fine_like(p, 64, CLIP_DIM).storage, "column 'fine' is fixed_size_list<element: halffloat>[2048], "
         "the shard format wants fixed_shape_tensor<halffloat>[64, D]"),
        ("fine", lambda p: fine_like(p, 64, CLIP_DIM, np.float32), "column 'fine' is fixed_shape_tensor<float>[64, 32], "
         "the shard format wants fixed_shape_tensor<halffloat>[64, D]"),
        ("coarse", lambda p: fine_like(p, 64, CLIP_DIM), "column 'coarse' is fixed_shape_tensor<halffloat>[64, 32], "
         "the shard format wants fixed_shape_tensor<halffloat>[36, D]"),
        ("coarse", lambda p: fine_like(p, 36, 16), "columns 'fine' and 'coarse' have different widths [16, 32]"),
        ("caption", lambda p: pa.array(range(pq.read_metadata(p).num_rows)),
         "column 'caption' is int64, the shard format wants string"),
        ("image", lambda p: pa.array(["x"] * pq.read_metadata(p).num_rows),
         "column 'image' is string, the shard format wants binary"),
    ],
)  # fmt: skip
def test_check_shards_rejects_columns_of_the_wrong_type_or_width(shards, model_config, column, make, problem):
    """Before: such files passed and crashed the ingest worker after training had started."""
    target = shards / "part-00001.parquet"
    rewrite(target, replace={column: make(target)})
    files = ingest.list_shards([shards])
    with pytest.raises(ingest.ShardError) as err:
        ingest.check_shards(files, model_config, "auto")
    assert str(err.value) == f"data.paths: {target}: {problem}"


def test_check_shards_rejects_a_tensor_column_without_its_partner(shards, model_config):
    rewrite(shards / "part-00000.parquet", drop=("coarse",))
    with pytest.raises(ingest.ShardError, match=r"part-00000\.parquet: column 'fine' without 'coarse'"):
        ingest.check_shards(ingest.list_shards([shards]), model_config, "auto")


def test_check_shards_one_dataset_fingerprint_per_directory(tmp_path, shards, model_config):
    ingest.check_shards(
        ingest.list_shards([shards]), model_config, "caption"
    )  # none at all: an older dataset
    for f in sorted(shards.glob("part-*.parquet")):
        rewrite(f, meta={"breen.fingerprint": "aaaa"})
    files = ingest.list_shards([shards])
    assert {f.fingerprint for f in files} == {"aaaa"}
    ingest.check_shards(files, model_config, "caption")
    other = write_tiny_shards(tmp_path / "other", 8, clip_dim=CLIP_DIM)  # another directory, another dataset
    for f in sorted(other.glob("part-*.parquet")):
        rewrite(f, meta={"breen.fingerprint": "cccc"})
    ingest.check_shards(ingest.list_shards([shards, other]), model_config, "caption")

    first, second = shards / "part-00000.parquet", shards / "part-00002.parquet"
    for value, shown in (("bbbb", "bbbb"), (None, "none")):
        rewrite(second, meta={"breen.fingerprint": value})
        with pytest.raises(ingest.ShardError) as err:
            ingest.check_shards(ingest.list_shards([shards, other]), model_config, "caption")
        assert str(err.value) == (
            f"data.paths: {shards} mixes datasets: {first} has fingerprint aaaa but {second} has {shown} "
            "(redo the shards step)"
        )


def test_list_shards_compares_sizes_with_the_stats_and_names_a_truncated_file(
    tmp_path, shards, init_dir, capsys
):
    for f in sorted(shards.glob("part-*.parquet")):
        record_in_stats(f)
    files = ingest.list_shards([shards])
    assert [f.size for f in files] == [p.stat().st_size for p in sorted(shards.glob("part-*.parquet"))]
    assert files[1].sha256 == json.loads(stats_file(shards / "part-00001.parquet").read_text())["files"][
        "part-00001.parquet"]["sha256"]  # fmt: skip
    target = shards / "part-00001.parquet"
    size = target.stat().st_size
    with open(target, "r+b") as f:
        f.truncate(size // 2)
    want = (f"data.paths[0]: {target} is {size // 2} bytes, its stats (part-00001.stats.json) say {size} (truncated "
            "or replaced: redo the shards step)")  # fmt: skip
    with pytest.raises(ingest.ShardError) as err:
        ingest.list_shards([shards])
    assert str(err.value) == want
    code, err_text = run_main(stage1_argv(tmp_path, shards, init_dir), capsys)  # fails before Ray starts
    assert code == 2 and f"config error: {want}" in err_text, err_text
    # An older dataset (stats without files): the unreadable footer is still named.
    stats = json.loads(stats_file(target).read_text())
    del stats["files"]
    stats_file(target).write_text(json.dumps(stats))
    with pytest.raises(ingest.ShardError) as err:
        ingest.list_shards([shards])
    assert str(err.value).startswith(f"data.paths[0]: {target}: not a readable Parquet file (")


def test_the_ingest_worker_checks_sha256_and_names_the_file_it_cannot_read(tmp_path, init_dir, model_config):
    """The actor's per-file work (`ReadEncode.encode_file`, what Ray Data runs), called directly."""
    d = write_tiny_shards(tmp_path / "ref", 8, clip_dim=CLIP_DIM, rows_per_file=8, referenced=True)
    target = d / "part-00000.parquet"
    record_in_stats(target)
    enc = ingest.ReadEncode(str(init_dir), model_config.to_dict(), "caption", 512, seed=0, chunk_rows=4)
    (item,) = ingest.epoch_plan(ingest.list_shards([d]), seed=0, epochs=1)
    assert item["sha256"] == hashlib.sha256(target.read_bytes()).hexdigest()
    assert sum(len(c["pos"]) for c in enc.encode_file(item)) == 8

    data = bytearray(target.read_bytes())  # same size, one byte changed: only the checksum can tell
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(ingest.ShardError) as err:
        list(enc.encode_file(item))
    assert str(err.value).startswith(f"{target}: sha256 ") and "but its stats say" in str(err.value)

    with open(target, "r+b") as f:  # truncated, no checksum known (an older dataset)
        f.truncate(100)
    with pytest.raises(ingest.ShardError) as err:
        list(enc.encode_file({**item, "sha256": ""}))
    assert str(err.value).startswith(f"{target}: not a readable Parquet file (")

    d2 = write_tiny_shards(tmp_path / "ref2", 8, clip_dim=CLIP_DIM, rows_per_file=8, referenced=True)
    (item2,) = ingest.epoch_plan(ingest.list_shards([d2]), seed=0, epochs=1)
    for image_shard in (tmp_path / "ref2-images").glob("*.parquet"):
        image_shard.write_bytes(b"not parquet")
    with pytest.raises(ingest.ShardError) as err:
        list(enc.encode_file(item2))
    assert str(err.value).startswith(f"{d2 / 'part-00000.parquet'}: its referenced images cannot be read (")


# ============================================================================= jobs.ingest: epoch order
def positions(items: list[dict]) -> list[int]:
    return [p for it in items for p in range(it["first_pos"] + it["skip"], it["first_pos"] + it["rows"])]


def test_epoch_plan_covers_each_epoch_and_skip_drops_exactly_the_consumed_positions(tmp_path, shards):
    files = ingest.list_shards([shards, write_tiny_shards(tmp_path / "b", 7, clip_dim=CLIP_DIM)])
    total = ingest.total_rows(files)
    assert total == 27
    full = ingest.epoch_plan(files, seed=3, epochs=2)
    assert positions(full) == list(range(2 * total)) and len(full) == 2 * len(files)
    for epoch in range(2):
        mine = [it for it in full if it["epoch"] == epoch]
        assert sorted(it["file_index"] for it in mine) == list(range(len(files)))
        order = ingest.file_order(len(files), 3, epoch)
        assert [it["file_index"] for it in mine] == order.tolist()
    for skip in (1, 5, 8, 16, 26, 27, 30, 53):
        items = ingest.epoch_plan(files, seed=3, epochs=2, skip=skip)
        assert positions(items) == list(range(skip, 2 * total)), skip
        assert all(0 <= it["skip"] < it["rows"] for it in items)
        assert [it["skip"] for it in items[1:]] == [0] * (len(items) - 1)  # only the first file is sliced
        tail = full[len(full) - len(items) :]
        assert [{**a, "skip": 0} for a in items] == [{**b, "skip": 0} for b in tail]
    assert ingest.epoch_plan(files, seed=3, epochs=2, skip=2 * total) == []


@pytest.mark.parametrize(("num_rows", "n_image", "group"), [(40, 13, 4), (37, 20, 4), (24, 24, 8), (9, 0, 4)])
def test_row_order_groups_by_modality(num_rows, n_image, group):
    rng = np.random.default_rng(num_rows)
    has_image = np.zeros(num_rows, bool)
    has_image[rng.choice(num_rows, n_image, replace=False)] = True
    order = ingest.row_order(num_rows, 5, 1, 2, has_image, group)
    assert sorted(order.tolist()) == list(range(num_rows))
    chunks = [has_image[order[i : i + group]] for i in range(0, num_rows, group)]
    mixed = [i for i, c in enumerate(chunks) if c.any() and not c.all()]
    assert len(mixed) <= 1
    if mixed:  # the mixed group comes after every full single-modality group
        assert mixed[0] == (n_image // group) + ((num_rows - n_image) // group)
    full = [c for c in chunks if len(c) == group]
    assert len([c for c in full if c.all() or not c.any()]) >= len(full) - 1
    assert np.array_equal(order, ingest.row_order(num_rows, 5, 1, 2, has_image, group))  # deterministic
    plain = ingest.row_order(num_rows, 5, 1, 2)
    assert sorted(plain.tolist()) == list(range(num_rows))
    assert not np.array_equal(plain, ingest.row_order(num_rows, 5, 2, 2))  # another epoch, another order


@pytest.mark.parametrize(("world", "accum", "micro_batch"), [(1, 1, 4), (3, 2, 4), (4, 3, 2)])
def test_expected_pos_matches_the_round_robin_layout(world, accum, micro_batch):
    steps = 4
    stream = np.arange(steps * accum * world * micro_batch)
    blocks = [stream[i : i + micro_batch] for i in range(0, len(stream), micro_batch)]
    dealt = {r: blocks[r::world] for r in range(world)}  # streaming_split(equal) deals blocks round robin
    for step in range(steps):
        seen = []
        for rank in range(world):
            for micro in range(accum):
                block = dealt[rank][step * accum + micro]
                assert ingest.expected_pos(step, micro, rank, world, micro_batch, accum) == block[0]
                seen += block.tolist()
        glob = accum * world * micro_batch  # a step consumes exactly one global batch
        assert sorted(seen) == list(range(step * glob, (step + 1) * glob))


# ============================================================================= jobs.ingest: the dataset
def expected_rows(files, seed, epochs, skip, group_size) -> list[dict]:
    """Per position: the source row (file, index) the addressable order says it holds."""
    out = []
    for it in ingest.epoch_plan(files, seed, epochs, skip):
        table = pq.read_table(it["path"], columns=["key", "image"])
        has_image = ~table.column("image").is_null().to_numpy(zero_copy_only=False)
        order = ingest.row_order(
            it["rows"], seed, it["epoch"], it["file_index"], has_image if group_size else None, group_size
        )
        keys = table.column("key").to_pylist()
        for lo in range(it["skip"], it["rows"]):
            row = int(order[lo])
            out.append({"pos": it["first_pos"] + lo, "key": keys[row], "path": it["path"], "row": row,
                        "image": bool(has_image[row])})  # fmt: skip
    return out


def run_ingest(files, init_dir, model_config, *, seed, skip=0):
    ds = ingest.build_dataset(
        files, tokenizer_dir=str(init_dir), model_config=model_config.to_dict(), text_field="auto",
        max_length=512, seed=seed, epochs=2, micro_batch_size=4, group_by_modality=True, skip=skip,
        encode_actors=1, encode_cpus=0.5, chunk_rows=8,
    )  # fmt: skip
    ds.context.execution_options = ingest.ingest_options()  # as the trainer's DataConfig
    ds.context.enable_progress_bars = False
    cols = ["pos", "key", "ok", "reason", "pixel_values", "num_tokens"]
    return ds.select_columns(cols).take_all()


def test_build_dataset_stream_order_seed_rejects_and_skip(ray_local, tmp_path, init_dir, model_config):
    """Three runs of the real Ray Data ingest (the run count dominates this file's runtime)."""
    cap = write_tiny_shards(tmp_path / "cap", 12, clip_dim=CLIP_DIM, rows_per_file=8, corrupt_rows=(3,))
    sft = write_tiny_shards(
        tmp_path / "sft", 8, clip_dim=CLIP_DIM, rows_per_file=8, sft=True, text_only_every=3
    )
    files = ingest.list_shards([cap, sft])
    ingest.check_shards(files, model_config, "auto", teacher="synthetic")
    n = 2 * ingest.total_rows(files)  # two epochs, 40 positions
    corrupt = (str(cap / "part-00000.parquet"), 3)

    def check(rows, seed, skip=0) -> list[tuple[str, int]]:
        """The stream holds positions skip..n-1 once each, in order, each the row the plan names."""
        want = expected_rows(files, seed, 2, skip, group_size=4)
        assert [r["pos"] for r in rows] == list(range(skip, n)), "every position once, in position order"
        assert [r["key"] for r in rows] == [w["key"] for w in want]
        for r, w in zip(rows, want, strict=True):
            if (w["path"], w["row"]) == corrupt:  # rejected, not dropped: carried with its reason
                assert not r["ok"] and r["reason"] == "decode_error", r
            else:
                assert r["ok"] and r["reason"] == "" and r["num_tokens"] > 0, r
                assert (len(r["pixel_values"]) > 0) == w["image"]  # text-only SFT rows carry no image
        return [(w["path"], w["row"]) for w in want]

    first = run_ingest(files, init_dir, model_config, seed=0)
    a = check(first, seed=0)
    assert sum(not r["ok"] for r in first) == 2  # the corrupt row, once per epoch

    skip = 13  # resume mid-file: exactly positions >= skip, identical to the first run's (same seed)
    resumed = run_ingest(files, init_dir, model_config, seed=0, skip=skip)
    assert check(resumed, seed=0, skip=skip) == a[skip:]
    assert resumed == first[skip:]

    b = check(run_ingest(files, init_dir, model_config, seed=1), seed=1)
    assert b != a and sorted(b) == sorted(a)  # another seed: the same rows in another order
    assert b[: n // 2] != a[: n // 2] and b[n // 2 :] != a[n // 2 :]


def test_ingest_streams_shards_from_s3_exactly_as_from_local_disk(ray_local, tmp_path, init_dir, model_config,
                                                                   s3_server):  # fmt: skip
    """Training shards whose images are referenced into an image dataset, in a bucket (a real S3 API): the
    stream, a resumed stream and the shard list equal those of the same files on local disk."""
    from breen.storage import Store

    local = write_tiny_shards(tmp_path / "cap", 12, clip_dim=CLIP_DIM, rows_per_file=8, corrupt_rows=(3,),
                              referenced=True)  # fmt: skip
    bucket = Store.at("s3://breen-test/ingest", endpoint_override=s3_server)
    for folder in (local, tmp_path / "cap-images"):
        assert folder.is_dir()
        for f in sorted(p for p in folder.rglob("*") if p.is_file()):
            (bucket / f.relative_to(tmp_path).as_posix()).write_bytes(f.read_bytes())
    here = ingest.list_shards([local])
    there = ingest.list_shards(["s3://breen-test/ingest/cap"], endpoint_override=s3_server)
    assert [f.path for f in there] == [f"s3://breen-test/ingest/cap/{Path(f.path).name}" for f in here]
    assert [(f.rows, f.clip_dim, f.columns, f.teacher) for f in there] == [
        (f.rows, f.clip_dim, f.columns, f.teacher) for f in here]  # fmt: skip

    def stream(files, skip=0):
        ds = ingest.build_dataset(
            files, tokenizer_dir=str(init_dir), model_config=model_config.to_dict(), text_field="caption",
            max_length=512, seed=0, epochs=1, micro_batch_size=4, skip=skip, encode_actors=1, encode_cpus=0.5,
            chunk_rows=8, endpoint_override=s3_server,
        )  # fmt: skip
        ds.context.execution_options = ingest.ingest_options()
        ds.context.enable_progress_bars = False
        return ds.select_columns(["pos", "key", "ok", "pixel_values", "input_ids", "fine"]).take_all()

    want = stream(here)
    assert len(want) == 12 and sum(not r["ok"] for r in want) == 1
    assert stream(there) == want
    assert stream(there, skip=5) == want[5:]


def test_build_dataset_with_nothing_left_to_read(shards, init_dir):
    files = ingest.list_shards([shards])
    with pytest.raises(ValueError, match="nothing left to read"):
        ingest.build_dataset(
            files, tokenizer_dir=str(init_dir), model_config={}, text_field="caption", max_length=64,
            seed=0, epochs=2, micro_batch_size=4, skip=40,
        )  # fmt: skip


# ============================================================================= jobs.train.main
def run_main(argv, capsys) -> tuple[int, str]:
    code = launch.main(argv)
    return code, capsys.readouterr().err


def stage1_argv(tmp_path, data, init, *overrides: str) -> list[str]:
    """`jobs.train` arguments for stage 1 on the CPU profile, output under tmp_path/runs."""
    return ["--stage", "stage1", "--data", str(data), "--init-from", str(init), "--output-dir",
            str(tmp_path / "runs"), *CPU, *with_set(*overrides)]  # fmt: skip


def test_main_help(capsys):
    with pytest.raises(SystemExit) as exc:
        launch.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: python -m jobs.train") and "--sft-data" in out
    assert "--set KEY=VALUE" in out and "--print-config" in out and "--config FILE.yaml" in out
    assert "scale: num_workers=64," in out  # the sections with their defaults


def test_main_missing_data_dir_exits_2(tmp_path, capsys):
    missing = tmp_path / "no-such-shards"
    code, err = run_main(stage1_argv(tmp_path, missing, "tiny"), capsys)
    assert code == 2 and "data.paths[0]" in err and str(missing) in err, err
    assert not (tmp_path / "runs" / "stage1").exists() or not any((tmp_path / "runs" / "stage1").iterdir())


def test_main_unknown_override_exits_2(tmp_path, shards, capsys):
    code, err = run_main(stage1_argv(tmp_path, shards, "tiny", "scale.num_worker=2"), capsys)
    assert code == 2 and "scale.num_worker: unknown key" in err, err


def test_main_global_batch_larger_than_the_data_exits_2(tmp_path, shards, init_dir, capsys):
    code, err = run_main(stage1_argv(tmp_path, shards, init_dir, "scale.global_batch_size=32"), capsys)
    assert code == 2 and "scale.global_batch_size" in err and "20 rows" in err, err


def test_main_teacher_mismatch_exits_2_naming_data_teacher(tmp_path, shards, init_dir, capsys):
    code, err = run_main(stage1_argv(tmp_path, shards, init_dir, "data.teacher=ViT-L-14-336"), capsys)
    assert code == 2 and "data.teacher='ViT-L-14-336'" in err, err
    assert str(shards / "part-00000.parquet") in err


def test_main_caption_shards_without_targets_exit_2(tmp_path, shards, init_dir, capsys):
    rewrite(shards / "part-00001.parquet", drop=("fine", "coarse"))
    code, err = run_main(stage1_argv(tmp_path, shards, init_dir), capsys)
    assert code == 2 and "data.text_field=caption" in err and str(shards / "part-00001.parquet") in err, err


def test_main_empty_data_dir_exits_2(tmp_path, init_dir, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    code, err = run_main(stage1_argv(tmp_path, empty, init_dir), capsys)
    assert code == 2 and str(empty) in err


def test_main_all_stages_checks_every_stage_input_before_training(tmp_path, shards, init_dir, capsys):
    code, err = run_main(
        ["--stage", "all", "--data", str(shards), "--init-from", str(init_dir), "--output-dir",
         str(tmp_path / "runs"), *CPU],
        capsys,
    )  # fmt: skip
    assert code == 2 and "data.paths" in err and "stage3" in err and "--sft-data" in err, err
    assert not (tmp_path / "runs" / "stage1").exists(), "stage 1 started although stage 3 has no data"


def test_main_unknown_learning_rate_component_exits_2(tmp_path, shards, init_dir, capsys):
    code, err = run_main(stage1_argv(tmp_path, shards, init_dir, "optim.lrs.patch_embd=1e-4"), capsys)
    assert code == 2 and "optim.lrs.patch_embd" in err and "unknown component" in err, err


def test_chain_an_unscoped_init_override_starts_only_the_first_stage(tmp_path):
    out = str(tmp_path / "runs")
    cfgs = launch.chain_configs(
        list(STAGES), data=["d"], sft_data=["s"], init_from=None, output_dir=out, profile="cpu",
        overrides=["model.init_from=/models/x", "stage3.model.init_from=/models/y"],
    )  # fmt: skip
    assert cfgs[0].model.init_from == "/models/x"
    assert cfgs[1].model.init_from == str(cfgs[0].export_dir)
    assert cfgs[2].model.init_from == "/models/y"


# ============================================================================= jobs.train: failures
def test_faults_are_lost_workers_and_broken_collectives_not_bugs():
    import ray.exceptions
    import torch.distributed as dist

    assert train.is_fault(ray.exceptions.ActorDiedError())
    assert train.is_fault(dist.DistBackendError("gloo: Connection closed by peer"))
    try:  # the step loop re-raises a collective failure as something else: its cause still counts
        try:
            raise dist.DistNetworkError("peer gone")
        except dist.DistNetworkError as err:
            raise RuntimeError("all_reduce failed") from err
    except RuntimeError as wrapped:
        assert train.is_fault(wrapped)
    assert not train.is_fault(TypeError("unexpected keyword argument 'cache'"))
    assert not train.is_fault(RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x64 and 32x64)"))


def test_first_step_error_survives_pickling_with_its_traceback():
    import pickle

    err = train.FirstStepError("rank 0: TypeError: boom", "Traceback (most recent call last):\n  ...")
    back = pickle.loads(pickle.dumps(err))
    assert isinstance(back, train.FirstStepError) and str(back) == "rank 0: TypeError: boom"
    assert back.trace.startswith("Traceback")


def test_referenced_images_encode_exactly_like_inline_ones(tmp_path, init_dir, model_config):
    """The layout data preparation writes (images stored once, shards reference them) feeds the model the
    same samples as inline image bytes, resumed mid-file too."""
    kw = {"clip_dim": CLIP_DIM, "rows_per_file": 8, "sft": True, "text_only_every": 3, "corrupt_rows": (1,)}
    inline = write_tiny_shards(tmp_path / "inline", 20, **kw)
    ref = write_tiny_shards(tmp_path / "ref", 20, referenced=True, **kw)
    assert "image" not in pq.read_schema(ref / "part-00000.parquet").names
    enc = ingest.ReadEncode(
        str(init_dir), model_config.to_dict(), "auto", 512, seed=0, group_size=4, chunk_rows=3
    )

    def encoded(d: Path, skip: int) -> list[dict]:
        rows = []
        for item in ingest.epoch_plan(ingest.list_shards([d]), seed=0, epochs=1, skip=skip):
            for chunk in enc.encode_file(item):
                rows += [{k: v[i] for k, v in chunk.items()} for i in range(len(chunk["pos"]))]
        return rows

    for skip in (0, 11):
        a, b = encoded(inline, skip), encoded(ref, skip)
        assert len(a) == len(b) == 20 - skip
        if skip == 0:  # the corrupt image is rejected the same way through the reference
            assert [r["key"] for r in b if not r["ok"]] == [f"{1:012d}"]
        for x, y in zip(a, b, strict=True):
            assert x.keys() == y.keys()
            assert all(np.array_equal(x[k], y[k]) for k in x), x["key"]


# ============================================================================= held-out validation rows
def test_held_out_rows_depend_on_the_key_alone():
    keys = [f"row-{i:05d}" for i in range(4000)]
    mask = ingest.held_out_rows(keys, 0.1)
    assert 0.08 < mask.mean() < 0.12  # about the fraction
    assert (ingest.held_out_rows(keys, 0.1) == mask).all()  # deterministic
    shuffled = np.random.default_rng(0).permutation(len(keys))  # file order does not matter: the key does
    assert (ingest.held_out_rows([keys[i] for i in shuffled], 0.1) == mask[shuffled]).all()
    assert not ingest.held_out_rows(keys, 0.0).any()
    assert (mask <= ingest.held_out_rows(keys, 0.3)).all()  # a larger fraction holds out more, never others


def test_held_out_rows_never_reach_the_training_stream_whatever_the_seed(tmp_path, init_dir, model_config):
    d = write_tiny_shards(tmp_path / "shards", 40, clip_dim=CLIP_DIM, rows_per_file=16)
    files = ingest.hold_out(ingest.list_shards([d]), 0.25)
    keys = {Path(f.path).name: sf.keys_of(f.path).to_pylist() for f in files}
    held = {keys[Path(f.path).name][i] for f in files for i in f.held_out}
    assert 0 < len(held) < 40 and ingest.total_rows(files) == 40 - len(held)
    enc = ingest.ReadEncode(str(init_dir), model_config.to_dict(), "caption", 512, seed=0, val_fraction=0.25)
    trained = []
    for seed in (0, 7):  # the stream's order changes with the seed, the held-out rows do not
        enc.seed = seed
        items = ingest.epoch_plan(files, seed=seed, epochs=1)
        chunks = [c for item in items for c in enc.encode_file(item)]
        pos = [int(p) for c in chunks for p in c["pos"]]
        assert pos == list(range(ingest.total_rows(files)))  # positions count the training rows only
        trained.append([str(k) for c in chunks for k in c["key"]])
    assert trained[0] != trained[1] and sorted(trained[0]) == sorted(trained[1])
    assert not held & set(trained[0]) and held | set(trained[0]) == {k for ks in keys.values() for k in ks}

    items = ingest.validation_items(files, max_rows=5)  # the first held-out rows, file then row order
    assert sum(len(it["rows"]) for it in items) == 5
    got = [str(k) for it in items for k in enc.encode_selected(it)["key"]]
    want = [keys[Path(f.path).name][i] for f in files for i in f.held_out][:5]
    assert got == want and set(got) <= held
    every = ingest.validation_items(ingest.list_shards([d]), max_rows=100, every_row=True)  # data.val_paths
    assert [len(it["rows"]) for it in every] == [16, 16, 8]


def test_validation_config_is_checked_and_resume_neutral():
    for override, field in (("data.val_fraction=1.0", "data.val_fraction"), ("validation.every_steps=0",
                            "validation.every_steps"), ("validation.num_samples=99", "validation.num_samples")):  # fmt: skip
        with pytest.raises(ConfigError, match=f"^{field}: "):
            jc.build_config("stage1", "cpu", [override])
    with pytest.raises(ConfigError, match=r"^data\.val_paths: give either"):
        jc.build_config("stage1", "cpu", ["data.val_fraction=0.1", "data.val_paths=/x"])
    base = jc.build_config("stage1", "cpu")
    evals = jc.build_config("stage1", "cpu", ["validation.every_steps=3", "validation.max_rows=4"])
    assert jc.config_changes(base, evals) == []  # evaluation does not change the weights
    held = jc.build_config("stage1", "cpu", ["data.val_fraction=0.1"])
    assert jc.config_changes(base, held) == ["data.val_fraction: 0.0 -> 0.1"]  # the training rows do


def test_supervised_tokens_counts_what_the_lm_loss_averages():
    import torch

    from jobs.validation import supervised_tokens

    labels = torch.tensor([[-100, 5, 6, -100], [-100, -100, 7, 8]])
    assert supervised_tokens({"labels": labels}) == 4
    packed = torch.tensor([[-100, 5, 6, 7, -100, 8]])  # two samples: [0, 4) and [4, 6)
    assert supervised_tokens({"labels": packed, "cu_seqlens": torch.tensor([0, 4, 6])}) == 4


def test_tracker_logs_validation_scalars_and_samples(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from jobs import validation
    from jobs.metrics import Tracker, read_metrics

    tracker = Tracker(tmp_path, 2, print_fn=lambda *a: None)
    train_rec = {"step": 1, "loss": 1.0, "lm_loss": 1.0, "align_fine": 0.5, "align_coarse": 0.5, "lr": {},
                 "grad_norm": 0.1, "samples_per_s": 1.0, "tokens_per_s": 1.0, "mfu": 0.0, "step_time": 0.1}  # fmt: skip
    val = {"val/lm_loss": 2.5, "val/align_fine": 0.75, "val/align_coarse": 0.5, "val/cos_fine": 0.25,
           "val/cos_coarse": 0.5, "val/rows": 6, "val/held_out": 9}  # fmt: skip
    tracker.log(train_rec)
    tracker.log({**train_rec, "step": 2, **val})
    tracker.log_samples(2, [{"step": 2, "key": "k1", "prompt": "<image>", "answer": "a", "reference": "b"}])
    tracker.close()
    records = read_metrics(tmp_path)
    assert "val/lm_loss" not in records[1] and records[2]["val/lm_loss"] == 2.5
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert samples == [{"step": 2, "key": "k1", "prompt": "<image>", "answer": "a", "reference": "b"}]
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0}).Reload()
    assert [(e.step, e.value) for e in acc.Scalars("val/lm_loss")] == [(2, 2.5)]
    assert "train/loss" in acc.Tags()["scalars"] and "train/val/lm_loss" not in acc.Tags()["scalars"]
    assert "val/samples/text_summary" in acc.Tags()["tensors"]
    final = validation.last_values(records)
    assert final["step"] == 2 and final["val/cos_fine"] == 0.25
    text = validation.table({"stage1": final, "stage2": None})
    assert text.splitlines()[0].split() == ["stage", "step", "rows", "lm_loss", "align_fine", "align_coarse",
                                            "cos_fine", "cos_coarse"]  # fmt: skip
    assert text.splitlines()[1].split()[:4] == ["stage1", "2", "6", "2.5000"]


def test_tracker_logs_to_weights_and_biases_offline(tmp_path, monkeypatch):
    from jobs.metrics import Tracker

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "stage1"
    tracker = Tracker(run_dir, 1, tensorboard=False, print_fn=lambda *a: None, wandb="breen-test",
                      config={"stage": "stage1"})  # fmt: skip
    tracker.log({"step": 1, "loss": 1.5, "lm_loss": 1.0, "align_fine": 0.5, "align_coarse": 0.5, "lr": {"default": 1e-4},
                 "grad_norm": 0.1, "samples_per_s": 1.0, "tokens_per_s": 1.0, "mfu": 0.0, "step_time": 0.1,
                 "val/lm_loss": 2.5, "val/align_fine": 0.75, "val/align_coarse": 0.5, "val/cos_fine": 0.25,
                 "val/cos_coarse": 0.5, "val/rows": 6})  # fmt: skip
    tracker.log_samples(1, [{"step": 1, "key": "k1", "prompt": "<image>", "answer": "a", "reference": "b"}])
    tracker.close()
    (run,) = (run_dir / "wandb").glob("offline-run-*")
    assert list(run.glob("run-*.wandb")) and run.name.endswith(tracker_id := run.name.rsplit("-", 1)[1])
    again = Tracker(run_dir, 1, tensorboard=False, print_fn=lambda *a: None, wandb="breen-test")
    again.close()  # a resumed run continues the same W&B run (the id derives from the run directory)
    assert {p.name.rsplit("-", 1)[1] for p in (run_dir / "wandb").glob("offline-run-*")} == {tracker_id}


def test_tracker_logs_to_mlflow(tmp_path, monkeypatch):
    """A real MLflow client on a local file store (MLflow's own `file:` backend, allowed explicitly): the
    scalars with their steps, the config as parameters, the samples as an artifact; a resumed run (same
    run directory) continues the same MLflow run."""
    from mlflow.tracking import MlflowClient

    from breen.storage import Store
    from jobs.metrics import Tracker

    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    run_dir = tmp_path / "stage1"
    record = {"step": 1, "loss": 1.5, "lm_loss": 1.0, "align_fine": 0.5, "align_coarse": 0.5, "lr": {"default": 1e-4},
              "grad_norm": 0.1, "samples_per_s": 1.0, "tokens_per_s": 1.0, "mfu": 0.0, "step_time": 0.1,
              "val/lm_loss": 2.5, "val/align_fine": 0.75, "val/align_coarse": 0.5, "val/cos_fine": 0.25,
              "val/cos_coarse": 0.5, "val/rows": 6}  # fmt: skip
    tracker = Tracker(run_dir, 2, tensorboard=False, print_fn=lambda *a: None, mlflow="breen-test",
                      config={"stage": "stage1", "optim": {"lrs": {"default": 1e-4}}})  # fmt: skip
    tracker.log(record)
    tracker.log_samples(1, [{"step": 1, "key": "k1", "prompt": "<image>", "answer": "a", "reference": "b"}])
    tracker.close()
    again = Tracker(run_dir, 2, tensorboard=False, print_fn=lambda *a: None, mlflow="breen-test")
    again.log({**record, "step": 2, "loss": 1.25})
    again.close()

    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("breen-test").experiment_id])
    assert run.info.run_name == "stage1" and run.data.tags["breen.run_dir"] == Store.at(run_dir).uri
    assert run.data.params["optim.lrs.default"] == "0.0001" and run.data.params["stage"] == "stage1"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 1.5), (2, 1.25)]
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val/lm_loss")] == [(1, 2.5), (2, 2.5)]
    samples = client.download_artifacts(run.info.run_id, "val/samples-0000001.json", str(tmp_path / "dl"))
    assert json.loads(Path(samples).read_text())[0]["answer"] == "a"


def test_sample_prompts_of_chat_rows_end_where_the_first_answer_starts(init_dir, model_config):
    """Stage 3 chat rows label template tokens too (their first token, never predicted); the prompt
    must still hold the chat up to the answer, and the reference is the first answer."""
    from jobs.validation import Validator

    tokenizer = ingest.load_tokenizer(init_dir)
    enc = ingest.ReadEncode("", model_config.to_dict(), "conversations", 512, seed=0, tokenizer=tokenizer)
    conv = json.dumps([{"from": "human", "value": "What is it?"}, {"from": "gpt", "value": "A red cat."}])
    rows = enc.encode_rows(pa.table({"key": ["k0"], "conversations": [conv]}), 0, [None])
    assert rows["ok"][0] and np.frombuffer(rows["labels"][0], np.int32)[0] >= 0  # the case that matters
    validator = Validator.__new__(Validator)
    validator.tokenizer, validator.image_size = tokenizer, model_config.image_size
    sample = validator._prompt(rows, 0)
    assert len(sample["input_ids"]) > 1 and "What is it?" in sample["prompt"] and "pixel_values" not in sample
    assert sample["reference"].startswith("A red cat.") and sample["key"] == "k0"
