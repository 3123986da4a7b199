"""Padding waste with and without sequence packing, and the training-ingest rate per CPU core.

Reads training-shard directories (default: the demo's, from `make demo`), encodes every sample in the
training stream's order exactly as the ingest does (`jobs.ingest.ReadEncode`: seeded file and row order,
decode + letterbox + tokenise, rejected rows kept out), cuts the stream into micro-batches of the stage's
size and collates each one twice, side by side:
  baseline  padded: every sample right-padded to the longest of its micro-batch (`breen.data.collate`);
  ours      packed: the samples back to back in one row (`breen.data.pack`, what training does).
Both round the row length up to a multiple of 8, as on GPU. Waste = padding tokens / all tokens.

Geometry: BREEN's (long side 672 px, 14-px patches: up to 2304 image tokens per sample) with the demo's
tiny tokenizer, so image tokens vary from a few hundred to 2304 as in the real corpus.

Ingest rate: samples encoded and packed per second in this single process (one core; the ingest's
actors run the same code, one per core), over the whole stream.

Run:  python -m bench.packing [--data runs/demo/shards:16 runs/demo/sft_shards:8] [--image-size 672]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

DEFAULT_DATA = ("runs/demo/shards:16", "runs/demo/sft_shards:8")  # dir:micro-batch (stages 1-2, stage 3)


def stream(path: Path, micro_batch: int, image_size: int, tokenizer_dir: Path, seed: int = 0):
    """(encoded rows as one column dict, text field, seconds to encode) for one training-shard dir."""
    from breen.config import BreenConfig
    from jobs.ingest import ReadEncode, epoch_plan, list_shards

    files = list_shards([path])
    text_field = "conversations" if "conversations" in files[0].columns else "caption"
    clip_dim = next((f.clip_dim for f in files if f.clip_dim), 64)
    config = BreenConfig.preset("tiny", clip_dim=clip_dim, image_size=image_size)
    encoder = ReadEncode(str(tokenizer_dir), config.to_dict(), text_field, max_length=4096, seed=seed,
                         group_size=micro_batch if text_field == "conversations" else 0)  # fmt: skip
    t0 = time.perf_counter()
    chunks = [c for item in epoch_plan(files, seed, epochs=1) for c in encoder.encode_file(item)]
    seconds = time.perf_counter() - t0
    rows = {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}
    return rows, config, text_field, seconds


def waste(rows: dict[str, np.ndarray], config, micro_batch: int) -> dict[str, float]:
    """Padding waste of padded vs packed micro-batches, and the seconds spent packing."""
    from jobs.ingest import Collate

    padded, packed = Collate(config, 8, packing=False), Collate(config, 8, packing=True)
    real = pad_total = pack_total = 0
    pack_seconds = 0.0
    n = len(rows["pos"])
    for lo in range(0, n - n % micro_batch, micro_batch):  # whole micro-batches, as training deals them
        batch = {k: v[lo : lo + micro_batch] for k, v in rows.items()}
        if not batch["ok"].any():
            continue
        a = padded(batch)
        t0 = time.perf_counter()
        b = packed(batch)
        pack_seconds += time.perf_counter() - t0
        real += int(b["cu_seqlens"][-1])
        assert int(a["attention_mask"].sum()) == int(b["cu_seqlens"][-1])  # same samples on both sides
        pad_total += a["input_ids"].numel()
        pack_total += b["input_ids"].numel()
    return {"real_tokens": real, "padded_waste": 1 - real / pad_total, "packed_waste": 1 - real / pack_total,
            "pack_seconds": pack_seconds}  # fmt: skip


def run(args) -> dict:
    from jobs.tiny import save_tiny_breen

    results = []
    with tempfile.TemporaryDirectory() as tmp:
        tok = save_tiny_breen(Path(tmp) / "tiny")
        for spec in args.data:
            path, _, mb = spec.rpartition(":")
            path, micro_batch = Path(path), int(mb)
            if not path.exists():
                raise SystemExit(
                    f"bench.packing: {path} does not exist (run `make demo` first, or pass --data)"
                )
            rows, config, field, seconds = stream(path, micro_batch, args.image_size, tok)
            w = waste(rows, config, micro_batch)
            ok = int(rows["ok"].sum())
            tokens = rows["num_tokens"][rows["ok"]]
            results.append({
                "data": str(path), "text_field": field, "micro_batch": micro_batch, "samples": ok,
                "rejected": int(len(rows["ok"]) - ok), "tokens_min": int(tokens.min()), "tokens_max": int(tokens.max()),
                "tokens_mean": float(tokens.mean()), **w,
                "ingest_samples_per_s": ok / (seconds + w["pack_seconds"]),
            })  # fmt: skip
    total_real = sum(r["real_tokens"] for r in results)
    overall = {
        "padded_waste": 1 - total_real / sum(r["real_tokens"] / (1 - r["padded_waste"]) for r in results),
        "packed_waste": 1 - total_real / sum(r["real_tokens"] / (1 - r["packed_waste"]) for r in results),
        "ingest_samples_per_s_per_core": sum(r["samples"] for r in results)
        / sum(r["samples"] / r["ingest_samples_per_s"] for r in results),
    }
    return {"image_size": args.image_size, "sets": results, **overall}


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--data", nargs="+", default=list(DEFAULT_DATA), help="DIR:MICRO_BATCH training-shard dirs"
    )
    ap.add_argument("--image-size", type=int, default=672)
    ap.add_argument("--json", default=None, help="also write the result as JSON here")
    return ap


def main() -> None:
    args = parser().parse_args()
    res = run(args)
    for r in res["sets"]:
        print(f"{r['data']} ({r['text_field']}, micro-batch {r['micro_batch']}): {r['samples']} samples, "
              f"{r['tokens_min']}-{r['tokens_max']} tokens (mean {r['tokens_mean']:.0f}); padding waste "
              f"padded {r['padded_waste']:.1%} vs packed {r['packed_waste']:.2%}; ingest "
              f"{r['ingest_samples_per_s']:.1f} samples/s on one core")  # fmt: skip
    print(f"all: padding waste padded {res['padded_waste']:.1%} vs packed {res['packed_waste']:.2%} "
          f"(goal < 5%); ingest {res['ingest_samples_per_s_per_core']:.1f} samples/s per core")  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
