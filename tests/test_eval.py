"""Evaluation: the lmms-eval plugin (`breen.lmms`) and `python -m jobs.eval`, offline on CPU.

A tiny random export (`jobs.tiny.save_tiny_breen`, no training) is scored by real lmms-eval on the built-in
shapes tasks; the plugin's two request types are checked against `breen.generate.greedy_generate` and a
log-likelihood computed directly from the model's logits, through lmms-eval's own `Instance` objects.

Run:  .venv/bin/python -m pytest -q tests/test_eval.py
"""

from __future__ import annotations

import contextlib
import json
import os

os.environ["HF_HUB_OFFLINE"] = "1"  # before datasets / huggingface_hub read them
os.environ["HF_DATASETS_OFFLINE"] = "1"

import numpy as np
import pytest
import torch
from lmms_eval.api.instance import Instance

from breen.data import encode_prompt, encode_text
from breen.generate import greedy_generate, stop_ids
from jobs import eval as jeval
from jobs.tiny import save_tiny_breen

TASK, SPLIT = "t", "test"


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    return save_tiny_breen(tmp_path_factory.mktemp("run") / "stage3" / "export")


@pytest.fixture(scope="module")
def lm(export):
    from breen.lmms import Breen

    lm = Breen(pretrained=str(export), device="cpu")
    rng = np.random.default_rng(0)
    lm.task_dict = {
        TASK: {
            SPLIT: [
                {"image": jeval.draw_shape("circle", "red", rng)},
                {"image": None},  # a text-only document
            ]
        }
    }
    return lm


def visual(doc):
    return [doc["image"]] if doc["image"] is not None else []


def request(kind: str, doc_id: int, *args) -> Instance:
    return Instance(kind, (*args, visual, doc_id, TASK, SPLIT), idx=0, metadata={"task": TASK, "doc_id": doc_id, "repeats": 1})


def reference_answer(lm, question: str, doc_id: int, max_new_tokens: int) -> str:
    """`breen.generate.greedy_generate` on the same prompt, decoded."""
    inputs = encode_prompt(lm.tokenizer, lm.model.config, question=question, image=lm.task_dict[TASK][SPLIT][doc_id]["image"])
    pixel_values = torch.from_numpy(inputs["pixel_values"]) if "pixel_values" in inputs else None
    tokens = greedy_generate(
        lm.model,
        torch.from_numpy(inputs["input_ids"]),
        pixel_values,
        torch.from_numpy(inputs["image_grid"]),
        max_new_tokens=max_new_tokens,
        eos_token_ids=stop_ids(lm.tokenizer, lm.model),
    )
    return lm.tokenizer.decode(tokens, skip_special_tokens=True)


@contextlib.contextmanager
def forward_calls(model):
    """Count the model's forward calls inside the block."""
    calls: list[int] = []
    hook = model.register_forward_hook(lambda *_: calls.append(1))
    try:
        yield calls
    finally:
        hook.remove()


def test_entry_point_registers_the_plugin():
    from lmms_eval.models import get_model

    from breen.lmms import Breen

    assert get_model("breen") is Breen


@pytest.mark.parametrize("doc_id", [0, 1], ids=["image", "text-only"])
def test_generate_until_is_greedy_generate(lm, doc_id):
    question = "What colour is the shape?"
    (out,) = lm.generate_until([request("generate_until", doc_id, question, {"max_new_tokens": 12})])
    assert out == reference_answer(lm, question, doc_id, 12)
    # max_new_tokens from the task's generation kwargs: the prompt's forward, then one per new token
    with forward_calls(lm.model) as calls:
        (short,) = lm.generate_until([request("generate_until", doc_id, question, {"max_new_tokens": 3})])
    assert short == reference_answer(lm, question, doc_id, 3) and len(calls) <= 1 + 3


def test_generate_until_stops_at_until(lm):
    question = "Describe the picture."
    (full,) = lm.generate_until([request("generate_until", 0, question, {"max_new_tokens": 24})])
    # a stop string from the middle of the free answer (whole characters, first seen there)
    k = next(k for k in range(1, len(full) - 1) if "\ufffd" not in full[k : k + 2] and full.find(full[k : k + 2]) == k)
    stop = full[k : k + 2]
    with forward_calls(lm.model) as calls:
        (cut,) = lm.generate_until([request("generate_until", 0, question, {"until": [stop], "max_new_tokens": 24})])
    assert cut == full[:k]
    assert len(calls) < 24, "decoding went on after the stop string"


def test_loglikelihood_is_the_sum_of_continuation_logprobs(lm):
    question = "What colour is the shape?"
    greedy = reference_answer(lm, question, 0, 2)  # a continuation greedy decoding produces
    conts = ["red", "blue square", greedy]
    reqs = [request("loglikelihood", 0, question, c) for c in conts] + [request("loglikelihood", 1, "Hi", "there")]
    got = lm.loglikelihood(reqs)
    for (ll, is_greedy), req in zip(got, reqs, strict=True):
        context, cont, _, doc_id, *_ = req.args
        prompt = encode_prompt(lm.tokenizer, lm.model.config, question=context, image=lm.task_dict[TASK][SPLIT][doc_id]["image"])
        cont_ids = encode_text(lm.tokenizer, cont)
        ids = torch.tensor([[*prompt["input_ids"], *cont_ids]])  # one unpadded row
        kwargs = {}
        if "pixel_values" in prompt:
            kwargs = {"pixel_values": torch.from_numpy(prompt["pixel_values"])[None], "image_grid": torch.from_numpy(prompt["image_grid"])[None]}
        with torch.no_grad():
            logits = lm.model(input_ids=ids, use_cache=False, **kwargs).logits[0].float()  # [L, V]
        start = len(prompt["input_ids"]) - 1  # logits at t predict token t + 1
        logprobs = torch.log_softmax(logits[start : start + len(cont_ids)], -1)
        want = sum(float(logprobs[i, t]) for i, t in enumerate(cont_ids))
        assert ll == pytest.approx(want, abs=1e-4), cont
        assert is_greedy == all(int(logprobs[i].argmax()) == t for i, t in enumerate(cont_ids))
        assert ll < 0
    assert got[2][1], "the greedy continuation is not greedy"
    assert not got[1][1]


def test_builtin_task_files(tmp_path):
    import yaml

    out = jeval.build_task(tmp_path)
    assert sorted(p.name for p in out.iterdir()) == ["breen_shapes.parquet", "breen_shapes.yaml", "breen_shapes_gen.yaml"]
    docs = jeval.shape_docs(6)
    assert [d["target"] for d in docs] == [d["choices"][d["answer"]] for d in docs]
    assert docs == jeval.shape_docs(6), "not deterministic"
    text = (out / "breen_shapes_gen.yaml").read_text()
    assert yaml.safe_load(text)["doc_to_text"] == "{{question}} Answer with one word."
    # lmms-eval 0.7.3 hands a choice's (log-likelihood, is_greedy) over as its str(); both forms score
    doc = {"answer": 1}
    assert jeval.choice_results(doc, ["(-3.0, False)", "(-1.0, True)"]) == {"acc": 1.0}
    assert jeval.choice_results(doc, [(-1.0, True), (-3.0, False)]) == {"acc": 0.0}


def test_cli_refuses_a_missing_export(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        jeval.main(["--model", str(tmp_path / "nope"), "--tasks", "breen_shapes"])
    assert e.value.code == 2
    assert "not a BREEN directory" in capsys.readouterr().err


@pytest.mark.slow
def test_lmms_eval_scores_the_builtin_tasks(export, capsys):
    """Real lmms-eval (task index, dataset loading, requests, metrics) runs the plugin offline."""
    with pytest.raises(SystemExit) as e:  # an unknown task is refused before the model loads
        jeval.main(["--model", str(export), "--tasks", "breen_shapes,no_such_task"])
    assert e.value.code == 2 and "no_such_task" in capsys.readouterr().err

    assert jeval.main(["--model", str(export), "--tasks", "breen_shapes,breen_shapes_gen", "--limit", "8", "--device", "cpu"]) == 0
    (path,) = (export.parent / "eval").glob("results_breen_shapes+breen_shapes_gen_*.json")
    record = json.loads(path.read_text())
    assert record["n-samples"]["breen_shapes"]["effective"] == 8
    assert record["environment"]["lmms-eval"] == "0.7.3"
    acc = record["results"]["breen_shapes"]["acc,none"]
    exact = record["results"]["breen_shapes_gen"]["exact_match,none"]
    assert 0.0 <= acc <= 1.0 and 0.0 <= exact <= 1.0
    out = capsys.readouterr().out
    assert f"breen_shapes acc {acc:.4f}" in out and "breen_shapes_gen exact_match" in out
