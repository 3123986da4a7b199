"""`pipelines.prepare` with every path on `s3://`: a real S3 API (`moto_server` on 127.0.0.1), real
img2dataset against a local HTTP server, real Ray, real Parquet.

The inputs (URL list, SFT JSON and its image folder, the teacher weights) are objects in the bucket; `output_dir` is a prefix
of the same bucket. Checked: the accounting balances; a rerun skips every shard and changes no object
(ETag and last-modified time); the same inputs prepared into a local folder give byte-identical shards;
a download step killed mid-run and relaunched loses and duplicates no row.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import boto3
import pytest

from breen.storage import Store
from pipelines import graph, layout, prepare, synthetic
from pipelines.config import load_config
from tests.conftest import CONFIGS, free_port, write_tiny_teacher_weights

pytestmark = pytest.mark.slow
BUCKET = "breen-test"
ROOT = Path(__file__).resolve().parent.parent


def upload(local: Path, target: Store) -> None:
    """A local file, or a folder and everything under it, to `target`."""
    files = [local] if local.is_file() else sorted(p for p in local.rglob("*") if p.is_file())
    for f in files:
        dest = target if local.is_file() else target / f.relative_to(local).as_posix()
        dest.write_bytes(f.read_bytes())


def objects(endpoint: str, prefix: str) -> dict[str, tuple[str, float]]:
    """key -> (ETag, last-modified) of every object under `prefix`."""
    s3 = boto3.client("s3", endpoint_url=endpoint)
    out = {}
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
        for o in page.get("Contents", []):
            out[o["Key"]] = (o["ETag"], o["LastModified"].timestamp())
    return out


@pytest.fixture(scope="module")
def inputs(s3_server, tmp_path_factory):
    """The synthetic corpus, served from 127.0.0.1, with its URL list, SFT JSON and SFT images in the
    bucket under `in/`; yields the config overrides that point a prepare run at them."""
    root = tmp_path_factory.mktemp("s3-corpus")
    corpus = synthetic.make_corpus(root, n_images=60, seed=3)
    sft = synthetic.make_sft_corpus(root, corpus, n=12, seed=3)
    bucket = Store.at(f"s3://{BUCKET}/in", endpoint_override=s3_server)
    with synthetic.serve(root, port=free_port()) as server:
        synthetic.write_url_list(corpus, server.base_url, root / "urls.parquet", refused_url="http://127.0.0.1:1")
        upload(root / "urls.parquet", bucket / "urls.parquet")
        upload(sft, bucket / "sft.json")
        upload(root / "images", bucket / "images")
        upload(write_tiny_teacher_weights(root / "tiny-vit.safetensors"), bucket / "tiny-vit.safetensors")
        yield [
            f"storage.endpoint_override={s3_server}",
            "input.synthetic=null",
            f"input.urls=['s3://{BUCKET}/in/urls.parquet']",
            f"input.sft={{json: 's3://{BUCKET}/in/sft.json', image_folder: 's3://{BUCKET}/in'}}",
            "teacher.random_init_seed=null",
            f"teacher.weights=s3://{BUCKET}/in/tiny-vit.safetensors",
            f"teacher.model_config={CONFIGS / 'tiny-vit.json'}",
            "download.rows_per_shard=24",
            "shards.rows_per_file=16",
        ]


@pytest.fixture(scope="module")
def prepared(inputs, ray_local):
    """One prepare run into s3://breen-test/prep and one into a local folder, from the same inputs."""
    remote = load_config(CONFIGS / "demo.yaml", [*inputs, f"output_dir=s3://{BUCKET}/prep"])
    acc = prepare.run(remote)
    return remote, acc, inputs


def test_prepare_on_s3_balances_and_writes_only_to_the_bucket(prepared, s3_server):
    cfg, acc, _ = prepared
    assert not cfg.out.local and cfg.out.uri == f"s3://{BUCKET}/prep"
    assert acc["pretrain"]["balanced"] and acc["sft"]["balanced"]
    urls = layout.read_table(cfg.location(cfg.input.urls[0], "input.urls[0]"))
    assert acc["pretrain"]["input_rows"] == urls.num_rows
    ok_rows = urls.column("expect").to_pylist().count("ok")  # the corpus' plain good samples
    assert acc["pretrain"]["kept"] >= 0.9 * ok_rows > 0
    for step in graph.DATASETS:
        stats = layout.read_stats(cfg.out / step)
        assert stats, step
        for s in stats:
            assert s["rows_in"] == s["kept"] + sum(s["rejected"].values()), (step, s)
            assert layout.num_rows(cfg.out / step / f"{s['shard']}.parquet") == s["kept"]
    keys = Counter()
    for step in (s.name for s in graph.chain("pretrain")):
        for f in (cfg.out / step / layout.REJECTED).glob("part-*.parquet"):
            keys.update(layout.read_table(f, columns=["key"]).column("key").to_pylist())
    for f in (cfg.out / "shards").glob("part-*.parquet"):
        keys.update(layout.read_table(f, columns=["key"]).column("key").to_pylist())
    assert len(keys) == urls.num_rows and set(keys.values()) == {1}  # no row lost or duplicated
    stored = objects(s3_server, "prep/")
    assert "prep/accounting.json" in stored and "prep/report/index.html" in stored
    assert not [k for k in stored if "tmp-" in k or "_work" in k]  # no temporary object left
    assert (cfg.out / "accounting.json").read_json() == acc


def test_rerun_on_s3_skips_every_shard_and_changes_no_object(prepared, s3_server, capsys):
    _, acc, inputs = prepared
    before = {k: v for k, v in objects(s3_server, "prep/").items() if not k.startswith("prep/report/")}
    time.sleep(1.1)  # a rewrite would show in the last-modified time (second resolution)
    capsys.readouterr()
    again = prepare.run(load_config(CONFIGS / "demo.yaml", [*inputs, f"output_dir=s3://{BUCKET}/prep"]))
    out = capsys.readouterr().out
    after = {k: v for k, v in objects(s3_server, "prep/").items() if not k.startswith("prep/report/")}
    assert again == acc
    assert after == before
    assert "teacher on" not in out and "phase 1/3" not in out


def test_s3_and_local_outputs_are_byte_identical(prepared, tmp_path):
    cfg, acc, inputs = prepared
    local = load_config(CONFIGS / "demo.yaml", [*inputs, f"output_dir={tmp_path / 'prep'}"])
    assert prepare.run(local) == acc
    compared = 0
    for step in graph.DATASETS:
        for sub in ("", layout.REJECTED):
            here, there = local.out / step, cfg.out / step
            if sub:
                here, there = here / sub, there / sub
            names = here.names(".parquet")
            assert names == there.names(".parquet"), (step, sub)
            for n in names:
                assert (here / n).read_bytes() == (there / n).read_bytes(), f"{step}/{sub}/{n}"
                compared += 1
    assert compared == 2 * sum(len(layout.finished_shards(local.out / step)) for step in graph.DATASETS) > 0


def test_a_killed_download_on_s3_is_relaunched_without_losing_or_duplicating_rows(inputs, s3_server, tmp_path):
    """The download step as a job (its own embedded Ray), killed with SIGKILL once a shard is finished,
    then relaunched: every input row ends up once, kept or rejected."""
    prefix = f"s3://{BUCKET}/killed"
    overrides = [*inputs, f"output_dir={prefix}", "download.rows_per_shard=8", "ray.num_cpus=2",
                 "download.cpus_per_shard=1", "download.threads_per_shard=2"]  # fmt: skip
    argv = [sys.executable, "-m", "pipelines.download", "--config", str(CONFIGS / "demo.yaml")]
    argv += [a for o in overrides for a in ("--set", o)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = Store.at(f"{prefix}/download", endpoint_override=s3_server)
    log = tmp_path / "first.log"
    with open(log, "wb") as f:
        proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
        deadline = time.monotonic() + 300
        while not layout.finished_shards(out) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert proc.poll() is None, log.read_text()[-3000:]  # killed mid-run, not after the end
        finished_at_kill = layout.finished_shards(out)
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    shards = (out / "_input" / "_SUCCESS.json").read_json()
    assert finished_at_kill and len(finished_at_kill) < len(shards["shards"])
    done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    resumed = re.search(r"\[download\] (\d+) input shards, (\d+) already finished", done.stdout)
    assert resumed and int(resumed[1]) == len(shards["shards"]), done.stdout[-3000:]
    assert len(finished_at_kill) <= int(resumed[2]) < len(shards["shards"])
    keys = Counter()
    for n in layout.finished_shards(out):
        for f in (out / f"{n}.parquet", out / layout.REJECTED / f"{n}.parquet"):
            keys.update(layout.read_table(f, columns=["key"]).column("key").to_pylist())
    assert len(keys) == shards["rows"] and set(keys.values()) == {1}
    manifest = (out / "manifest.json").read_json()
    assert manifest["counts"]["rows_in"] == shards["rows"] == manifest["counts"]["kept"] + manifest["counts"][
        "rejected_total"]  # fmt: skip
