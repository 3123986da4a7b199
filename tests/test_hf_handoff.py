"""Hand-off of a training export to transformers (`breen.hf`, `breen.processing`).

A tiny random BREEN goes through the real stage-end writer (`jobs.checkpoint._write_export`); then two
fresh Python processes load the export with transformers' Auto classes and nothing else from this test:
one after `import breen` (registered classes), one where `breen` cannot be imported at all (no site
processing, so the editable install's path hook is absent; ``trust_remote_code=True`` loads the copied
modules). Each must build the same inputs as `breen.data.encode_prompt` through ``AutoProcessor``, give the
in-process model's logits, and answer through ``model.generate`` with the tokens `breen.generate`'s greedy
loop produces. Everything is written under pytest's tmp_path; nothing is downloaded.

Run with:
    .venv/bin/python -m pytest -q tests/test_hf_handoff.py
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import sysconfig

import numpy as np
import pytest
import torch

from breen.data import encode_prompt
from breen.generate import greedy_generate
from breen.hf import AUTO_MAP, REMOTE_MODULES, remote_source
from breen.model import BreenForCausalLM
from breen.processing import BreenProcessor
from jobs.checkpoint import TrainState, _write_export
from tests._tiny_models import png_bytes, tiny_config, tiny_tokenizer

QUESTION = "What is in the image?"
MAX_NEW_TOKENS = 8

# Run in the fresh processes: argv = mode ("registered" | "remote"), export dir, reference file, image file.
CHILD = """
import json, sys
mode, export, ref_file, image_file = sys.argv[1:5]
if mode == "remote":
    try:
        import breen
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit(f"breen is importable from {breen.__file__}: the remote-code check would prove nothing")
else:
    import breen
    heavy = [m for m in ("torch", "transformers") if m in sys.modules]
    assert not heavy, f"import breen imported {heavy}"
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor

kw = {"trust_remote_code": True} if mode == "remote" else {}
config = AutoConfig.from_pretrained(export, **kw)
model = AutoModelForCausalLM.from_pretrained(export, **kw).eval()
processor = AutoProcessor.from_pretrained(export, **kw)
ref = torch.load(ref_file)
with open(image_file, "rb") as f:
    inputs = processor(text=ref["question"], images=f.read())
with torch.no_grad():
    logits = model(**inputs).logits
out = model.generate(**inputs, max_new_tokens=ref["max_new_tokens"], do_sample=False)
new = out[0, inputs["input_ids"].shape[1]:].tolist()
print(json.dumps({
    "classes": [f"{type(x).__module__}.{type(x).__name__}" for x in (config, model, processor)],
    "inputs_equal": {k: torch.equal(inputs[k], ref[k]) for k in ("input_ids", "pixel_values", "image_grid")},
    "logits_shape": list(logits.shape),
    "max_abs_diff": (logits - ref["logits"]).abs().max().item() if logits.shape == ref["logits"].shape else None,
    "generated": new,
    "answer": processor.decode(new, skip_special_tokens=True),
}))
"""


@pytest.fixture(scope="module")
def handoff(tmp_path_factory):
    """The export, the in-process reference (inputs, logits, greedy tokens), and both child results."""
    tmp = tmp_path_factory.mktemp("handoff")
    config, tokenizer = tiny_config(), tiny_tokenizer()
    torch.manual_seed(0)
    model = BreenForCausalLM(config).eval()
    export = tmp / "export"
    _write_export(
        export, dict(model.state_dict()), config, tokenizer, {"stage": "stage3"}, TrainState(stage="stage3")
    )

    image = png_bytes(30, 60, seed=3)  # portrait: a 4x2 token grid on the 4x4 canvas
    (tmp / "image.png").write_bytes(image)
    prompt = encode_prompt(tokenizer, config, question=QUESTION, image=image)
    inputs = {k: torch.from_numpy(v)[None] for k, v in prompt.items()}
    with torch.no_grad():
        logits = model(**inputs).logits
    tokens = greedy_generate(
        model,
        inputs["input_ids"],
        inputs["pixel_values"],
        inputs["image_grid"],
        MAX_NEW_TOKENS,
        eos_token_ids={config.eos_token_id},
    )
    torch.save(
        {**inputs, "logits": logits, "question": QUESTION, "max_new_tokens": MAX_NEW_TOKENS}, tmp / "ref.pt"
    )

    site = sysconfig.get_paths()["purelib"]  # third-party packages, without the .pth files' path hooks
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HOME=str(tmp / "hf-home"), HF_HUB_OFFLINE="1")
    commands = {
        "registered": [sys.executable, "-c", CHILD],
        "remote": [sys.executable, "-I", "-S", "-c", f"import sys; sys.path.append({site!r})\n{CHILD}"],
    }
    args = [str(export), str(tmp / "ref.pt"), str(tmp / "image.png")]
    procs = {
        mode: subprocess.Popen(
            [*cmd, mode, *args], cwd=tmp, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        for mode, cmd in commands.items()
    }  # both at once: each spends most of its time importing torch and transformers
    results = {}  # checked by the test of each mode, so one failing child fails only its own test
    for mode, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=600)
        results[mode] = (proc.returncode, stdout, stderr)
    return {
        "export": export,
        "config": config,
        "tokenizer": tokenizer,
        "image": image,
        "tokens": tokens,
        "logits_shape": list(logits.shape),
        "results": results,
    }


@pytest.mark.parametrize("mode", ["registered", "remote"])
def test_auto_classes_load_the_export_and_match_the_model(handoff, mode):
    """AutoConfig / AutoModelForCausalLM / AutoProcessor in a fresh process: same inputs as encode_prompt,
    same logits as the in-process model, and generate() answers with the greedy loop's tokens."""
    returncode, stdout, stderr = handoff["results"][mode]
    assert returncode == 0, f"{mode} child failed:\n{stderr[-4000:]}"
    got = json.loads(stdout.strip().splitlines()[-1])
    print(f"{mode}: max |logits - in-process logits| = {got['max_abs_diff']}, answer {got['answer']!r}")
    expected = ["BreenConfig", "BreenForCausalLM", "BreenProcessor"]
    assert [c.rsplit(".", 1)[1] for c in got["classes"]] == expected
    origin = "breen." if mode == "registered" else "transformers_modules."
    assert all(c.startswith(origin) for c in got["classes"]), got["classes"]
    assert all(got["inputs_equal"].values()), got["inputs_equal"]
    assert got["logits_shape"] == handoff["logits_shape"]
    assert got["max_abs_diff"] <= 1e-6, got["max_abs_diff"]
    assert got["generated"] == handoff["tokens"]
    assert got["answer"] == handoff["tokenizer"].decode(handoff["tokens"], skip_special_tokens=True)


def test_export_carries_generated_remote_code(handoff):
    """The remote-code files are the package modules with relative imports, and every Auto class is mapped."""
    export = handoff["export"]
    for module, file_name in REMOTE_MODULES.items():
        text = (export / f"{file_name}.py").read_text()
        assert text == remote_source(module)
        absolute = [
            node
            for node in ast.walk(ast.parse(text))
            if (isinstance(node, ast.ImportFrom) and node.level == 0 and node.module.split(".")[0] == "breen")
            or (isinstance(node, ast.Import) and any(a.name.split(".")[0] == "breen" for a in node.names))
        ]
        assert not absolute, f"{file_name}.py imports breen at line {absolute[0].lineno}"
    assert "from .configuration_breen import " in (export / "modeling_breen.py").read_text()
    assert "from .geometry_breen import " in (export / "configuration_breen.py").read_text()
    assert json.loads((export / "config.json").read_text())["auto_map"] == AUTO_MAP
    processor_config = json.loads((export / "processor_config.json").read_text())
    assert processor_config["auto_map"] == {"AutoProcessor": AUTO_MAP["AutoProcessor"]}
    assert "config" not in processor_config  # the geometry has one owner: config.json
    assert {"train_config.json", "breen_stage.json", "model.safetensors", "tokenizer.json"} <= {
        p.name for p in export.iterdir()
    }


def test_processor_equals_encode_prompt(handoff):
    """The processor adds a batch dimension and an attention mask to encode_prompt's arrays, nothing else."""
    processor = BreenProcessor.from_pretrained(handoff["export"])
    config, tokenizer = handoff["config"], handoff["tokenizer"]
    for image in (handoff["image"], png_bytes(64, 40, seed=5), None):
        want = encode_prompt(tokenizer, config, question=QUESTION, image=image)
        got = processor(text=QUESTION, images=image, return_tensors="np")
        assert set(got) == {*want, "attention_mask"}
        for key, value in want.items():
            assert got[key].dtype == value.dtype and np.array_equal(got[key], value[None]), key
        assert (got["attention_mask"] == 1).all() and got["attention_mask"].shape == got["input_ids"].shape
    with pytest.raises(ValueError, match="one prompt at a time"):
        processor(text=[QUESTION, QUESTION])


def test_auto_classes_in_this_process(handoff):
    """In the test process too (breen and transformers imported in whatever order pytest chose)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor

    assert type(AutoConfig.from_pretrained(handoff["export"])).__name__ == "BreenConfig"
    assert type(AutoProcessor.from_pretrained(handoff["export"])) is BreenProcessor
    model = AutoModelForCausalLM.from_pretrained(handoff["export"])
    assert type(model) is BreenForCausalLM


def test_install_registers_at_once_when_transformers_is_loaded_first(handoff, monkeypatch):
    """`import breen` after transformers' auto modules: `install` registers on the spot (no import hook runs)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoProcessor
    from transformers.models.auto import configuration_auto, modeling_auto, processing_auto

    from breen.config import BreenConfig
    from breen.hf import install

    monkeypatch.delitem(configuration_auto.CONFIG_MAPPING._extra_content, "breen")
    monkeypatch.delitem(modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING._extra_content, BreenConfig)
    monkeypatch.delitem(processing_auto.PROCESSOR_MAPPING._extra_content, BreenConfig)
    with pytest.raises(ValueError, match="trust_remote_code"):  # unregistered: only remote code is left
        AutoConfig.from_pretrained(handoff["export"])
    install()
    assert type(AutoConfig.from_pretrained(handoff["export"])) is BreenConfig
    assert type(AutoProcessor.from_pretrained(handoff["export"])) is BreenProcessor
    assert type(AutoModelForCausalLM.from_pretrained(handoff["export"])) is BreenForCausalLM


def test_remote_source_refuses_a_module_outside_the_export(monkeypatch):
    """A package import that the export would not carry is an error at export time, not at load time."""
    monkeypatch.delitem(REMOTE_MODULES, "breen.config")
    with pytest.raises(ValueError, match=r"breen\.config"):
        remote_source("breen.model")
