"""Save/load, generation, KV cache, parameter counts, stage trainability, entrypoints and imports."""

import subprocess
import sys

import pytest
import torch

from breen.config import PAPER_FIGURE_SETTINGS, BreenConfig
from breen.data import encode_prompt
from breen.model import BreenForCausalLM
from breen.stages import param_groups, set_trainable, trainable_components
from tests._tiny_models import png_bytes, save_tiny_qwen2_dir, tiny_batch, tiny_config, tiny_tokenizer


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return BreenForCausalLM(tiny_config()).eval()


@pytest.fixture(scope="module")
def prompt(model):
    p = encode_prompt(
        tiny_tokenizer(), model.config, question="What is in the image?", image=png_bytes(64, 48)
    )
    return {k: torch.from_numpy(v)[None] for k, v in p.items()}  # batch of one


def test_save_load_round_trip_is_exact(model, tmp_path):
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    loaded = BreenForCausalLM.from_pretrained(tmp_path).eval()
    want, got = model.state_dict(), loaded.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    drop = ("_name_or_path",)
    assert {k: v for k, v in loaded.config.to_dict().items() if k not in drop} == {
        k: v for k, v in model.config.to_dict().items() if k not in drop
    }
    batch = tiny_batch()
    with torch.no_grad():
        a, b = model(**batch), loaded(**batch)
    assert torch.equal(a.loss, b.loss)


def test_kv_cache_decode_equals_full_recompute(model, prompt):
    ids = prompt["input_ids"]
    extra = torch.tensor([[40, 41, 42, 43]])
    with torch.no_grad():
        full = model(
            input_ids=torch.cat([ids, extra], 1),
            pixel_values=prompt["pixel_values"],
            image_grid=prompt["image_grid"],
            use_cache=False,
        ).logits
        out = model(
            input_ids=ids,
            pixel_values=prompt["pixel_values"],
            image_grid=prompt["image_grid"],
            use_cache=True,
        )
        steps = [out.logits[:, -1]]
        for t in range(extra.shape[1]):
            out = model(input_ids=extra[:, t : t + 1], cache=out.cache, use_cache=True)
            steps.append(out.logits[:, -1])
    cached = torch.stack(steps, 1)  # [1, 5, V]
    assert (cached - full[:, ids.shape[1] - 1 :]).abs().max().item() < 1e-5


def test_generate_is_deterministic_and_matches_hf_generate(model, prompt):
    from breen.generate import greedy_generate

    args = (prompt["input_ids"], prompt["pixel_values"], prompt["image_grid"])
    first = greedy_generate(model, *args, max_new_tokens=8)
    assert first == greedy_generate(model, *args, max_new_tokens=8) and len(first) == 8
    hf = model.generate(
        input_ids=args[0],
        pixel_values=args[1],
        image_grid=args[2],
        max_new_tokens=8,
        do_sample=False,
        eos_token_id=None,
    )
    assert hf[0, args[0].shape[1] :].tolist() == first


def test_qwen25_7b_parameter_counts_on_meta_device():
    config = BreenConfig.preset("qwen2.5-7b")
    with torch.device("meta"):
        big = BreenForCausalLM(config)
    stored, active = big.num_params(), big.num_params(active=True)
    print(
        f"\nqwen2.5-7b BREEN: stored {stored / 1e9:.3f}B ({stored:,}), active per token {active / 1e9:.3f}B ({active:,})"
    )
    assert 13.2e9 < stored < 13.45e9 and 7.5e9 < active < 7.7e9
    counts = config.param_counts()
    assert (counts["stored"], counts["active"]) == (stored, active)
    assert counts["image_experts"] == 28 * 3 * 3584 * 18944  # ~5.70B
    assert config.flops_per_token(2500) > 6 * 7e9
    assert 0.7e9 < BreenConfig.preset("mid").param_counts()["stored"] < 1.2e9


def test_stage_trainability_and_learning_rates(capsys):
    torch.manual_seed(0)
    m = BreenForCausalLM(tiny_config())
    counts = set_trainable(m, "stage1")
    assert "patch_embed" in capsys.readouterr().out
    assert counts["queries"][0] == 0 and counts["align_head"][0] == 0 and counts["image_experts"][1] == 0
    assert (
        not m.lm_head.weight.requires_grad
        and not m.model.layers[0].mlp.text_expert.up_proj.weight.requires_grad
    )
    assert m.model.layers[0].mlp.text_expert_gate.weight.requires_grad
    lrs = {g["name"]: g["lr"] for g in param_groups(m, "stage1")}
    assert lrs == {"patch_embed": 4e-4, "text_gates": 4e-5, "image_experts": 4e-5, "image_gates": 4e-5}
    set_trainable(m, "stage2", log=None)
    assert (
        not m.align_head.proj.weight.requires_grad
        and m.queries.requires_grad
        and m.lm_head.weight.requires_grad
    )
    assert {g["lr"] for g in param_groups(m, "stage3", 2e-5)} == {2e-5}
    figure = tiny_config(**PAPER_FIGURE_SETTINGS)
    assert {"queries", "align_head"} <= set(trainable_components(figure, "stage1"))
    assert "align_head" in trainable_components(figure, "stage3")
    with pytest.raises(ValueError, match="stage"):
        set_trainable(m, "stage4")


def test_gradient_checkpointing_gives_same_loss_and_grads():
    torch.manual_seed(0)
    m = BreenForCausalLM(tiny_config())
    batch = tiny_batch()
    m(**batch).loss.backward()
    want = m.model.layers[0].mlp.image_expert.up_proj.weight.grad.clone()
    m.zero_grad()
    m.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    m(**batch).loss.backward()
    assert torch.allclose(m.model.layers[0].mlp.image_expert.up_proj.weight.grad, want, atol=1e-6)


def test_convert_then_generate_cli(tmp_path, capsys):
    from breen.convert import main as convert_main
    from breen.generate import main as generate_main

    qwen = save_tiny_qwen2_dir(tmp_path / "qwen")
    convert_main(["--qwen", str(qwen), "--out", str(tmp_path / "breen"), "--dtype", "float32"])
    (tmp_path / "img.png").write_bytes(png_bytes(40, 30))
    args = [
        "--model",
        str(tmp_path / "breen"),
        "--image",
        str(tmp_path / "img.png"),
        "--prompt",
        "What is it?",
        "--max-new-tokens",
        "4",
        "--device",
        "cpu",
    ]
    capsys.readouterr()
    generate_main(args)
    first = capsys.readouterr().out
    generate_main(args)
    assert first and capsys.readouterr().out == first  # deterministic


def test_convert_config_file_set_and_print_config(tmp_path, capsys):
    """breen.convert takes its BreenConfig changes as every command does (--config, --set, --print-config);
    a bad field fails before any weight is read."""
    import yaml

    from breen.convert import main as convert_main

    qwen = save_tiny_qwen2_dir(tmp_path / "qwen")
    changes = tmp_path / "breen.yaml"
    changes.write_text("image_size: 112\nfine_grid: 4\n")
    out = tmp_path / "breen"
    convert_main(["--qwen", str(qwen), "--out", str(out), "--config", str(changes), "--set", "fine_grid=2",
                  "--print-config"])  # fmt: skip
    printed = yaml.safe_load(capsys.readouterr().out)
    assert (printed["image_size"], printed["fine_grid"]) == (112, 2) and not out.exists()
    for args, message in ((["--set", "fine_grd=2"], "fine_grd: unknown BreenConfig field"),
                          (["--set", "image_size=big"], "image_size: expected an integer, got 'big'"),
                          (["--set", "align_loss_weight=.inf"], "align_loss_weight: must be a finite number")):  # fmt: skip
        with pytest.raises(SystemExit) as exit_:
            convert_main(["--qwen", str(qwen), "--out", str(out), *args])
        assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not out.exists()


def test_convert_and_generate_with_both_directories_in_a_bucket(tmp_path, capsys, monkeypatch, s3_server):
    """`breen.convert` reads Qwen2 from s3:// and writes BREEN to s3:// (a real S3 API); `breen.generate`
    answers from the s3:// model exactly as from a local copy of the same files."""
    from breen.convert import main as convert_main
    from breen.generate import main as generate_main
    from breen.storage import Store, fetch_dir

    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server)
    monkeypatch.setenv("BREEN_CACHE", str(tmp_path / "cache"))
    qwen = save_tiny_qwen2_dir(tmp_path / "qwen")
    Store.at("s3://breen-test/models/qwen").upload_dir(qwen)
    convert_main(["--qwen", "s3://breen-test/models/qwen", "--out", "s3://breen-test/models/breen", "--dtype",
                  "float32"])  # fmt: skip
    remote = Store.at("s3://breen-test/models/breen")
    assert "config.json" in remote.names() and remote.names(".safetensors")
    local = fetch_dir(remote)
    assert local.is_relative_to(tmp_path / "cache") and fetch_dir(remote) == local  # fetched once, reused
    (tmp_path / "img.png").write_bytes(png_bytes(40, 30))
    args = ["--image", str(tmp_path / "img.png"), "--prompt", "What is it?", "--max-new-tokens", "4",
            "--device", "cpu"]  # fmt: skip
    capsys.readouterr()
    generate_main(["--model", remote.uri, *args])
    from_bucket = capsys.readouterr().out
    generate_main(["--model", str(local), *args])
    assert from_bucket and capsys.readouterr().out == from_bucket


def test_breen_imports_neither_ray_nor_deepspeed():
    code = (
        "import sys, breen.model, breen.data, breen.convert, breen.stages, breen.generate, breen.config;"
        "bad = [m for m in ('ray', 'deepspeed') if m in sys.modules]; assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_generate_rejects_a_missing_image_at_once_without_importing_torch(tmp_path):
    """`python -m breen.generate` checks its inputs before torch, transformers or the model load: exit 2
    in well under the seconds torch alone takes to import."""
    import subprocess
    import sys
    import time

    (tmp_path / "config.json").write_text("{}")
    probe = ("import runpy, sys; sys.argv = ['breen.generate'] + sys.argv[1:]\n"
             "try:\n    runpy.run_module('breen.generate', run_name='__main__')\n"
             "finally:\n    print('torch imported' if 'torch' in sys.modules else 'no torch', file=sys.stderr)")  # fmt: skip
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", probe, "--model", str(tmp_path), "--image", str(tmp_path / "no.jpg"),
                          "--prompt", "hi"], capture_output=True, text=True, timeout=60)  # fmt: skip
    seconds = time.monotonic() - t0
    assert out.returncode == 2, out.stderr
    assert f"--image: {tmp_path / 'no.jpg'}: file not found" in out.stderr
    assert "usage: python -m breen.generate" in out.stderr
    assert "no torch" in out.stderr, out.stderr
    assert seconds < 2.0, f"{seconds:.2f} s"
