"""Qwen2 -> BREEN conversion: text-only parity with transformers' Qwen2ForCausalLM, gated formula, key map."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from breen.convert import convert_qwen2, fresh_parameter_names, main, qwen2_key_map
from tests._tiny_models import save_tiny_qwen2_dir, tiny_config, tiny_qwen2


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    return save_tiny_qwen2_dir(tmp_path_factory.mktemp("qwen2"))


def _ids_and_mask():
    torch.manual_seed(1)
    ids = torch.randint(3, 390, (2, 19))
    mask = torch.ones_like(ids)
    mask[1, 13:] = 0  # right padding
    return ids, mask


def test_text_only_logits_match_qwen2_with_identity_gates(qwen_dir):
    ref = tiny_qwen2()
    model = convert_qwen2(qwen_dir, expert_gate="none")
    ids, mask = _ids_and_mask()
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).logits
        got = model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert (want[real] - got[real]).abs().max().item() < 1e-5


class _GatedQwenMLP(nn.Module):
    """Reference formula: sigmoid(w . x) * SwiGLU(x) around the original Qwen2 MLP."""

    def __init__(self, mlp, gate_weight):
        super().__init__()
        self.mlp, self.w = mlp, gate_weight

    def forward(self, x):
        return torch.sigmoid(x @ self.w.T) * self.mlp(x)


def test_gated_text_path_equals_reference_formula(qwen_dir):
    ref = tiny_qwen2()
    model = convert_qwen2(qwen_dir)  # released gates: sigmoid, N(0, 0.02)
    for ref_layer, layer in zip(ref.model.layers, model.model.layers, strict=True):
        ref_layer.mlp = _GatedQwenMLP(ref_layer.mlp, layer.mlp.text_expert_gate.weight.detach())
    ids, mask = _ids_and_mask()
    with torch.no_grad():
        want = ref(ids, attention_mask=mask).logits
        got = model(input_ids=ids, attention_mask=mask).logits
        ungated = convert_qwen2(qwen_dir, expert_gate="none")(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    assert (want[real] - got[real]).abs().max().item() < 1e-5
    assert (ungated[real] - got[real]).abs().max().item() > 1e-3  # the gates do change the output


def test_both_experts_start_as_copies_and_fresh_params_are_listed(qwen_dir):
    model = convert_qwen2(qwen_dir)
    hf = load_file(str(qwen_dir / "model.safetensors"))
    for i, layer in enumerate(model.model.layers):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            original = hf[f"model.layers.{i}.mlp.{proj}.weight"]
            assert torch.equal(getattr(layer.mlp.text_expert, proj).weight, original)
            assert torch.equal(getattr(layer.mlp.image_expert, proj).weight, original)
    fresh = fresh_parameter_names(model.config)
    assert "queries" in fresh and "model.layers.0.mlp.image_expert_gate.weight" in fresh
    assert not any("image_expert." in n or "self_attn" in n for n in fresh)
    assert len(qwen2_key_map(model.config)) == len(hf)


def test_conversion_is_reproducible_from_seed(qwen_dir):
    a, b = convert_qwen2(qwen_dir, seed=3), convert_qwen2(qwen_dir, seed=3)
    assert all(
        torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )


def test_unexpected_key_is_an_error(qwen_dir, tmp_path):
    tensors = load_file(str(qwen_dir / "model.safetensors"))
    tensors["model.layers.0.mlp.extra.weight"] = torch.zeros(2)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((qwen_dir / "config.json").read_text())
    with pytest.raises(KeyError, match="unexpected Qwen2 key"):
        convert_qwen2(tmp_path)


def test_tied_embeddings_convert(tmp_path):
    config = tiny_config(tie_word_embeddings=True)
    qwen_dir = save_tiny_qwen2_dir(tmp_path / "qwen", config)
    ref, model = tiny_qwen2(config), convert_qwen2(qwen_dir, expert_gate="none")
    assert model.lm_head.weight is model.model.embed_tokens.weight
    ids, _ = _ids_and_mask()
    with torch.no_grad():
        assert (ref(ids).logits - model(input_ids=ids).logits).abs().max().item() < 1e-5


def test_convert_cli_writes_loadable_dir(qwen_dir, tmp_path, capsys):
    out = tmp_path / "breen"
    main(["--qwen", str(qwen_dir), "--out", str(out), "--dtype", "float32", "--set", "image_size=112"])
    assert json.loads((out / "config.json").read_text())["image_size"] == 112
    assert (out / "tokenizer.json").exists() and (out / "model.safetensors").exists()
    assert "BREEN model written" in capsys.readouterr().out
