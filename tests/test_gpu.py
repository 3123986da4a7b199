"""GPU paths (skipped without CUDA): packed training batches with the GPU attention backend (flash-attn
varlen when installed, else per-sample SDPA) in bf16, and the teacher's GPU path (pinned memory, decode
threads, bf16 autocast) against its CPU fp32 result."""

from __future__ import annotations

import pyarrow as pa
import pytest
import torch

from breen.attention import default_attn_implementation
from breen.data import collate, pack
from breen.model import BreenForCausalLM
from breen.shard_format import tensor_values
from pipelines.config import TeacherConfig
from pipelines.teacher import build_teacher, teacher_table
from tests._tiny_models import png_bytes, tiny_config, tiny_samples
from tests.conftest import CONFIGS

pytestmark = pytest.mark.gpu


def test_packed_bf16_losses_match_padded_on_gpu():
    torch.manual_seed(0)
    config = tiny_config()
    config._attn_implementation = "sdpa"
    model = BreenForCausalLM(config).to("cuda", torch.bfloat16)
    samples = tiny_samples() + tiny_samples(seed=10)[::-1]
    with torch.no_grad():
        ref = model(**{k: v.cuda() for k, v in collate(samples, config.pad_token_id, 8).items()})
        model.config._attn_implementation = default_attn_implementation()  # flash varlen with the gpu extra
        got = model(**{k: v.cuda() for k, v in pack(samples, config.pad_token_id, 8).items()})
    assert got.loss.item() == pytest.approx(ref.loss.item(), rel=2e-2)
    assert got.align_loss_fine.item() == pytest.approx(ref.align_loss_fine.item(), rel=2e-2)


def test_teacher_gpu_path_matches_cpu():
    cfg = TeacherConfig(model_config=str(CONFIGS / "tiny-vit.json"), random_init_seed=0)
    cpu_model, _, _ = build_teacher(cfg, "cpu")
    gpu_model, _, _ = build_teacher(cfg, "cuda")
    table = pa.table(
        {"key": [str(i) for i in range(6)], "image": [png_bytes(50 + 9 * i, 70, i) for i in range(6)]}
    )
    dim = cpu_model.visual.transformer.width
    ref, _ = teacher_table(table, cpu_model, dim, 4, "cpu")
    got, _ = teacher_table(table, gpu_model, dim, 4, "cuda", decode_threads=3, prefetch=2)
    a, b = (
        tensor_values(got.column("fine"))[0].astype("float32"),
        tensor_values(ref.column("fine"))[0].astype("float32"),
    )
    scale = abs(b).mean()
    assert abs(a - b).mean() < 0.05 * scale  # bf16 autocast vs fp32
