"""Training metrics: a step's statistics (`StepStats`: each rank's named sums over its micro-batches,
summed over the ranks in one all_reduce), then on rank 0 one summary line, a JSONL record and TensorBoard
scalars per step (`Tracker`).

Writes under the run directory (``<output_dir>/<name>/``):

- ``metrics.jsonl``: one JSON object per optimizer step (step, loss, lm_loss, align_fine, align_coarse,
  lr per parameter group, grad_norm, samples/s, tokens/s, MFU, step time, ``data_wait`` (seconds rank 0
  waited for micro-batches: the data starving the trainer), ``padding`` (fraction of padding tokens),
  ETA, counters). Steps re-run
  after a restart from a checkpoint are appended again: the last record of a step wins (`read_metrics`).
  A step with an evaluation (`jobs.validation`) also holds its ``val/...`` values.
- ``tensorboard/``: the same scalars (``train/...``, ``val/...``), readable with ``tensorboard --logdir <run dir>``.
- Weights & Biases (``metrics.wandb=PROJECT``, off by default): the same scalars and the samples (a
  table ``val/samples``) through wandb's own API, rank 0, in ``<run dir>/wandb/``; the run id derives
  from the run directory, so a resumed run continues the same W&B run (steps redone after a restart are
  dropped by W&B, which only accepts increasing steps). Mode and credentials come from wandb's environment
  variables in the workers (``WANDB_MODE=offline`` writes locally only; an embedded Ray passes the
  driver's environment on).
- MLflow (``metrics.mlflow=EXPERIMENT``, off by default): the same scalars (MLflow keys: ``/`` kept) and
  the samples (a JSON artifact per evaluation, ``val/samples-STEP.json``) through MLflow's own client, rank
  0, to the tracking server named by ``MLFLOW_TRACKING_URI`` in the workers (MLflow's own variable); the
  run is tagged with the run directory's URI, so a resumed run continues the same MLflow run (redone
  steps are logged again: MLflow keeps every value of a step).
- ``samples.jsonl``: the sample generations of every evaluation (step, key, prompt, answer, reference),
  also TensorBoard text ``val/samples``.

On an object store (which cannot append) both are written in a local folder and uploaded at every
checkpoint (`Tracker.sync`) and at the end; a resumed run starts from the uploaded ``metrics.jsonl``.

MFU = model FLOPs per step (`BreenConfig.flops_per_token` at the step's mean sequence length x tokens,
forward + backward, recomputation of gradient checkpointing not counted) / (step time x devices x peak
FLOP/s per device). Peak: ``metrics.peak_tflops`` or, when unset, a table of known GPUs (bf16 dense),
else 1 TFLOP/s per CPU worker (a nominal value: CPU MFU is only comparable with itself).
"""

from __future__ import annotations

import itertools
import json
import math
import tempfile
import time
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from breen.storage import Store

# Dense bf16 TFLOP/s by GPU name fragment (first match wins).
METRICS_FILE = "metrics.jsonl"
SAMPLES_FILE = "samples.jsonl"
PEAK_TFLOPS = (("H200", 989.0), ("H100", 989.0), ("A100", 312.0), ("L40S", 362.0), ("A10G", 125.0))
CPU_PEAK_TFLOPS = 1.0


def peak_tflops(configured: float | None, use_gpu: bool) -> float:
    if configured:
        return configured
    if use_gpu:
        import torch

        if torch.cuda.is_available():
            name = torch.cuda.get_device_name()
            for fragment, value in PEAK_TFLOPS:
                if fragment in name:
                    return value
    return CPU_PEAK_TFLOPS


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    seconds = round(seconds)
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


def mfu(flops_per_step: float, step_seconds: float, devices: int, peak: float) -> float:
    return flops_per_step / max(step_seconds, 1e-9) / (devices * peak * 1e12)


@dataclass
class StepStats:
    """One optimizer step's sums over its micro-batches (`add`, `add_rejected`), then over the ranks
    (`all_reduce`: the one place they are reduced). A micro-batch replayed with weight 0 (every row
    rejected) adds nothing; rejected samples are counted per reason (`jobs.ingest.REJECT_REASONS`)."""

    loss: float = 0.0  # sum of the micro-batches' mean losses
    lm_loss: float = 0.0
    align_fine: float = 0.0  # x aligned rows
    align_coarse: float = 0.0  # x aligned rows
    micro_batches: float = 0.0
    aligned_rows: float = 0.0
    samples: float = 0.0
    tokens: float = 0.0  # real tokens
    flops: float = 0.0  # model FLOPs (forward + backward)
    padded_tokens: float = 0.0  # tokens incl. padding
    rejected: dict[str, int] = field(default_factory=dict)  # reason -> samples left out by the ingest

    def add(self, out, batch: dict[str, Any], weight: float, model_config) -> None:
        """One micro-batch: the model's output `out` on `batch`."""
        lengths = sample_lengths(batch)
        rows = int(batch["align_mask"].sum())
        loss, lm, fine, coarse = (
            t.detach().float().item() for t in (out.loss, out.lm_loss, out.align_loss_fine, out.align_loss_coarse)
        )
        self.loss += weight * loss
        self.lm_loss += weight * lm
        self.align_fine += weight * (fine * rows)
        self.align_coarse += weight * (coarse * rows)
        self.micro_batches += weight
        self.aligned_rows += weight * rows
        self.samples += weight * len(lengths)
        self.tokens += weight * sum(lengths)
        self.flops += weight * sum(model_config.flops_per_token(n) * n for n in lengths)
        self.padded_tokens += weight * batch["input_ids"].numel()

    def add_rejected(self, codes) -> None:
        """The ingest's reject codes of a micro-batch's rows (-1: kept, else an index of REJECT_REASONS)."""
        from jobs.ingest import REJECT_REASONS

        for code in codes[codes >= 0].tolist():
            reason = REJECT_REASONS[code]
            self.rejected[reason] = self.rejected.get(reason, 0) + 1

    def to_vector(self) -> list[float]:
        """The sums in field order, then the rejected counts in `REJECT_REASONS` order."""
        from jobs.ingest import REJECT_REASONS

        sums = [getattr(self, f.name) for f in fields(self) if f.name != "rejected"]
        return sums + [float(self.rejected.get(reason, 0)) for reason in REJECT_REASONS]

    @classmethod
    def from_vector(cls, values: list[float]) -> StepStats:
        from jobs.ingest import REJECT_REASONS

        names = [f.name for f in fields(cls) if f.name != "rejected"]
        counts = zip(REJECT_REASONS, values[len(names) :], strict=True)
        return cls(**dict(zip(names, values, strict=False)), rejected={r: int(n) for r, n in counts if n})

    def all_reduce(self, device) -> StepStats:
        """The sums over every rank: one ``all_reduce`` of one float64 tensor (collective)."""
        import torch
        import torch.distributed as dist

        vector = torch.tensor(self.to_vector(), dtype=torch.float64).to(device)
        dist.all_reduce(vector)
        return StepStats.from_vector(vector.cpu().tolist())

    def record(self) -> dict[str, Any]:
        """The step's metrics that come from these sums (`Tracker.log` keys)."""
        n, rows = max(self.micro_batches, 1e-9), max(self.aligned_rows, 1e-9)
        return {
            "loss": self.loss / n, "lm_loss": self.lm_loss / n, "align_fine": self.align_fine / rows,
            "align_coarse": self.align_coarse / rows, "samples": int(self.samples), "tokens": int(self.tokens),
            "padding": 1.0 - self.tokens / max(self.padded_tokens, 1.0),
        }  # fmt: skip


def sample_lengths(batch: dict[str, Any]) -> list[int]:
    """Real tokens of every sample in a micro-batch, packed (``cu_seqlens``) or padded."""
    if "cu_seqlens" in batch:
        return [hi - lo for lo, hi in itertools.pairwise(batch["cu_seqlens"].tolist())]
    return batch["attention_mask"].sum(dim=1).tolist()


class Tracker:
    """Rank 0's metrics sink (a no-op object on other ranks: ``Tracker(..., enabled=False)``)."""

    def __init__(
        self,
        run_dir: str | Path,
        total_steps: int,
        *,
        enabled: bool = True,
        tensorboard: bool = True,
        log_every: int = 1,
        print_fn=print,
        wandb: str | None = None,
        mlflow: str | None = None,
        config: dict[str, Any] | None = None,
    ):
        self.enabled = enabled
        self.total_steps = total_steps
        self.log_every = log_every
        self.print = print_fn
        self.step_times: list[float] = []
        self.writer = None
        self.wandb = None
        self.mlflow = None  # (MlflowClient, run id)
        self.jsonl = None
        self.remote: Store | None = None
        if not enabled:
            return
        store = Store.at(run_dir)
        if store.local:
            local = Path(store.path)
        else:  # an object store cannot append: write locally, upload at every `sync` and at the end
            self.remote = store
            self._tmp = tempfile.TemporaryDirectory(prefix="breen-metrics-")
            local = Path(self._tmp.name)
            for name in (METRICS_FILE, SAMPLES_FILE):  # a resumed run keeps the records of earlier attempts
                if (store / name).exists():
                    (local / name).write_bytes((store / name).read_bytes())
        local.mkdir(parents=True, exist_ok=True)
        self.local = local
        self.jsonl = open(local / METRICS_FILE, "a")  # noqa: SIM115 (closed in close())
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(local / "tensorboard"))
        if wandb:
            import hashlib

            import wandb as wb

            run_id = hashlib.sha256(store.uri.encode()).hexdigest()[:16]
            self.wandb = wb.init(project=wandb, name=store.name, id=run_id, resume="allow", dir=str(local),
                                 config=config)  # fmt: skip
        if mlflow:
            self.mlflow = mlflow_run(mlflow, store.uri, store.name, config)

    def eta(self, step: int) -> float:
        """Seconds left after `step` (1-based count of finished steps), from recent step times."""
        recent = self.step_times[-20:]
        if not recent:
            return float("nan")
        return (self.total_steps - step) * sum(recent) / len(recent)

    def log(self, record: dict[str, Any]) -> None:
        """Record one finished step (``record["step"]`` is the 1-based step count)."""
        if not self.enabled:
            return
        self.step_times.append(record["step_time"])
        step = record["step"]
        record = {**record, "eta_s": round(self.eta(step), 1), "time": time.time()}
        self.jsonl.write(json.dumps(record, sort_keys=True) + "\n")
        self.jsonl.flush()
        scalars = {
            key if key.startswith("val/") else f"train/{key}": value
            for key, value in record.items()
            if isinstance(value, (int, float)) and key not in ("step", "time")
        }
        scalars.update({f"lr/{group}": lr for group, lr in record.get("lr", {}).items()})
        if self.writer is not None:
            for key, value in scalars.items():
                self.writer.add_scalar(key, value, step)
        if self.wandb is not None:
            self.wandb.log(scalars, step=step)
        if self.mlflow is not None:
            from mlflow.entities import Metric

            client, run_id = self.mlflow
            stamp = int(record["time"] * 1000)
            client.log_batch(run_id, metrics=[Metric(k, float(v), stamp, step) for k, v in scalars.items()])
        if step % self.log_every == 0 or step == self.total_steps or step == 1:
            self.print(self.summary(record))
        if "val/lm_loss" in record:
            self.print(
                f"step {step} validation ({record['val/rows']} rows): lm {record['val/lm_loss']:.4f} fine "
                f"{record['val/align_fine']:.4f} coarse {record['val/align_coarse']:.4f} (cosine "
                f"{record['val/cos_fine']:.4f} / {record['val/cos_coarse']:.4f})"
            )

    def log_samples(self, step: int, samples: list[dict[str, Any]]) -> None:
        """Sample generations of the evaluation after `step` steps: ``samples.jsonl`` and TensorBoard text."""
        if not self.enabled or not samples:
            return
        with open(self.local / SAMPLES_FILE, "a") as f:
            for sample in samples:
                f.write(json.dumps(sample, sort_keys=True) + "\n")
        if self.writer is not None:
            rows = [f"| {s['key']} | {s['prompt']} | {s['answer']} | {s['reference']} |" for s in samples]
            text = "| key | prompt | answer | reference |\n|---|---|---|---|\n" + "\n".join(rows)
            self.writer.add_text("val/samples", text, step)
        if self.wandb is not None:
            import wandb as wb

            columns = ["key", "prompt", "answer", "reference"]
            self.wandb.log({"val/samples": wb.Table(columns=columns, data=[[s[c] for c in columns] for s in samples])},
                           step=step)  # fmt: skip
        if self.mlflow is not None:
            client, run_id = self.mlflow
            client.log_dict(run_id, samples, f"val/samples-{step:07d}.json")
        for s in samples:
            self.print(f"  sample {s['key']}: {s['prompt']!r} -> {s['answer']!r} (reference {s['reference']!r})")

    def summary(self, r: dict[str, Any]) -> str:
        lr = max(r.get("lr", {}).values(), default=0.0)
        return (
            f"step {r['step']}/{self.total_steps} loss {r['loss']:.4f} (lm {r['lm_loss']:.4f} "
            f"fine {r['align_fine']:.4f} coarse {r['align_coarse']:.4f}) lr {lr:.2e} "
            f"gnorm {r['grad_norm']:.3f} {r['samples_per_s']:.1f} samples/s {r['tokens_per_s']:.0f} tok/s "
            f"mfu {100 * r['mfu']:.2f}% step {r['step_time']:.2f}s eta {format_eta(r['eta_s'])}"
        )

    def sync(self) -> None:
        """Upload the metrics so far to a remote run folder (nothing to do on local disk)."""
        if self.remote is None or self.jsonl is None:
            return
        self.jsonl.flush()
        if self.writer is not None:
            self.writer.flush()
        self.remote.upload_dir(self.local)

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
            self.jsonl = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        if self.wandb is not None:
            self.wandb.finish()
            self.wandb = None
        if self.mlflow is not None:
            client, run_id = self.mlflow
            client.set_terminated(run_id)
            self.mlflow = None
        if self.remote is not None:
            self.remote.upload_dir(self.local)
            self._tmp.cleanup()
            self.remote = None


def mlflow_run(experiment: str, run_uri: str, name: str, config: dict[str, Any] | None) -> tuple[Any, str]:
    """(MlflowClient, run id) of the MLflow run of run directory `run_uri` in `experiment` (created when
    missing; the tracking server is ``MLFLOW_TRACKING_URI``): the run tagged ``breen.run_dir`` = `run_uri`,
    else a new one named `name` with the resolved config as its parameters (dotted names)."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    experiment_id = found.experiment_id if found else client.create_experiment(experiment)
    runs = client.search_runs([experiment_id], filter_string=f"tags.`breen.run_dir` = '{run_uri}'", max_results=1)
    if runs:
        run_id = runs[0].info.run_id
        client.update_run(run_id, status="RUNNING")
        return client, run_id
    run_id = client.create_run(experiment_id, run_name=name, tags={"breen.run_dir": run_uri}).info.run_id
    if config:
        from mlflow.entities import Param

        from jobs.config import leaves

        params = [Param(k, str(v)[:6000]) for k, v in sorted(leaves(config).items())]
        for i in range(0, len(params), 100):  # MLflow takes at most 100 parameters per batch
            client.log_batch(run_id, params=params[i : i + 100])
    return client, run_id


def read_metrics(run_dir: str | Path | Store) -> dict[int, dict[str, Any]]:
    """{step: last record of that step} from ``<run_dir>/metrics.jsonl`` (local or on an object store)."""
    path = Store.at(run_dir) / METRICS_FILE
    out: dict[int, dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                out[int(rec["step"])] = rec
    return out
