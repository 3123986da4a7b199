"""jobs.launch, the command line of `python -m jobs.train`: stage files, profiles, run files and `--set`
in that order, per-stage scoping, `--print-config`, the deprecated bare overrides. No training here
(test_train_e2e.py runs the stages; test_jobs_config.py checks the configs)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from breen.stages import STAGES
from jobs import launch
from jobs.config import CONFIG_DIR, ConfigError, build_config, profiles, recipe
from tests._training import CPU, rewrite, run_main, stage1_argv

REPO = Path(__file__).resolve().parent.parent


def print_config(argv: list[str], capsys) -> dict[str, dict]:
    """{stage: resolved config} printed by ``--print-config``."""
    assert launch.main([*argv, "--print-config"]) == 0
    out = capsys.readouterr().out
    docs = {}
    for block in out.split("# ")[1:]:
        stage, _, body = block.partition("\n")
        docs[stage] = yaml.safe_load(body)
    return docs


def test_the_demo_run_file_resolves_every_stage(capsys):
    cfgs = print_config(["--stage", "all", "--config", str(CONFIG_DIR / "demo.yaml")], capsys)
    assert list(cfgs) == list(STAGES)
    s1, s2, s3 = (cfgs[s] for s in STAGES)
    assert s1["model"]["init_from"] == "tiny"  # stage 1's own section
    assert s2["model"]["init_from"].endswith("runs/demo/train/stage1/export")  # chained, not "tiny"
    assert s3["model"]["init_from"].endswith("runs/demo/train/stage2/export")
    assert s1["data"]["paths"] == s2["data"]["paths"] == ["runs/demo/shards"]
    assert s3["data"]["paths"] == ["runs/demo/sft_shards"]
    assert {c["data"]["val_fraction"] for c in cfgs.values()} == {0.1}
    # the cpu profile it starts from, stage 3's own batch included
    assert [c["scale"]["global_batch_size"] for c in cfgs.values()] == [8, 8, 4]
    assert all(c["scale"]["use_gpu"] is False and c["output_dir"] == "runs/demo/train" for c in cfgs.values())
    assert s1["optim"]["lrs"] == {"default": 4e-5, "patch_embed": 4e-4} and s3["optim"]["lrs"] == {"default": 2e-5}


def test_layers_apply_in_order_and_stage_sections_touch_one_stage(tmp_path, capsys):
    first = tmp_path / "first.yaml"
    first.write_text("seed: 1\nschedule: {max_steps: 50}\nstage2: {schedule: {max_steps: 7}}\n")
    second = tmp_path / "second.yaml"
    second.write_text("seed: 2\nstage3: {optim: {lrs: {queries: 1.0e-5}}}\n")
    argv = ["--stage", "all", "--profile", "cpu", "--config", str(first), "--config", str(second),
            "--set", "stage3.seed=3", "--data", "d", "--sft-data", "s", "--init-from", "tiny"]  # fmt: skip
    cfgs = print_config(argv, capsys)
    assert [c["seed"] for c in cfgs.values()] == [2, 2, 3]  # second file over first, --set over both
    assert [c["schedule"]["max_steps"] for c in cfgs.values()] == [50, 7, 50]
    assert cfgs["stage3"]["optim"]["lrs"] == {"default": 2e-5, "queries": 1e-5}
    assert [c["data"]["paths"] for c in cfgs.values()] == [["d"], ["d"], ["s"]]  # flags after the files


def test_a_stage_section_naming_a_model_breaks_the_chain_there(tmp_path, capsys):
    run = tmp_path / "run.yaml"
    run.write_text("model: {init_from: /models/first}\nstage3: {model: {init_from: /models/own}}\n")
    cfgs = print_config(["--stage", "all", "--config", str(run), "--output-dir", str(tmp_path)], capsys)
    assert cfgs["stage1"]["model"]["init_from"] == "/models/first"
    assert cfgs["stage2"]["model"]["init_from"] == str(tmp_path / "stage1" / "export")  # unscoped: first only
    assert cfgs["stage3"]["model"]["init_from"] == "/models/own"


def test_stage_files_are_the_previous_stage_plus_their_changes():
    for stage, base in (("stage2", "stage1.yaml"), ("stage3", "stage2.yaml")):
        text = (CONFIG_DIR / f"{stage}.yaml").read_text()
        assert yaml.safe_load(text)["base"] == base
        assert recipe(stage).stage == stage
    assert build_config("stage1").checkpoint.every_steps == 100 and build_config("stage2").checkpoint.every_steps == 200


def test_profiles_are_the_files_and_an_unknown_one_lists_them(capsys):
    assert profiles() == ["cluster", "cpu"]
    with pytest.raises(ConfigError, match=r"profile: unknown profile 'gpu' \(choose one of cluster, cpu"):
        build_config("stage1", "gpu")
    assert launch.main(["--stage", "stage1", "--profile", "gpu", "--print-config"]) == 2
    assert "unknown profile 'gpu'" in capsys.readouterr().err


def test_a_bad_run_file_names_the_file_and_the_field(tmp_path, capsys):
    run = tmp_path / "run.yaml"
    run.write_text("stage2: {scale: {num_worker: 3}}\n")
    assert launch.main(["--stage", "all", "--config", str(run), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert f"config error: {run}: scale.num_worker: unknown key (allowed here: num_workers," in err, err
    run.write_text("stage3: 5\n")
    assert launch.main(["--stage", "stage3", "--config", str(run), "--print-config"]) == 2
    assert "stage3: expected a mapping of this stage's changes, got 5" in capsys.readouterr().err


def test_bare_overrides_still_work_with_a_deprecation_warning(capsys):
    cfgs = print_config(["--stage", "stage1", "scale.num_workers=8"], capsys)
    assert cfgs["stage1"]["scale"]["num_workers"] == 8
    assert launch.main(["--stage", "stage1", "scale.num_workers=8", "--print-config"]) == 0
    err = capsys.readouterr().err
    assert "bare KEY=VALUE arguments are deprecated" in err and "--set scale.num_workers=8" in err


def test_print_config_imports_no_heavy_library_and_matches_the_saved_form():
    probe = ("import sys\nfrom jobs import launch\n"
             "code = launch.main(['--stage', 'stage3', '--profile', 'cpu', '--print-config'])\n"
             "print(code, sorted(m for m in ('torch', 'ray', 'transformers', 'deepspeed') if m in sys.modules))\n")  # fmt: skip
    done = subprocess.run([sys.executable, "-c", probe], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == "0 []"
    printed = yaml.safe_load(done.stdout.split("# stage3\n", 1)[1].rsplit("\n0 []", 1)[0])
    from jobs.config import from_dict

    (run,) = launch.chain_configs(["stage3"], data=[], sft_data=[], init_from=None, output_dir=None,
                                  profile="cpu", overrides=[])  # fmt: skip
    assert from_dict(printed) == run and run.model.init_from == "runs/train/stage2/export"


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


# ============================================================================= jobs.train.main


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


