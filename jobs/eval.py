"""Evaluate a BREEN export with lmms-eval (one node): our `breen.lmms` plugin, lmms-eval's tasks.

Reads a BREEN export directory (``<run>/stageN/export/`` from `jobs.train`, or any directory with
``config.json``, safetensors and tokenizer files), local or on an object store (``s3://``, ``gs://``;
fetched once into ``$BREEN_CACHE`` like `breen.generate`). Writes one results file,
``results_<tasks>_<UTC time>.json`` (lmms-eval's results, per-task configs and versions, our arguments,
`breen.envlock.environment`), into ``--output`` (default: ``eval/`` next to the export, i.e.
``<run>/stageN/eval/``), and prints one line per task metric. Every input is checked before the model
loads: a missing export, an unknown task or a missing ``--include-path`` is a one-line error with exit
status 2.

Tasks are lmms-eval's (``mmmu_val``, ``mmbench_en_dev``, ``mmstar``, ``ai2d``, ...; they download their
data from the Hugging Face hub), plus two built-in offline ones (`build_task`), made at run time from
local files: coloured shapes drawn on white, "What colour is the shape?" / "What shape is in the
picture?":

- ``breen_shapes``: multiple choice by log-likelihood (metric ``acc``; chance is 0.25);
- ``breen_shapes_gen``: the same questions answered by greedy generation (metric ``exact_match``).

Run with:
    python -m jobs.eval --model runs/demo/train/stage3/export --tasks breen_shapes,breen_shapes_gen
    python -m jobs.eval --model s3://bucket/run/stage3/export --tasks mmmu_val,mmstar --limit 50 \\
        [--output DIR] [--device auto|cpu|cuda] [--dtype float32|bfloat16|float16] [--include-path DIR]
    ray job submit --working-dir . -- python -m jobs.eval --model s3://... --tasks mmstar
    python -m jobs.eval --build-task DIR   # write the built-in tasks (YAML + parquet) for lmms-eval's
                                           # own CLI: python -m lmms_eval --include_path DIR --model breen ...
"""

from __future__ import annotations

import argparse
import ast
import io
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from breen import envlock
from breen.storage import StorageError, Store, fetch_dir

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 160, 70),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 30),
    "purple": (130, 50, 170),
    "orange": (240, 130, 20),
}
SHAPES = ("circle", "square", "triangle")
BUILTIN_TASKS = ("breen_shapes", "breen_shapes_gen")
DATA_FILE = "breen_shapes.parquet"
_COMMON = f"""dataset_path: parquet
dataset_kwargs:
  data_files:
    test: {DATA_FILE}
test_split: test
doc_to_visual: image
"""
TASK_YAML = {
    "breen_shapes": f"""task: breen_shapes
{_COMMON}output_type: multiple_choice
doc_to_text: question
doc_to_choice: choices
doc_to_target: answer
target_delimiter: ""
process_results: !function jobs.eval.choice_results
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""",
    "breen_shapes_gen": f"""task: breen_shapes_gen
{_COMMON}output_type: generate_until
doc_to_text: "{{{{question}}}} Answer with one word."
doc_to_target: target
generation_kwargs:
  until: ["\\n", "."]
  max_new_tokens: 8
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    ignore_punctuation: true
""",
}


def draw_shape(shape: str, colour: str, rng: np.random.Generator, size: int = 224) -> Image.Image:
    """One filled `shape` of a named `colour` on white, at a random place and scale."""
    img = Image.new("RGB", (size, size), "white")
    half = int(rng.integers(size // 6, size // 3))  # half the shape's extent
    cx, cy = (int(v) for v in rng.integers(half, size - half, 2))
    box = (cx - half, cy - half, cx + half, cy + half)
    draw, fill = ImageDraw.Draw(img), COLOURS[colour]
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    else:
        draw.polygon([(cx, cy - half), (cx + half, cy + half), (cx - half, cy + half)], fill=fill)
    return img


def shape_docs(n: int = 24, seed: int = 0) -> list[dict[str, Any]]:
    """`n` questions (colour and shape alternating), deterministic for `seed`: the built-in tasks' rows."""
    rng = np.random.default_rng(seed)
    docs = []
    for i in range(n):
        shape = SHAPES[int(rng.integers(len(SHAPES)))]
        colour = list(COLOURS)[int(rng.integers(len(COLOURS)))]
        buf = io.BytesIO()
        draw_shape(shape, colour, rng).save(buf, "PNG")
        if i % 2 == 0:
            question, choices, target = "What colour is the shape?", list(COLOURS), colour
        else:
            question, choices, target = "What shape is in the picture?", list(SHAPES), shape
        docs.append(
            {
                "id": f"shape-{i:03d}",
                "image": {"bytes": buf.getvalue(), "path": None},
                "question": question,
                "choices": choices,
                "answer": choices.index(target),
                "target": target,
            }
        )
    return docs


def build_task(out: str | Path, n: int = 24, seed: int = 0) -> Path:
    """Write the built-in tasks into `out`: one YAML per task and the parquet they share."""
    import datasets

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    features = datasets.Features(
        {
            "id": datasets.Value("string"),
            "image": datasets.Image(),
            "question": datasets.Value("string"),
            "choices": datasets.List(datasets.Value("string")),
            "answer": datasets.Value("int64"),
            "target": datasets.Value("string"),
        }
    )
    docs = shape_docs(n, seed)
    table = datasets.Dataset.from_list(docs, features=features)
    table.to_parquet(str(out / DATA_FILE))
    for name, text in TASK_YAML.items():
        (out / f"{name}.yaml").write_text(text)
    return out


def choice_results(doc: dict[str, Any], results: list[tuple[float, bool] | str]) -> dict[str, float]:
    """``process_results`` of ``breen_shapes``: correct when the answer has the largest log-likelihood.

    lmms-eval 0.7.3 hands each ``(log-likelihood, is_greedy)`` over as its ``str()`` (its
    ``unwrap_generation_output`` stringifies anything that is not text), which is read back here; its
    default multiple-choice scoring could not use them (and takes the smallest value, reading them as
    losses: see `breen.lmms`).
    """
    pairs = [ast.literal_eval(r) if isinstance(r, str) else r for r in results]
    lls = [float(ll) for ll, _ in pairs]
    return {"acc": float(int(np.argmax(lls)) == int(doc["answer"]))}


def summary_lines(results: dict[str, Any]) -> list[str]:
    """One line per task metric: ``task metric value ± stderr`` (lmms-eval's ``metric,filter`` keys)."""
    lines = []
    for task, metrics in sorted(results.get("results", {}).items()):
        for key, value in sorted(metrics.items()):
            metric, _, flt = key.partition(",")
            if metric == "alias" or "_stderr" in metric or not isinstance(value, (int, float)):
                continue
            stderr = metrics.get(f"{metric}_stderr,{flt}")
            err = f" ± {stderr:.4f}" if isinstance(stderr, (int, float)) else ""
            n = results.get("n-samples", {}).get(task, {}).get("effective")
            lines.append(f"{task} {metric} {value:.4f}{err}" + (f" (n={n})" if n is not None else ""))
    return lines


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m jobs.eval", description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="BREEN export directory, local or s3:// / gs://")
    parser.add_argument("--tasks", help="comma-separated lmms-eval tasks, e.g. breen_shapes,mmstar")
    parser.add_argument("--limit", type=int, default=None, help="at most N documents per task")
    parser.add_argument("--output", default=None, help="results folder (default: eval/ next to the export)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--include-path", action="append", default=[], help="more lmms-eval task folders")
    parser.add_argument("--build-task", metavar="DIR", help="only write the built-in tasks into DIR")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.build_task:
        print(f"built-in tasks {', '.join(BUILTIN_TASKS)} written to {build_task(args.build_task)}")
        return 0
    if not args.model or not args.tasks:
        parser.error("--model and --tasks are required (or --build-task DIR)")
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    if not tasks:
        parser.error(f"--tasks: {args.tasks!r} names no task")
    if args.limit is not None and args.limit < 1:
        parser.error(f"--limit: {args.limit}: must be at least 1")
    try:  # every input checked before the model loads
        model_dir = Store.at(args.model, "--model")
        if not (model_dir / "config.json").is_file():
            parser.error(f"--model: {args.model}: not a BREEN directory (no config.json there)")
        output = Store.at(args.output, "--output") if args.output else model_dir.parent / "eval"
    except (StorageError, OSError) as e:
        parser.error(str(e))
    for folder in args.include_path:
        if not Path(folder).is_dir():
            parser.error(f"--include-path: {folder}: not a folder")

    with tempfile.TemporaryDirectory(prefix="breen-eval-tasks-") as builtin:
        build_task(builtin)
        from loguru import logger  # lmms-eval's logger: INFO and up (DEBUG lists every task file it skips)

        logger.remove()
        logger.add(sys.stderr, level="INFO")
        from lmms_eval.tasks import TaskManager

        manager = TaskManager(include_path=[builtin, *args.include_path])
        unknown = [t for t in tasks if t not in manager.all_tasks]
        if unknown:
            parser.error(
                f"--tasks: unknown lmms-eval task(s): {', '.join(unknown)} "
                f"(built-in: {', '.join(BUILTIN_TASKS)}; all: python -m lmms_eval --tasks list)"
            )
        try:
            local = fetch_dir(model_dir, "--model")
        except (StorageError, OSError) as e:
            parser.error(str(e))
        from lmms_eval.evaluator import simple_evaluate
        from lmms_eval.models import get_model

        start = time.time()
        lm = get_model("breen")(pretrained=str(local), device=args.device, dtype=args.dtype)
        results = simple_evaluate(
            model=lm, tasks=tasks, limit=args.limit, task_manager=manager, log_samples=False, batch_size=1
        )
    if results is None:  # non-zero ranks; jobs.eval runs one process
        return 0
    record = {
        "model": args.model,
        "tasks": tasks,
        "limit": args.limit,
        "device": args.device,
        "dtype": args.dtype,
        "seconds": round(time.time() - start, 1),
        "environment": envlock.environment(),
        **{k: results[k] for k in ("results", "configs", "versions", "n-shot", "higher_is_better", "n-samples") if k in results},
    }
    path = output / f"results_{'+'.join(tasks)}_{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    path.write_json(record)
    for line in summary_lines(results):
        print(line)
    print(f"results: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
