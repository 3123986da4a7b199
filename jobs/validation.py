"""Validation during training: held-out rows evaluated every ``validation.every_steps`` steps and at the
end of a stage, on every worker, plus a few fixed sample generations.

Held-out rows (never trained on): either ``data.val_fraction``, the rows whose sha256(key) falls below
the fraction (`jobs.ingest.held_out_rows`: a pure function of the key, so the same rows whatever the seed,
worker count or resume, and the training stream leaves them out), or every row of a separate shard set
``data.val_paths``. `plan` settles them before Ray starts: the first ``validation.max_rows`` of them, in
file then row order, are the ones evaluated (`jobs.ingest.validation_items`).

Evaluation (`Validator.evaluate`, every rank, collective): every rank encodes the same rows once at start
(`jobs.ingest.ReadEncode.encode_selected`, rejected samples left out) and evaluates its slice (rows ``r,
r + W, ...``) in micro-batches without gradients, in eval mode, then back to train mode; random states
(Python, NumPy, torch) are restored afterwards, so training is unchanged by it (exact resume holds). Ranks
with fewer batches replay one with weight zero (ZeRO-3 forwards are collective). Sums are reduced across
ranks, so the values do not depend on the worker count up to float rounding:

- ``val/lm_loss``: LM loss per supervised token;
- ``val/align_fine``, ``val/align_coarse``: alignment losses per aligned sample (1 - mean cosine), and
  ``val/cos_fine``, ``val/cos_coarse``: the mean cosines (stages with teacher targets; 0 without);
- ``val/rows`` (rows evaluated), ``val/held_out`` (all held-out rows).

They join the step's record in ``metrics.jsonl`` and go to TensorBoard as ``val/...`` scalars
(`jobs.metrics.Tracker`). Samples: the first ``validation.num_samples`` evaluated rows, the prompt being
the row's tokens before its first supervised one (stages 1-2: the image and the queries; stage 3: the chat
up to the first answer), ``validation.sample_max_new_tokens`` greedy tokens (`breen.generate`, every rank
generates: ZeRO-3), written by rank 0 to ``samples.jsonl`` (step, key, prompt, answer, reference) and
TensorBoard text ``val/samples``. A resumed run evaluates at the same steps with the same weights, so it
logs the same values as an uninterrupted one.
"""

from __future__ import annotations

import itertools
import math
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import numpy as np

from breen.settings import ConfigError
from jobs import ingest
from jobs.config import TrainConfig

if TYPE_CHECKING:
    import torch

# The keys of a validation record, in display order (`table`).
KEYS = ("val/lm_loss", "val/align_fine", "val/align_coarse", "val/cos_fine", "val/cos_coarse")


# ----------------------------------------------------------------------------- the driver: which rows
def plan(
    cfg: TrainConfig, files: list[ingest.ShardFile], model_config
) -> tuple[list[ingest.ShardFile], dict[str, Any]]:
    """(training files with their held-out rows recorded, the validation plan ``{"items", "held_out",
    "source"}``); ``items`` is empty when there is nothing to evaluate. ``data.val_paths`` shards are
    checked as the training shards are (`jobs.ingest.check_shards`)."""
    d, v = cfg.data, cfg.validation
    if d.val_paths:
        try:
            val_files = ingest.list_shards(d.val_paths, cfg.storage.endpoint_override)
            ingest.check_shards(val_files, model_config, d.text_field, teacher=d.teacher)
        except (FileNotFoundError, ValueError) as err:
            raise ConfigError(f"data.val_paths: {err}") from None
        items = ingest.validation_items(val_files, v.max_rows, every_row=True)
        held, source = sum(f.rows for f in val_files), "data.val_paths"
    else:
        files = ingest.hold_out(files, d.val_fraction)
        items = ingest.validation_items(files, v.max_rows)
        held, source = sum(len(f.held_out) for f in files), f"data.val_fraction={d.val_fraction}"
    if not v.enabled:
        items = []
    return files, {"items": items, "held_out": held, "source": source}


def describe(stage: str, val: dict[str, Any], every_steps: int) -> str:
    rows = sum(len(i["rows"]) for i in val["items"])
    if not rows:
        return f"[{stage}] validation: off ({val['held_out']} held-out rows, {val['source']})"
    return (
        f"[{stage}] validation: {val['held_out']} held-out rows ({val['source']}), never trained on; "
        f"{rows} evaluated every {every_steps} steps and at the end"
    )


# ----------------------------------------------------------------------------- the worker: evaluation
@contextmanager
def rng_preserved(device: torch.device) -> Iterator[None]:
    """Python's, NumPy's and torch's random states (CPU, and the device's on CUDA) restored on exit."""
    import torch

    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        yield
    random.setstate(py)
    np.random.set_state(npy)


def supervised_tokens(batch: dict[str, Any]) -> int:
    """Tokens the LM loss averages over (label of the next position >= 0, within one sample)."""
    labels = batch["labels"]
    if "cu_seqlens" in batch:  # packed: [1, T], a sample's last token does not predict the next sample
        bounds = batch["cu_seqlens"].tolist()
        return sum(int((labels[0, lo + 1 : hi] >= 0).sum()) for lo, hi in itertools.pairwise(bounds))
    return int((labels[:, 1:] >= 0).sum())


class Validator:
    """This rank's validation batches and the fixed sample prompts, encoded once; `evaluate` runs them."""

    def __init__(self, cfg: TrainConfig, val: dict[str, Any], tokenizer, model_config, rank: int, world: int,
                 device: torch.device):  # fmt: skip
        self.cfg, self.tokenizer, self.device = cfg, tokenizer, device
        self.image_size = model_config.image_size
        self.every = cfg.validation.every_steps
        self.held_out = val["held_out"]
        encoder = ingest.ReadEncode(
            "", model_config.to_dict(), cfg.data.text_field, cfg.data.max_length, seed=cfg.seed,
            endpoint_override=cfg.storage.endpoint_override, tokenizer=tokenizer,
        )  # fmt: skip
        chunks = [encoder.encode_selected(item) for item in val["items"]]
        rows = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
        ok = np.flatnonzero(rows["ok"])  # rejected samples are left out (no positions to keep here)
        if len(ok) < world:
            raise ConfigError(
                f"validation.max_rows: {len(ok)} usable held-out rows for {world} workers (need one each)"
            )
        self.rows = len(ok)
        collate = ingest.Collate(model_config, 8 if cfg.scale.use_gpu else None, packing=cfg.data.packing)
        bs = cfg.scale.micro_batch_size

        def batch(idx: np.ndarray) -> dict[str, Any]:
            out = collate({k: v[idx] for k, v in rows.items()})
            return {k: v.to(device) for k, v in out.items() if k in ingest.MODEL_KEYS}

        mine = ok[rank::world]
        count = math.ceil(math.ceil(len(ok) / world) / bs)  # the same on every rank
        self.batches = [(batch(mine[i : i + bs]), 1.0) for i in range(0, len(mine), bs)]
        self.batches += [(batch(ok[:bs]), 0.0)] * (count - len(self.batches))
        self.samples = [self._prompt(rows, i) for i in ok[: cfg.validation.num_samples]]

    def _prompt(self, rows: dict[str, np.ndarray], i: int) -> dict[str, Any]:
        """Row `i`'s prompt, its image, and the reference answer. Chat rows (stage 3): the tokens up to the
        first ``<|im_start|>assistant\\n``, reference = that answer; caption rows: the tokens before the
        first predicted label (image and queries), reference = the caption."""
        import torch

        ids = np.frombuffer(rows["input_ids"][i], np.int32).astype(np.int64)
        labels = np.frombuffer(rows["labels"][i], np.int32).astype(np.int64)
        tok = self.tokenizer
        header = [tok.convert_tokens_to_ids("<|im_start|>"), *tok.encode("assistant\n", add_special_tokens=False)]
        starts = [j for j in range(len(ids) - len(header) + 1) if ids[j : j + len(header)].tolist() == header]
        if starts:
            first = starts[0] + len(header)
        else:
            first = 1 + int(np.flatnonzero(labels[1:] >= 0)[0])  # labels[0] is never predicted (the shift)
        end = first + int(np.argmax(labels[first:] < 0)) if (labels[first:] < 0).any() else len(labels)
        sample = {
            "key": str(rows["key"][i]),
            "input_ids": torch.from_numpy(ids[:first]),
            "prompt": f"{'<image>' if len(rows['pixel_values'][i]) else ''} {self._text(ids[:first])}".strip(),
            "reference": self._text(labels[first:end]),
        }
        if len(rows["pixel_values"][i]):
            size = self.image_size
            pix = np.frombuffer(rows["pixel_values"][i], np.uint8).reshape(3, size, size)
            sample["pixel_values"] = torch.from_numpy(pix.copy())
            sample["image_grid"] = torch.tensor([int(rows["grid_rows"][i]), int(rows["grid_cols"][i])])
        return sample

    def _text(self, ids: np.ndarray) -> str:
        return self.tokenizer.decode([int(t) for t in ids if t >= 0], skip_special_tokens=True).strip()

    def due(self, step: int, total_steps: int) -> bool:
        """Evaluate after `step` (1-based) steps: every `every_steps` and at the end of the stage."""
        return step % self.every == 0 or step == total_steps

    def evaluate(self, engine, step: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        """(``val/...`` values reduced over ranks, samples) with the weights after `step` steps."""
        import torch
        import torch.distributed as dist

        from breen.generate import greedy_generate, stop_ids

        # sums: lm x tokens, tokens, fine x rows, coarse x rows, aligned rows
        sums = torch.zeros(5, dtype=torch.float64)
        with torch.no_grad(), rng_preserved(self.device):
            engine.eval()
            for batch, weight in self.batches:
                out = engine(**batch)
                tokens, aligned = supervised_tokens(batch), int(batch["align_mask"].sum())
                lm, fine, coarse = (float(t) for t in (out.lm_loss, out.align_loss_fine, out.align_loss_coarse))
                sums += weight * torch.tensor(
                    [lm * tokens, tokens, fine * aligned, coarse * aligned, aligned], dtype=torch.float64
                )
            samples = []
            model = engine.module
            stops = stop_ids(self.tokenizer, model)
            for sample in self.samples:  # every rank: ZeRO-3 gathers the weights in each forward
                new = greedy_generate(
                    model, sample["input_ids"], sample.get("pixel_values"), sample.get("image_grid"),
                    max_new_tokens=self.cfg.validation.sample_max_new_tokens,
                )  # fmt: skip
                cut = next((i for i, t in enumerate(new) if t in stops), len(new))
                answer = self.tokenizer.decode(new[:cut], skip_special_tokens=True).strip()
                samples.append({"step": step, "key": sample["key"], "prompt": sample["prompt"],
                                "answer": answer, "reference": sample["reference"]})  # fmt: skip
            engine.train()
        sums = sums.to(self.device)
        dist.all_reduce(sums)
        lm_sum, tokens, fine, coarse, aligned = sums.cpu().tolist()
        record = {
            "val/lm_loss": lm_sum / max(tokens, 1.0),
            "val/align_fine": fine / aligned if aligned else 0.0,
            "val/align_coarse": coarse / aligned if aligned else 0.0,
            "val/cos_fine": 1.0 - fine / aligned if aligned else 0.0,
            "val/cos_coarse": 1.0 - coarse / aligned if aligned else 0.0,
            "val/rows": self.rows,
            "val/held_out": self.held_out,
        }
        return record, samples


def evaluate_if_due(
    validator: Validator | None, engine, step: int, total_steps: int
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """`Validator.evaluate` after `step` steps when one is due, else ({}, [])."""
    if validator is None or not validator.due(step, total_steps):
        return {}, []
    return validator.evaluate(engine, step)


def build(cfg: TrainConfig, val: dict[str, Any] | None, tokenizer, model_config, rank: int, world: int,
          device, log: Callable[[str], None] = print) -> Validator | None:  # fmt: skip
    """This worker's `Validator`, or None when there is nothing to evaluate."""
    if not val or not val["items"]:
        return None
    validator = Validator(cfg, val, tokenizer, model_config, rank, world, device)
    log(f"[{cfg.stage}] validation: {validator.rows} held-out rows encoded, {len(validator.batches)} "
        f"micro-batch(es) per worker, {len(validator.samples)} sample prompt(s)")  # fmt: skip
    return validator


# ----------------------------------------------------------------------------- the driver: the table
def last_values(records: dict[int, dict[str, Any]]) -> dict[str, Any] | None:
    """The last validation record among a run's step records (`jobs.metrics.read_metrics`), with its step."""
    steps = [s for s in sorted(records) if "val/lm_loss" in records[s]]
    if not steps:
        return None
    rec = records[steps[-1]]
    return {"step": steps[-1], **{k: rec[k] for k in (*KEYS, "val/rows") if k in rec}}


def table(finals: dict[str, dict[str, Any] | None]) -> str:
    """A text table of the final validation values per stage (`last_values`)."""
    head = ["stage", "step", "rows", *(k.removeprefix("val/") for k in KEYS)]
    lines = [head]
    for stage, v in finals.items():
        if v is None:
            lines.append([stage, "-", "-", *("-" for _ in KEYS)])
        else:
            lines.append([stage, str(v["step"]), str(v.get("val/rows", "-")),
                          *(f"{v[k]:.4f}" if k in v else "-" for k in KEYS)])  # fmt: skip
    widths = [max(len(row[i]) for row in lines) for i in range(len(head))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in lines)
