"""Training step throughput and MFU, packed vs padded micro-batches, on one device (GPU mode of run_all).

One process, one model (``--preset mid`` by default: the 0.5B-class BREEN, random init, bf16 weights,
AdamW, activation checkpointing, the stage-2 trainable set), the same samples on both sides:
  baseline  padded micro-batches (`breen.data.collate`, right-padded to the longest, multiple of 8);
  ours      packed micro-batches (`breen.data.pack`, one row; flash-attn varlen when installed, else one
            SDPA call per sample).
Samples have BREEN's geometry: image tokens of a 672-px long side (a few hundred to 2304), 100 queries,
caption text, teacher targets; lengths drawn with a fixed seed. Both sides start from the same weights
and optimizer state. Prints tokens/s (real tokens only), MFU (`BreenConfig.flops_per_token` x real
tokens / time / peak bf16 FLOP/s), the padding waste of both and the largest per-step loss difference.

Run (GPU):  python -m bench.train_step [--preset mid] [--micro-batch 8] [--steps 12]
CPU smoke:  python -m bench.train_step --device cpu --preset tiny --steps 3 --micro-batch 4
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np


def synthetic_samples(config, n: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    """`encode_sample`-shaped samples with BREEN's variable image-token counts and caption lengths."""
    from breen.config import IGNORE_INDEX, IMAGE_TOKEN_ID, QUERY_TOKEN_ID

    rng = np.random.default_rng(seed)
    s = config.image_size
    samples = []
    for _ in range(n):
        w, h = (
            (s, int(rng.integers(s // 4, s + 1)))
            if rng.random() < 0.5
            else (int(rng.integers(s // 4, s + 1)), s)
        )
        rows, cols = config.image_token_grid(w, h)
        text = int(rng.integers(20, 120))
        ids = np.concatenate([np.full(rows * cols, IMAGE_TOKEN_ID), np.full(config.num_queries, QUERY_TOKEN_ID),
                              rng.integers(3, config.vocab_size, text)]).astype(np.int64)  # fmt: skip
        labels = ids.copy()
        labels[: rows * cols + config.num_queries] = IGNORE_INDEX
        samples.append({
            "input_ids": ids, "labels": labels, "image_grid": np.array([rows, cols]),
            "pixel_values": rng.integers(0, 256, (3, s, s), dtype=np.uint8),
            "fine": rng.standard_normal((config.num_fine_queries, config.clip_dim)).astype(np.float16),
            "coarse": rng.standard_normal((config.num_coarse_queries, config.clip_dim)).astype(np.float16),
        })  # fmt: skip
    return samples


def time_steps(model, opt, batches, device: str) -> tuple[list[float], list[float]]:
    import torch

    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    times, losses = [], []
    for batch in batches:
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        sync()
        t0 = time.perf_counter()
        out = model(**batch)
        out.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        sync()
        times.append(time.perf_counter() - t0)
        losses.append(float(out.loss.detach()))
    return times, losses


def run(args) -> dict:
    import torch

    from breen.attention import default_attn_implementation
    from breen.config import BreenConfig
    from breen.data import collate, pack
    from breen.model import BreenForCausalLM
    from breen.stages import set_trainable
    from jobs.metrics import peak_tflops

    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench.train_step: no CUDA device (use --device cpu for a smoke run)")
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    config = BreenConfig.preset(args.preset)
    attn = default_attn_implementation() if device == "cuda" else "sdpa"
    torch.manual_seed(0)
    model = BreenForCausalLM._from_config(config, dtype=dtype, attn_implementation=attn).to(device)
    model.config.use_cache = False
    set_trainable(model, "stage2", log=None)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    start = {k: v.detach().clone() for k, v in model.state_dict().items()}  # both sides start from here

    mb = args.micro_batch
    samples = synthetic_samples(config, mb * args.steps, seed=0)
    groups = [samples[i : i + mb] for i in range(0, len(samples), mb)]
    padded = [collate(g, config.pad_token_id, 8) for g in groups]
    packed = [pack(g, config.pad_token_id, 8) for g in groups]
    real = [sum(len(s["input_ids"]) for s in g) for g in groups]
    flops = [
        sum(config.flops_per_token(len(s["input_ids"])) * len(s["input_ids"]) for s in g) for g in groups
    ]
    peak = peak_tflops(None, device == "cuda") * 1e12
    result = {"preset": args.preset, "device": torch.cuda.get_device_name() if device == "cuda" else "cpu",
              "attn_implementation": attn, "micro_batch": mb, "params": config.param_counts()["stored"],
              "peak_tflops": peak / 1e12}  # fmt: skip
    w = min(args.warmup, args.steps - 1)
    for name, batches in (("padded", padded), ("packed", packed)):
        model.load_state_dict(start)
        opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-5)
        times, losses = time_steps(model, opt, batches, device)
        step = statistics.median(times[w:])
        tokens = statistics.mean(real[w:])
        result[name] = {
            "step_s": step, "tokens_per_s": tokens / step, "mfu": statistics.mean(flops[w:]) / step / peak,
            "padding_waste": 1 - sum(real) / sum(b["input_ids"].numel() for b in batches),
            "losses": losses,
        }  # fmt: skip
    result["max_loss_diff"] = max(abs(a - b) for a, b in zip(result["padded"]["losses"], result["packed"]["losses"],
                                                             strict=True))  # fmt: skip
    result["speedup_packed_over_padded"] = result["packed"]["tokens_per_s"] / result["padded"]["tokens_per_s"]
    return result


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="mid")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--micro-batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--warmup", type=int, default=3, help="first steps left out of the medians")
    ap.add_argument("--json", default=None)
    return ap


def main() -> None:
    args = parser().parse_args()
    r = run(args)
    print(f"{r['preset']} preset ({r['params'] / 1e9:.2f}B stored) on {r['device']}, {r['attn_implementation']}, "
          f"micro-batch {r['micro_batch']}")  # fmt: skip
    for name in ("padded", "packed"):
        x = r[name]
        print(f"  {name:7s} step {x['step_s']:.3f} s, {x['tokens_per_s']:,.0f} tokens/s, MFU {x['mfu']:.1%}, "
              f"padding waste {x['padding_waste']:.1%}")  # fmt: skip
    print(f"  packed / padded tokens/s: {r['speedup_packed_over_padded']:.2f}; same losses: max |diff| "
          f"{r['max_loss_diff']:.2e} over {len(r['packed']['losses'])} steps")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(r, indent=1))


if __name__ == "__main__":
    main()
