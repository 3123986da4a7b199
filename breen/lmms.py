"""BREEN as an lmms-eval model: ``--model breen`` (greedy ``generate_until``, ``loglikelihood``).

Registered through lmms-eval's entry-point group ``lmms_eval.models`` (``pyproject.toml``:
``breen = "breen.lmms:MANIFEST"``): once this project is installed, lmms-eval itself resolves
``--model breen`` to `Breen`, with no fork and no ``LMMS_EVAL_PLUGINS``. Needs the ``eval`` extra.

    python -m lmms_eval --model breen --model_args pretrained=DIR,device=cuda,dtype=bfloat16 --tasks mmmu_val

`jobs.eval` wraps this (object-store exports, the built-in offline task, the results file).

Prompt: lmms-eval's context string is the user question of the stage-3 inference layout
(`breen.data.encode_prompt`, which also drops ``<image>`` placeholders); the request's image goes with
it. BREEN reads one image per prompt: with several, the first is used (and a warning says so); without
any, the prompt is text-only.

- ``generate_until``: `breen.generate.answer` per request (greedy, KV cache; ``until`` and
  ``max_new_tokens`` from the task's generation kwargs; sampling settings are ignored with a warning).
  Not batched: rows of one batch have their image and query blocks at different positions, so batching
  would need left padding through the image path.
- ``loglikelihood``: ``(sum of log p(continuation token | prompt, image, earlier tokens), is_greedy)``,
  the lmms-eval interface's definition; the continuations of one prompt run as one right-padded batch
  (padding after the last real token changes nothing before it under causal attention). Note that
  lmms-eval 0.7.3's stock ``multiple_choice`` scoring picks the *smallest* value (its own models return
  a mean loss): the built-in task scores with `jobs.eval.choice_results` (largest log-prob) instead.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from loguru import logger
from PIL import Image

from breen.data import encode_prompt, encode_text
from breen.generate import answer, load
from breen.model import BreenForCausalLM

MANIFEST = ModelManifest(model_id="breen", simple_class_path="breen.lmms.Breen")
"""What the ``lmms_eval.models`` entry point hands lmms-eval (the class loads only when used)."""


def score_continuations(
    model: BreenForCausalLM, prompt: dict[str, Any], continuations: list[list[int]], pad_id: int = 0
) -> list[tuple[float, bool]]:
    """(sum log-prob, is_greedy) of each token list after one encoded prompt (`encode_prompt` output).

    One forward over [N, L_prompt + longest continuation] (right-padded with `pad_id`); logits only for
    the positions that predict continuation tokens.
    """
    n, width = len(continuations), max(len(c) for c in continuations)
    if min(len(c) for c in continuations) == 0:
        raise ValueError("an empty continuation has no log-likelihood")
    device = model.device
    prompt_ids = torch.from_numpy(prompt["input_ids"])
    ids = torch.full((n, len(prompt_ids) + width), pad_id, dtype=torch.long)  # [N, Lp + W]
    ids[:, : len(prompt_ids)] = prompt_ids
    for row, cont in enumerate(continuations):
        ids[row, len(prompt_ids) : len(prompt_ids) + len(cont)] = torch.tensor(cont)
    pixel_values = image_grid = None
    if "pixel_values" in prompt:
        pixel_values = torch.from_numpy(prompt["pixel_values"]).expand(n, -1, -1, -1).to(device)  # [N, 3, S, S]
        image_grid = torch.from_numpy(prompt["image_grid"]).expand(n, 2).to(device)  # [N, 2]
    with torch.no_grad():
        out = model(
            input_ids=ids.to(device),
            pixel_values=pixel_values,
            image_grid=image_grid,
            use_cache=False,
            logits_to_keep=width + 1,  # positions Lp - 1 .. Lp + W - 1; position Lp - 1 + j predicts token j
        )
    logprobs = torch.log_softmax(out.logits[:, :width].float(), dim=-1)  # [N, W, V]
    scores = []
    for row, cont in enumerate(continuations):
        target = torch.tensor(cont, device=logprobs.device)  # [C]
        lp = logprobs[row, : len(cont)]  # [C, V]
        total = lp.gather(-1, target[:, None]).sum()
        scores.append((float(total), bool((lp.argmax(-1) == target).all())))
    return scores


def _flatten(visuals: Any) -> list[Any]:
    if visuals is None:
        return []
    if not isinstance(visuals, (list, tuple)):
        return [visuals]
    return [v for item in visuals for v in _flatten(item)]


class Breen(lmms):
    """lmms-eval model for a BREEN directory (``config.json``, safetensors, tokenizer files).

    Model args: ``pretrained`` (local directory), ``device`` (auto, cpu, cuda, cuda:N), ``dtype``
    (float32, bfloat16, float16), ``max_new_tokens`` (when a task does not say; default 256).
    """

    def __init__(
        self,
        pretrained: str,
        device: str | None = "auto",
        dtype: str = "float32",
        max_new_tokens: int | str = 256,
        batch_size: int | str | None = 1,
        **unused: Any,
    ) -> None:
        super().__init__()
        if unused:
            logger.warning(f"breen: model args ignored: {sorted(unused)}")
        if batch_size not in (None, 1, "1"):
            logger.warning("breen: batch_size is ignored (generation runs per request; see breen.lmms)")
        self.model, self.tokenizer = load(pretrained, device or "auto", dtype)
        self.max_new_tokens = int(max_new_tokens)
        self._warned: set[str] = set()

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(f"breen: {message}")

    def _image(self, doc_to_visual: Callable | None, doc_id: int, task: str, split: str) -> Image.Image | None:
        """The request's image (the first of several), or None for a text-only request."""
        if doc_to_visual is None:
            return None
        visuals = _flatten(doc_to_visual(self.task_dict[task][split][doc_id]))
        if not visuals:
            return None
        if len(visuals) > 1:
            self._warn_once("images", f"{task}: requests with {len(visuals)} images; BREEN reads the first")
        if not isinstance(visuals[0], Image.Image):
            raise TypeError(f"{task}: BREEN reads images, got {type(visuals[0]).__name__} (video or audio?)")
        return visuals[0]

    def generate_until(self, requests: list[Instance]) -> list[str]:
        answers = []
        for request in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            kwargs = dict(gen_kwargs or {})
            until = kwargs.pop("until", None) or []
            max_new_tokens = int(kwargs.pop("max_new_tokens", None) or self.max_new_tokens)
            if kwargs.get("do_sample") or float(kwargs.get("temperature") or 0) > 0:
                self._warn_once("sampling", f"{task}: sampling settings ignored, decoding is greedy")
            answers.append(
                answer(
                    self.model,
                    self.tokenizer,
                    context,
                    image=self._image(doc_to_visual, doc_id, task, split),
                    max_new_tokens=max_new_tokens,
                    until=[until] if isinstance(until, str) else list(until),
                )
            )
        return answers

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        # requests that share a prompt and image (the choices of one question) score in one batch
        groups: dict[tuple, list[int]] = {}
        for i, request in enumerate(requests):
            context, _, *where = request.args
            groups.setdefault((context, *where), []).append(i)
        pad_id = self.tokenizer.pad_token_id or 0
        for (context, *where), members in groups.items():
            doc_to_visual, doc_id, task, split = where if where else (None, None, None, None)
            image = self._image(doc_to_visual, doc_id, task, split)
            prompt = encode_prompt(self.tokenizer, self.model.config, question=context, image=image)
            conts = [self._continuation(requests[i], doc_id, task, split) for i in members]
            scores = score_continuations(self.model, prompt, [encode_text(self.tokenizer, c) for c in conts], pad_id)
            for i, score in zip(members, scores, strict=True):
                results[i] = score
        return [r for r in results if r is not None]

    def _continuation(self, request: Instance, doc_id: Any, task: Any, split: Any) -> str:
        target = request.args[1]
        if callable(target):  # the `loglikelihood` output type passes the task's doc_to_target
            target = target(self.task_dict[task][split][doc_id])
        return str(target)

    def generate_until_multi_round(self, requests: Iterable[Instance]) -> list[str]:
        raise NotImplementedError("breen: multi-round generation is not supported")
