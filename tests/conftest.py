"""Shared fixtures: one embedded local Ray cluster per test session, free ports."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import pytest

from bench.s3server import free_port

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Dummy credentials for the S3 server the tests start (`s3_server`), set before any Ray worker starts so
# that workers inherit them; no request ever leaves 127.0.0.1 (every S3 location names its endpoint).
for _k, _v in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_EC2_METADATA_DISABLED": "true"}.items():  # fmt: skip
    os.environ.setdefault(_k, _v)


# Remote folders and files the tests fetch (`breen.storage.fetch_dir`) go to a cache of this session only.
if "BREEN_CACHE" not in os.environ:
    os.environ["BREEN_CACHE"] = tempfile.mkdtemp(prefix="breen-test-cache-")
    atexit.register(shutil.rmtree, os.environ["BREEN_CACHE"], ignore_errors=True)

CONFIGS = Path(__file__).resolve().parent.parent / "pipelines" / "configs"


@pytest.fixture(autouse=True)
def _pillow_refuses_truncated_images():
    """lmms-eval (imported when tests/test_eval.py is collected) sets Pillow's process-wide
    ``ImageFile.LOAD_TRUNCATED_IMAGES = True``; every other test runs with Pillow's default (False), as
    the pipelines do in their own processes."""
    from PIL import ImageFile

    ImageFile.LOAD_TRUNCATED_IMAGES = False
    yield


@pytest.fixture(scope="session")
def s3_server():
    """A real S3 API (`moto_server`, a subprocess on a free 127.0.0.1 port: `bench.s3server`) with one
    bucket `breen-test`; credentials are the dummy values set above. Yields the endpoint URL."""
    from bench.s3server import local_s3_server

    with local_s3_server(buckets=("breen-test",)) as endpoint:
        yield endpoint


@pytest.fixture(scope="session")
def ray_local():
    """A local Ray started once for the session (4 logical CPUs so actors and tasks overlap)."""
    import ray

    from pipelines.raystart import init_ray

    init_ray(None, num_cpus=4)
    yield ray
    ray.shutdown()


def with_set(*items: str) -> list[str]:
    """Command-line arguments: each ``KEY=VALUE`` as ``--set KEY=VALUE``, options (``--x``) as they are."""
    return [a for item in items for a in ((item,) if item.startswith("-") else ("--set", item))]


def write_tiny_teacher_weights(path: Path) -> Path:
    """A tiny random open_clip ViT (the demo's `tiny-vit.json`) saved as safetensors."""
    import open_clip
    import torch
    from safetensors.torch import save_file

    open_clip.add_model_config(str(CONFIGS / "tiny-vit.json"))
    torch.manual_seed(123)
    model = open_clip.create_model("tiny-vit", pretrained=None)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


@pytest.fixture(scope="session")
def prepared_demo(tmp_path_factory, ray_local):
    """The demo data preparation (80 synthetic images, teacher from a weights file), run once per session:
    returns (config, accounting, overrides, teacher weights). Its `shards/` and `sft_shards/` also feed
    the training tests."""
    from pipelines import prepare
    from pipelines.config import load_config

    root = tmp_path_factory.mktemp("prep")
    weights = write_tiny_teacher_weights(root / "tiny-vit.safetensors")
    overrides = [
        f"output_dir={root / 'out'}",
        "input.synthetic.n_images=80",
        f"input.synthetic.port={free_port()}",
        "teacher.random_init_seed=null",
        f"teacher.weights={weights}",
        f"teacher.model_config={CONFIGS / 'tiny-vit.json'}",
        "download.rows_per_shard=24",
        "shards.rows_per_file=16",
    ]
    cfg = load_config(CONFIGS / "demo.yaml", overrides)
    acc = prepare.run(cfg)
    return cfg, acc, overrides, weights


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except ImportError:
        has_gpu = False
    skip = pytest.mark.skip(reason="needs a CUDA GPU (none on this machine)")
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip)


# ----------------------------------------------------------------------------- training-side fixtures
TINY_CLIP_DIM = 32  # tests._training.CLIP_DIM


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory) -> Path:
    """A BREEN directory as the driver sees it: config.json + tokenizer (no weights needed)."""
    from breen.config import BreenConfig
    from jobs.tiny import tiny_tokenizer

    out = tmp_path_factory.mktemp("init")
    BreenConfig.preset("tiny", clip_dim=TINY_CLIP_DIM).save_pretrained(out)
    tiny_tokenizer().save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def model_config(init_dir):
    from breen.config import BreenConfig

    return BreenConfig.from_pretrained(init_dir)


@pytest.fixture
def shards(tmp_path) -> Path:
    """20 caption rows in files of 8, 8, 4 rows."""
    from jobs.tiny import write_tiny_shards

    return write_tiny_shards(tmp_path / "shards", 20, clip_dim=TINY_CLIP_DIM, rows_per_file=8)
