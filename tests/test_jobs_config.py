"""jobs.config: the stage files (stage 2 = stage 1 plus changes), profiles, typed overrides and their
errors, finiteness and ranges, resume changes, the saved config's round trip."""

from __future__ import annotations

import json
from importlib import metadata

import pytest

from breen import envlock
from breen.settings import ConfigError
from breen.stages import DEFAULT_LRS
from jobs import config as jc
from tests._training import differing_keys, flat, run_main, stage1_argv


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


