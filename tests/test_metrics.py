"""jobs.metrics: step statistics (`StepStats`) and the tracker (metrics.jsonl, TensorBoard, validation
samples, Weights & Biases offline, MLflow on a local file store)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from jobs import ingest


def test_step_stats_travel_as_one_vector_and_give_the_step_metrics():
    """`StepStats`: named sums (a replayed micro-batch, weight 0, adds nothing), rejected samples per
    reason; the one all_reduce sends them as one vector (fields, then REJECT_REASONS in order)."""
    import types

    import torch

    from jobs.metrics import StepStats

    out = types.SimpleNamespace(loss=torch.tensor(2.0), lm_loss=torch.tensor(1.5),
                                align_loss_fine=torch.tensor(0.5), align_loss_coarse=torch.tensor(0.25))  # fmt: skip
    batch = {"attention_mask": torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]]), "align_mask": torch.tensor([1, 0]),
             "input_ids": torch.zeros(2, 4, dtype=torch.long)}  # fmt: skip
    model_config = types.SimpleNamespace(flops_per_token=lambda n: 10 * n)
    stats = StepStats()
    stats.add(out, batch, 1.0, model_config)
    stats.add(out, batch, 0.0, model_config)
    stats.add_rejected(torch.tensor([-1, 2, 2, 0]))
    assert (stats.samples, stats.tokens, stats.flops, stats.padded_tokens) == (2, 5, 130, 8)
    assert stats.rejected == {ingest.REJECT_REASONS[2]: 2, ingest.REJECT_REASONS[0]: 1}
    vector = stats.to_vector()
    assert len(vector) == 10 + len(ingest.REJECT_REASONS) and vector[10 + 2] == 2
    assert StepStats.from_vector(vector) == stats
    assert stats.record() == {"loss": 2.0, "lm_loss": 1.5, "align_fine": 0.5, "align_coarse": 0.25,
                              "samples": 2, "tokens": 5, "padding": 1 - 5 / 8}  # fmt: skip


def test_tracker_logs_validation_scalars_and_samples(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from jobs import validation
    from jobs.metrics import Tracker, read_metrics

    tracker = Tracker(tmp_path, 2, print_fn=lambda *a: None)
    train_rec = {"step": 1, "loss": 1.0, "lm_loss": 1.0, "align_fine": 0.5, "align_coarse": 0.5, "lr": {},
                 "grad_norm": 0.1, "samples_per_s": 1.0, "tokens_per_s": 1.0, "mfu": 0.0, "step_time": 0.1}  # fmt: skip
    val = {"val/lm_loss": 2.5, "val/align_fine": 0.75, "val/align_coarse": 0.5, "val/cos_fine": 0.25,
           "val/cos_coarse": 0.5, "val/rows": 6, "val/held_out": 9}  # fmt: skip
    tracker.log(train_rec)
    tracker.log({**train_rec, "step": 2, **val})
    tracker.log_samples(2, [{"step": 2, "key": "k1", "prompt": "<image>", "answer": "a", "reference": "b"}])
    tracker.close()
    records = read_metrics(tmp_path)
    assert "val/lm_loss" not in records[1] and records[2]["val/lm_loss"] == 2.5
    samples = [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]
    assert samples == [{"step": 2, "key": "k1", "prompt": "<image>", "answer": "a", "reference": "b"}]
    acc = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"tensors": 0}).Reload()
    assert [(e.step, e.value) for e in acc.Scalars("val/lm_loss")] == [(2, 2.5)]
    assert "train/loss" in acc.Tags()["scalars"] and "train/val/lm_loss" not in acc.Tags()["scalars"]
    assert "val/samples/text_summary" in acc.Tags()["tensors"]
    final = validation.last_values(records)
    assert final["step"] == 2 and final["val/cos_fine"] == 0.25
    text = validation.table({"stage1": final, "stage2": None})
    assert text.splitlines()[0].split() == ["stage", "step", "rows", "lm_loss", "align_fine", "align_coarse",
                                            "cos_fine", "cos_coarse"]  # fmt: skip
    assert text.splitlines()[1].split()[:4] == ["stage1", "2", "6", "2.5000"]


def test_tracker_logs_to_weights_and_biases_offline(tmp_path, monkeypatch):
    from jobs.metrics import Tracker

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "stage1"
    tracker = Tracker(run_dir, 1, tensorboard=False, print_fn=lambda *a: None, wandb="breen-test",
                      config={"stage": "stage1"})  # fmt: skip
    tracker.log({"step": 1, "loss": 1.5, "lm_loss": 1.0, "align_fine": 0.5, "align_coarse": 0.5, "lr": {"default": 1e-4},
                 "grad_norm": 0.1, "samples_per_s": 1.0, "tokens_per_s": 1.0, "mfu": 0.0, "step_time": 0.1,
                 "val/lm_loss": 2.5, "val/align_fine": 0.75, "val/align_coarse": 0.5, "val/cos_fine": 0.25,
                 "val/cos_coarse": 0.5, "val/rows": 6})  # fmt: skip
    tracker.log_samples(1, [{"step": 1, "key": "k1", "prompt": "<image>", "answer": "a", "reference": "b"}])
    tracker.close()
    def run_ids() -> list[str]:
        # offline-run-<date>_<time>-<id>, plus "-1", "-2" when a folder of that second and id exists already
        names = [p.name for p in (run_dir / "wandb").glob("offline-run-*")]
        return [re.fullmatch(r"offline-run-\d{8}_\d{6}-([a-z0-9]+)(-\d+)?", n).group(1) for n in names]

    (run,) = (run_dir / "wandb").glob("offline-run-*")
    assert list(run.glob("run-*.wandb"))
    (tracker_id,) = run_ids()
    again = Tracker(run_dir, 1, tensorboard=False, print_fn=lambda *a: None, wandb="breen-test")
    again.close()  # a resumed run continues the same W&B run (the id derives from the run directory)
    assert set(run_ids()) == {tracker_id}


def test_tracker_logs_to_mlflow(tmp_path, monkeypatch):
    """A real MLflow client on a local file store (MLflow's own `file:` backend, allowed explicitly): the
    scalars with their steps, the config as parameters, the samples as an artifact; a resumed run (same
    run directory) continues the same MLflow run."""
    from mlflow.tracking import MlflowClient

    from breen.storage import Store
    from jobs.metrics import Tracker

    monkeypatch.setenv("MLFLOW_TRACKING_URI", (tmp_path / "mlruns").as_uri())
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    run_dir = tmp_path / "stage1"
    record = {"step": 1, "loss": 1.5, "lm_loss": 1.0, "align_fine": 0.5, "align_coarse": 0.5, "lr": {"default": 1e-4},
              "grad_norm": 0.1, "samples_per_s": 1.0, "tokens_per_s": 1.0, "mfu": 0.0, "step_time": 0.1,
              "val/lm_loss": 2.5, "val/align_fine": 0.75, "val/align_coarse": 0.5, "val/cos_fine": 0.25,
              "val/cos_coarse": 0.5, "val/rows": 6}  # fmt: skip
    tracker = Tracker(run_dir, 2, tensorboard=False, print_fn=lambda *a: None, mlflow="breen-test",
                      config={"stage": "stage1", "optim": {"lrs": {"default": 1e-4}}})  # fmt: skip
    tracker.log(record)
    tracker.log_samples(1, [{"step": 1, "key": "k1", "prompt": "<image>", "answer": "a", "reference": "b"}])
    tracker.close()
    again = Tracker(run_dir, 2, tensorboard=False, print_fn=lambda *a: None, mlflow="breen-test")
    again.log({**record, "step": 2, "loss": 1.25})
    again.close()

    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("breen-test").experiment_id])
    assert run.info.run_name == "stage1" and run.data.tags["breen.run_dir"] == Store.at(run_dir).uri
    assert run.data.params["optim.lrs.default"] == "0.0001" and run.data.params["stage"] == "stage1"
    history = client.get_metric_history(run.info.run_id, "train/loss")
    assert sorted((m.step, m.value) for m in history) == [(1, 1.5), (2, 1.25)]
    assert [(m.step, m.value) for m in client.get_metric_history(run.info.run_id, "val/lm_loss")] == [(1, 2.5), (2, 2.5)]
    samples = client.download_artifacts(run.info.run_id, "val/samples-0000001.json", str(tmp_path / "dl"))
    assert json.loads(Path(samples).read_text())[0]["answer"] == "a"


