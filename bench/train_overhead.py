"""Training overhead: our Ray Train + DeepSpeed ZeRO-3 step vs a bare PyTorch loop, side by side; and the
Ray Data ingest rate vs the rate training consumes samples.

Same model (a BREEN larger than ``tiny``, random init, saved once), same batches (the ingest's encoded
micro-batches in the same order), same step (stage 2: everything but the alignment head trains, the
product's AdamW (`jobs.train.make_optimizer`, fused), clipping 1.0, cosine schedule, activation
checkpointing, fp32, packed micro-batches), the same torch threads and the same process environment
(`jobs.driver.worker_env`: glibc malloc settings):
  baseline  a plain loop over pre-encoded batches in memory, in its own process, run before and after
            ours (its step time is the mean of the two medians, so slow drift of the machine load cancels);
  ours      `jobs.driver.run_stage` on a local Ray: 1 Ray Train worker, DeepSpeed ZeRO-3 engine, batches
            streamed by Ray Data (read + decode + tokenise in an encode actor), per-step metrics
            all-reduce; step times from the run's ``metrics.jsonl``.
Both print per-step losses; the largest difference checks that they computed the same thing.

Ingest rate: the same Ray Data pipeline (1 encode actor, `--encode-cpus`) iterated on its own, samples/s
after its first batch. Consumption rate: micro-batch / our median step time.

Prints the step-time ratio ours/baseline (goal <= 1.10 with a step >= 0.5 s) and ingest/consumption
(goal >= 5).

Run:  python -m bench.train_overhead [--hidden 640] [--layers 4] [--micro-batch 8] [--steps 14]
      [--warmup 4] [--threads 1] [--data DIR (training shards; default: synthetic, 256 rows)] [--bucket]
      (--bucket: the ingest rate again with the shards and images in an S3 bucket, a local moto_server)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def make_model(out: Path, hidden: int, layers: int, clip_dim: int) -> Path:
    from jobs.tiny import save_tiny_breen

    heads = max(1, hidden // 64)
    return save_tiny_breen(
        out,
        clip_dim=clip_dim,
        seed=0,
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads // 2 if heads % 2 == 0 else heads,
        image_size=112,
        patch_dim=128,
    )


def bench_config(args, init: Path, data: list[str], out: Path):
    from jobs.config import build_config

    return build_config(
        "stage2",
        "cpu",
        [
            f"output_dir={out}",
            "name=ours",
            "data.paths=" + ",".join(data),
            f"model.init_from={init}",
            "scale.num_workers=1",
            f"scale.cpus_per_worker={args.threads}",
            f"scale.micro_batch_size={args.micro_batch}",
            f"scale.global_batch_size={args.micro_batch}",
            f"schedule.max_steps={args.steps}",
            "checkpoint.every_steps=1000000",
            "checkpoint.export=false",
            "metrics.tensorboard=false",
            "data.encode_actors=1",
            f"data.encode_cpus={args.encode_cpus}",
            f"data.packing={'false' if args.no_packing else 'true'}",
        ],
    )


def encoded_batches(cfg, files, model_config, tokenizer_dir: str, steps: int):
    """The micro-batches a single worker trains on (same order as the Ray Data stream)."""
    import numpy as np

    from jobs import ingest

    enc = ingest.ReadEncode(
        tokenizer_dir, model_config.to_dict(), cfg.data.text_field, cfg.data.max_length, cfg.seed,
        0, cfg.data.encode_batch_size,
    )  # fmt: skip
    rows: dict[str, list] = {}
    for item in ingest.epoch_plan(files, cfg.seed, cfg.schedule.epochs):
        for chunk in enc.encode_file(item):
            for k, v in chunk.items():
                rows.setdefault(k, []).extend(v)
        if len(rows.get("pos", [])) >= steps * cfg.scale.micro_batch_size:
            break
    collate = ingest.Collate(model_config, packing=cfg.data.packing)  # what ours trains on
    b = cfg.scale.micro_batch_size
    out = []
    for s in range(steps):
        sel = {
            k: np.asarray(v[s * b : (s + 1) * b], dtype=object if k in _BINARY else None)
            for k, v in rows.items()
        }
        out.append(collate(sel))
    return out


_BINARY = ("key", "reason", "input_ids", "labels", "pixel_values", "fine", "coarse")


def baseline(cfg, init: Path, batches, threads: int) -> tuple[list[float], list[float]]:
    """Bare PyTorch: (step seconds, losses)."""
    import torch

    from breen.model import BreenForCausalLM
    from breen.stages import param_groups, set_trainable
    from jobs.ingest import MODEL_KEYS
    from jobs.train import lr_factor, make_optimizer

    torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    model = BreenForCausalLM.from_pretrained(init, dtype=torch.float32)
    model.config.use_cache = False
    set_trainable(model, cfg.stage, log=None)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    groups = param_groups(model, cfg.stage, cfg.optim.lrs, cfg.optim.weight_decay)
    base = [g["lr"] for g in groups]
    opt = make_optimizer(cfg, groups)
    params = [p for g in groups for p in g["params"]]
    times, losses = [], []
    for step, batch in enumerate(batches):
        t0 = time.perf_counter()
        for g, lr in zip(opt.param_groups, base, strict=True):
            g["lr"] = lr * lr_factor(step, len(batches), cfg.optim.warmup_ratio)
        out = model(**{k: batch[k] for k in MODEL_KEYS if k in batch})
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(float(out.loss.detach()))
    return times, losses


def baseline_process(args, cfg, work: Path, tag: str) -> tuple[list[float], list[float]]:
    """`baseline` in a fresh Python process with the training workers' environment (`--child`)."""
    from jobs.driver import worker_env

    env = {**os.environ, **worker_env(cfg)}
    argv = [sys.executable, "-m", "bench.train_overhead", "--child", str(work), *child_argv(args)]
    subprocess.run(argv, env=env, check=True)
    result = json.loads((work / "baseline.json").read_text())
    print(
        f"baseline ({tag}): median {statistics.median(result['times'][args.warmup :]):.3f} s/step", flush=True
    )
    return result["times"], result["losses"]


def child_argv(args) -> list[str]:
    """The options that shape the baseline's step, for its child process."""
    flags = ["--hidden", args.hidden, "--layers", args.layers, "--micro-batch", args.micro_batch, "--steps",
             args.steps, "--threads", args.threads, "--encode-cpus", args.encode_cpus]  # fmt: skip
    return [str(f) for f in flags] + (["--no-packing"] if args.no_packing else [])


def child(args) -> None:
    """Child side of `baseline_process`: batches and model from the parent's work directory."""
    import torch

    work = Path(args.child)
    cfg = bench_config(args, work / "init", [str(work / "shards")], work / "train")
    batches = torch.load(work / "batches.pt", weights_only=True)  # tensors only
    times, losses = baseline(cfg, work / "init", batches, args.threads)
    (work / "baseline.json").write_text(json.dumps({"times": times, "losses": losses}))


def ingest_rate(cfg, files, model_config, tokenizer_dir: str, endpoint: str | None = None) -> tuple[float, int]:
    """Samples/s of the Ray Data pipeline alone (after its first batch), and rows read."""
    from jobs import ingest

    ds = ingest.build_dataset(
        files, tokenizer_dir=tokenizer_dir, model_config=model_config.to_dict(),
        text_field=cfg.data.text_field, max_length=cfg.data.max_length, seed=cfg.seed, epochs=1,
        micro_batch_size=cfg.scale.micro_batch_size, encode_actors=1, encode_cpus=cfg.data.encode_cpus,
        chunk_rows=cfg.data.encode_batch_size, endpoint_override=endpoint,
    )  # fmt: skip
    ds.context.execution_options = ingest.ingest_options()
    first = None
    rows = 0
    for batch in ds.iter_batches(batch_size=cfg.scale.micro_batch_size, batch_format="numpy"):
        if first is None:
            first = time.perf_counter()
        else:
            rows += len(batch["pos"])
    return rows / (time.perf_counter() - first), rows


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=640)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--warmup", type=int, default=4, help="first steps left out of the medians")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (= CPUs of the Ray worker)")
    parser.add_argument("--encode-cpus", type=float, default=1.0)
    parser.add_argument("--no-packing", action="store_true", help="padded micro-batches on both sides")
    parser.add_argument("--data", action="append", default=[], help="training shards (default: synthetic)")
    parser.add_argument("--bucket", action="store_true",
                        help="also measure the ingest from an S3 bucket (a local moto_server holding a copy of "
                             "the shards and their images)")  # fmt: skip
    parser.add_argument("--work-dir", default=None)
    parser.add_argument("--json", default=None, help="also write the result as JSON here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # internal: the baseline process
    return parser


def run(args) -> dict:
    import torch

    from breen.config import BreenConfig
    from jobs import ingest
    from jobs.driver import run_stage
    from jobs.metrics import read_metrics
    from jobs.tiny import write_tiny_shards
    from pipelines.raystart import init_ray

    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-train-"))
    data = args.data or [
        str(
            write_tiny_shards(
                work / "shards", 256, clip_dim=64, rows_per_file=64, image_sides=(256, 672), referenced=True
            )
        )  # images referenced in a store, as data preparation writes
    ]
    files = ingest.list_shards(data)
    clip_dim = files[0].clip_dim or 64
    init = make_model(work / "init", args.hidden, args.layers, clip_dim)
    model_config = BreenConfig.from_pretrained(init)
    cfg = bench_config(args, init, data, work / "train")
    counts = model_config.param_counts()

    batches = encoded_batches(cfg, files, model_config, str(init), args.steps)
    torch.save(batches, work / "batches.pt")
    base_times, base_losses = baseline_process(args, cfg, work, "before ours")

    init_ray(None, max(4, 2 * args.threads + 2))
    run_stage(cfg)
    records = read_metrics(cfg.run_dir)
    ours_times = [records[s]["step_time"] for s in sorted(records)]
    ours_losses = [records[s]["loss"] for s in sorted(records)]
    rate, rows = ingest_rate(cfg, files, model_config, str(init))
    bucket_rate = bucket_ingest_rate(cfg, data, model_config, str(init)) if args.bucket else None
    after_times, _ = baseline_process(args, cfg, work, "after ours")  # again, after ours: same machine drift

    w = args.warmup
    base_step = (statistics.median(base_times[w:]) + statistics.median(after_times[w:])) / 2
    ours_step = statistics.median(ours_times[w:])
    consumption = args.micro_batch / ours_step
    result = {
        "model": f"hidden {args.hidden}, {args.layers} layers, {counts['stored'] / 1e6:.1f}M params "
        f"({counts['active'] / 1e6:.1f}M active)",
        "micro_batch": args.micro_batch,
        "threads": args.threads,
        "steps_timed": len(base_times) - w,
        "baseline_step_s": round(base_step, 4),
        "baseline_runs_step_s": [round(statistics.median(t[w:]), 4) for t in (base_times, after_times)],
        "ours_step_s": round(ours_step, 4),
        "step_time_ratio": round(ours_step / base_step, 3),
        "max_loss_diff": max(abs(a - b) for a, b in zip(base_losses, ours_losses, strict=True)),
        "ingest_samples_per_s": round(rate, 1),
        "ingest_rows": rows,
        "consumption_samples_per_s": round(consumption, 2),
        "ingest_over_consumption": round(rate / consumption, 1),
    }
    if bucket_rate is not None:
        result["bucket_ingest_samples_per_s"] = round(bucket_rate, 1)
        result["bucket_ingest_over_consumption"] = round(bucket_rate / consumption, 1)
    return result


def bucket_ingest_rate(cfg, data: list[str], model_config, tokenizer_dir: str) -> float:
    """The ingest rate with the shards (and the image dataset they reference) in an S3 bucket."""
    from bench.s3server import local_s3_server
    from breen import shard_format as sf
    from breen.storage import Store
    from jobs import ingest

    for k, v in {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1",
                 "AWS_EC2_METADATA_DISABLED": "true"}.items():  # fmt: skip
        os.environ.setdefault(k, v)  # moto accepts any; Ray workers started after this inherit them
    with local_s3_server(buckets=("bench",)) as endpoint:
        remote = []
        for d in data:
            folders = [Path(d)]
            images = sf.images_dir(next(Path(d).glob("part-*.parquet")))
            if images is not None:
                folders.append(Path(images.path))
            for folder in folders:
                Store.at(f"s3://bench/{folder.name}", endpoint_override=endpoint).upload_dir(folder)
            remote.append(f"s3://bench/{Path(d).name}")
        files = ingest.list_shards(remote, endpoint)
        return ingest_rate(cfg, files, model_config, tokenizer_dir, endpoint)[0]


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    if args.child:
        child(args)
        return
    result = run(args)
    base_step, ours_step = result["baseline_step_s"], result["ours_step_s"]
    rate, consumption = result["ingest_samples_per_s"], result["consumption_samples_per_s"]
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    print(
        f"\nmodel {result['model']}, micro-batch {args.micro_batch}, 1 worker x {args.threads} thread(s), fp32"
        f"\nbare PyTorch step        {base_step:.3f} s (median of {result['steps_timed']})"
        f"\nRay Train + DeepSpeed    {ours_step:.3f} s"
        f"\nstep-time ratio          {ours_step / base_step:.3f}  (goal <= 1.10)"
        f"\nsame losses              max |diff| {result['max_loss_diff']:.2e}"
        f"\ningest                   {rate:.1f} samples/s (1 encode actor x {args.encode_cpus} CPU)"
        f"\nconsumption              {consumption:.2f} samples/s"
        f"\ningest / consumption     {rate / consumption:.1f}  (goal >= 5)"
    )
    if "bucket_ingest_samples_per_s" in result:
        print(f"ingest from an S3 bucket {result['bucket_ingest_samples_per_s']:.1f} samples/s (local moto_server)"
              f"\nbucket / consumption     {result['bucket_ingest_over_consumption']:.1f}  (goal >= 5)")  # fmt: skip


if __name__ == "__main__":
    main()
