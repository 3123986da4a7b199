"""pipelines.fingerprint (with the checks in pipelines.layout and pipelines.runner that use it): config drift, input drift,
code digests, one writer per dataset, damaged and stale shards. Real steps on real Ray, on copies of the
session's demo preparation (`prepared_demo`); the concurrency case runs two real CLI processes."""

from __future__ import annotations

import ast
import copy
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from breen import lease
from pipelines import captions, download, fingerprint, layout, sft_import, teacher, verify
from pipelines import filter as filt
from pipelines.config import load_config, to_dict
from tests.conftest import CONFIGS

ROOT = Path(__file__).resolve().parent.parent


# ----------------------------------------------------------------------------- units


def test_code_digest_follows_the_step_helpers_and_ignores_prose():
    files = fingerprint.code_digest("pipelines.filter")
    for helper in ("pipelines/filter.py", "pipelines/dedup.py", "pipelines/guard.py", "breen/shard_format.py"):
        assert helper in files
    assert "breen/teacher.py" in fingerprint.code_digest("pipelines.teacher")
    assert "pipelines/report.py" not in files  # not imported by the step: editing it invalidates nothing
    code = 'def f(x):\n    """Doc."""\n    return x + 1  # one\n'
    prose = 'def f(x):\n    """Another doc, longer."""\n\n    return x + 1  # two\n'
    logic = 'def f(x):\n    """Doc."""\n    return x + 2\n'

    def dump(src: str) -> str:
        return ast.dump(fingerprint._without_docstrings(ast.parse(src)))

    assert dump(code) == dump(prose) and dump(code) != dump(logic)


def test_differences_name_each_changed_field():
    old = {"step": "filter", "inputs": {"captions": "a" * 64}, "config": {"filter": {"min_short_side": 200}},
           "code": {"pipelines/filter.py": "1", "pipelines/dedup.py": "2"}, "lock": "x"}  # fmt: skip
    new = copy.deepcopy(old)
    new["config"]["filter"]["min_short_side"] = 400
    new["inputs"]["captions"] = "b" * 64
    new["code"]["pipelines/dedup.py"] = "3"
    assert fingerprint.differences(old, new) == [
        "code: pipelines/dedup.py changed",
        "config.filter.min_short_side: 200 -> 400",
        f"inputs.captions: the upstream dataset changed (fingerprint {'a' * 12} -> {'b' * 12})",
    ]


def test_resource_settings_are_not_part_of_the_spec():
    from pipelines.config import TeacherConfig, output_fields

    a, b = TeacherConfig(), TeacherConfig(num_actors=8, batch_size=256, device="cuda", cpus_per_actor=4)
    assert output_fields(a) == output_fields(b)
    assert output_fields(a) != output_fields(TeacherConfig(random_init_seed=3))


def _fixture(path: Path, step: str) -> str:
    return fingerprint.record(path, {"step": step})


def test_a_shard_made_from_an_upstream_file_that_was_redone_is_stale(tmp_path):
    empty = layout.with_reason(pa.table({"key": pa.array([], pa.string())}), [], [])
    up, down = tmp_path / "download", tmp_path / "captions"
    _fixture(up, "download")
    fp = _fixture(down, "captions")
    for i in range(2):
        name = layout.shard_name(i)
        layout.write_shard(up, name, pa.table({"key": [f"k{i}"]}), empty, 1)
        layout.write_shard(down, name, pa.table({"key": [f"k{i}"]}), empty, 1, inputs=[up / f"{name}.parquet"])
    names = ["part-00000", "part-00001"]
    assert fingerprint.stale_shards(down, fp, names) == []
    layout.write_shard(up, "part-00001", pa.table({"key": ["k1"], "x": [1]}), empty, 1)  # redone, other bytes
    assert fingerprint.stale_shards(down, fp, names) == ["part-00001"]
    (down / "fingerprint.json").write_text((down / "fingerprint.json").read_text().replace(fp, "0" * 64))
    with pytest.raises(fingerprint.FingerprintMismatch, match="mixes runs"):
        fingerprint.stale_shards(down, "0" * 64, names)


def test_an_unreadable_file_is_named(tmp_path):
    path = tmp_path / "part-00000.parquet"
    import numpy as np

    values = np.random.default_rng(0).normal(size=20_000)  # data pages make up most of the file
    info = layout.write_table(path, pa.table({"key": [f"k{i}" for i in range(20_000)], "v": values}))
    assert info["bytes"] == path.stat().st_size
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(layout.CorruptShard, match=str(path)):
        layout.read_table(path)
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x01  # a flipped bit inside a data page: the page checksum catches it
    path.write_bytes(bytes(flipped))
    with pytest.raises(layout.CorruptShard, match=r"part-00000\.parquet: cannot be read"):
        layout.read_table(path)


# ----------------------------------------------------------------------------- on the demo preparation

@pytest.fixture
def demo_copy(prepared_demo, tmp_path):
    """A copy of the session's demo output and a config pointing at it (same inputs)."""
    cfg, _, overrides, _ = prepared_demo
    out = tmp_path / "out"
    shutil.copytree(cfg.out.path, out, ignore=shutil.ignore_patterns("synthetic", "report"))
    new = load_config(CONFIGS / "demo.yaml", [*overrides, f"output_dir={out}"])
    new.input.urls, new.input.sft = list(cfg.input.urls), copy.deepcopy(cfg.input.sft)
    return new, out


def snapshot(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow
def test_config_drift_is_refused_at_every_step_and_redo_recomputes(demo_copy, ray_local):
    cfg, out = demo_copy
    before = snapshot(out)
    cfg.filter.min_short_side = 400
    with pytest.raises(fingerprint.FingerprintMismatch, match=r"config\.filter\.min_short_side: 200 -> 400"):
        filt.run(cfg)
    assert snapshot(out) == before  # refused before writing anything
    cfg.redo = True
    manifest = filt.run(cfg)
    assert manifest["counts"]["kept"] < before_kept(before, "filter")
    assert all(s["fingerprint"] == manifest["fingerprint"] for s in layout.read_stats(out / "filter"))
    cfg.redo = False
    with pytest.raises(fingerprint.FingerprintMismatch, match=r"inputs\.filter: the upstream dataset changed"):
        teacher.run(cfg)  # the training shards see the new filter through its fingerprint
    cfg.redo = True
    shards = teacher.run(cfg)
    assert shards["counts"]["rows_in"] == manifest["counts"]["kept"]
    files = {pq.read_schema(p).metadata[b"breen.fingerprint"] for p in (out / "shards").glob("part-*.parquet")}
    assert files == {shards["fingerprint"].encode()}  # one dataset, one fingerprint
    # resource settings are not part of the spec: nothing to redo
    cfg.redo, cfg.filter.num_actors, cfg.teacher.batch_size = False, 1, 3
    assert filt.run(cfg)["fingerprint"] == manifest["fingerprint"]


def before_kept(files: dict[str, bytes], step: str) -> int:
    import json

    return json.loads(files[f"{step}/manifest.json"])["counts"]["kept"]


@pytest.mark.slow
def test_another_teacher_after_lost_markers_is_refused_not_mixed(demo_copy, ray_local):
    cfg, out = demo_copy
    for name in ("part-00001", "part-00003"):
        (out / "shards" / f"{name}.done").unlink()
    cfg.teacher.weights, cfg.teacher.random_init_seed = None, 7
    with pytest.raises(fingerprint.FingerprintMismatch) as err:
        teacher.run(cfg)
    assert "config.teacher.random_init_seed: null -> 7" in str(err.value)
    assert "inputs.teacher" in str(err.value)
    assert not (out / "shards" / "part-00001.done").exists()  # nothing was written


@pytest.mark.slow
def test_input_drift_is_refused(demo_copy, tmp_path, ray_local):
    cfg, _ = demo_copy
    urls = pq.read_table(cfg.input.urls[0])
    other = tmp_path / "other-urls.parquet"
    pq.write_table(urls.slice(0, 70), other)
    cfg.input.urls = [str(other)]
    with pytest.raises(fingerprint.FingerprintMismatch, match=r"inputs\.urls: \["):
        download.run(cfg)
    import json

    records = json.loads(Path(cfg.input.sft.json).read_text())
    changed = tmp_path / "sft.json"
    changed.write_text(json.dumps(records[:-1]))  # one record fewer
    cfg.input.sft.json = str(changed)
    with pytest.raises(fingerprint.FingerprintMismatch, match=r"inputs\.json: "):
        sft_import.run(cfg)


@pytest.mark.slow
def test_damaged_files_are_named_and_redone(demo_copy, ray_local, capsys):
    cfg, out = demo_copy
    before = snapshot(out)
    # a truncated file: the next run of its step sees the size and redoes the shard
    path = out / "captions" / "part-00001.parquet"
    path.write_bytes(path.read_bytes()[:100])
    captions.run(cfg)
    assert "redoing" in capsys.readouterr().out and path.read_bytes() == before["captions/part-00001.parquet"]
    # bit rot (same size): verify names it, --repair makes the next run redo it
    path = out / "shards" / "part-00002.parquet"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    assert verify.main([str(out)]) == 1
    assert f"{path}: sha256 differs" in capsys.readouterr().out
    assert verify.main([str(out), "--repair"]) == 1
    teacher.run(cfg)
    assert verify.main([str(out)]) == 0
    after = snapshot(out)
    parquet = [f for f in before if f.endswith(".parquet")]
    assert [f for f in parquet if after.get(f) != before[f]] == []  # the redone shards are byte-identical


@pytest.mark.slow
def test_missing_duplicate_decisions_fail_the_split_instead_of_keeping_duplicates(demo_copy):
    cfg, _ = demo_copy
    fd = cfg.out / "filter"
    worker = filt.SplitWorker(cfg.out / "captions", fd, fd / filt.INDEX, fd / filt.DEDUP, cfg.out / "download")
    (fd / filt.DEDUP / "_SUCCESS").delete()  # what a second run deleting the index would leave
    with pytest.raises(RuntimeError, match="duplicate decisions are incomplete"):
        worker.process("part-00000")


def _filter_cli(cfg_path: Path, out: Path, *extra: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen(
        [sys.executable, "-m", "pipelines.filter", "--config", str(cfg_path), "--set", f"output_dir={out}",
         "--set", "filter.min_short_side=300", "--set", "ray.num_cpus=2", *extra],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip


@pytest.mark.slow
def test_two_runs_on_one_dataset_one_fails_fast_one_waits_and_the_result_is_a_single_runs(
    demo_copy, tmp_path, ray_local
):
    cfg, out = demo_copy
    import yaml

    cfg_path = tmp_path / "config.yaml"
    data = to_dict(cfg)
    data.pop("source"), data.pop("redo"), data.pop("wait_s")
    data["input"]["synthetic"] = None
    cfg_path.write_text(yaml.safe_dump(data))
    single = tmp_path / "single"
    shutil.copytree(out, single)
    first = _filter_cli(cfg_path, out, "--redo")
    deadline = time.monotonic() + 300
    while lease.holder(out / "filter") is None:  # the first run holds the dataset
        assert first.poll() is None, first.stdout.read()
        assert time.monotonic() < deadline
        time.sleep(0.2)
    second = _filter_cli(cfg_path, out, "--redo")
    log = second.communicate(timeout=300)[0]
    assert second.returncode == 3, log
    assert "is being written by another run" in log and "pipelines.filter" in log
    waiting = _filter_cli(cfg_path, out, "--wait", "600")
    first_log = first.communicate(timeout=600)[0]
    assert first.returncode == 0, first_log
    wait_log = waiting.communicate(timeout=600)[0]
    assert waiting.returncode == 0, wait_log
    assert "nothing to do" in wait_log  # it waited, then found the first run's finished dataset
    # the same as one run alone
    alone = _filter_cli(cfg_path, single, "--redo")
    assert alone.communicate(timeout=600)[0] and alone.returncode == 0
    for name in layout.finished_shards(single / "filter"):
        assert (out / "filter" / f"{name}.parquet").read_bytes() == (single / "filter" / f"{name}.parquet").read_bytes()
    assert layout.finished_shards(out / "filter") == layout.finished_shards(single / "filter")
