"""How a step runs: open its output dataset, pick the shards to (re)do, process them on Ray, finish it.

    with runner.open_step(cfg, STEP, config) as output:       # fingerprint and lease (`pipelines.fingerprint`)
        todo = runner.todo_shards(output, names)              # unfinished, damaged or stale shards
        runner.run_shards(STEP, todo, Worker, kwargs, ...)    # a Ray Data actor pool (`ShardWorker`), or
        runner.run_tasks(STEP, task, todo, ...)               # one Ray task per shard
        return runner.finish_step(output, inputs, config)     # manifest, accounting printed

The files a step writes are those of `pipelines.layout`; Ray is started by `pipelines.raystart`.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Iterator
from typing import Any

import pyarrow as pa

from breen.storage import Store
from pipelines import accounting, fingerprint, graph, layout, progress


def open_step(cfg: Any, step: str, config: dict[str, Any], external: dict[str, Any] | None = None
              ) -> fingerprint.Output:  # fmt: skip
    """Start writing `step`'s dataset under `cfg.out` (`pipelines.fingerprint.open_output`): its spec is
    the fingerprints of the upstream datasets `pipelines.graph` says it reads (each must be complete),
    the `external` inputs' checksums, `config` and the step module's code. `cfg.redo` (``--redo``)
    recomputes a dataset made from another spec; `cfg.wait_s` (``--wait``) waits for another run's lease."""
    upstream = graph.upstream(step)
    inputs = {u: fingerprint.upstream(cfg.out / u, u) for u in upstream}
    spec = fingerprint.spec(step, {**inputs, **(external or {})}, config, graph.step(step).module)
    return fingerprint.open_output(cfg.out / step, spec, redo=cfg.redo, wait_s=cfg.wait_s,
                                   reads=tuple(cfg.out / u for u in upstream))  # fmt: skip


def todo_shards(output: fingerprint.Output, names: list[str], also: tuple[Store, ...] = ()) -> list[str]:
    """The shards of `names` this run must (re)do: those without a marker, plus finished ones whose files
    are damaged (size differs from their stats) or whose upstream files were redone since (their markers
    are removed, with a line saying why; and from the step's private datasets `also`, when the upstream
    changed)."""
    dataset = output.dataset
    finished = [n for n in names if n in set(layout.finished_shards(dataset))]
    redo = layout.damaged_shards(dataset, finished)
    for name in fingerprint.stale_shards(dataset, output.fingerprint, finished):
        redo[name] = "an upstream file it was made from was redone since"
        for private in also:
            layout.done_marker(private, name).delete()
    for name, why in sorted(redo.items()):
        print(f"[{output.spec['step']}] redoing {dataset / name}: {why}", flush=True)
        layout.done_marker(dataset, name).delete()
    return layout.unfinished(dataset, names)


def finish_step(
    output: fingerprint.Output,
    inputs: list[dict[str, Any]],
    config: dict[str, Any],
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """End of a step: write the manifest (the lease still ours), print the accounting, return the manifest."""
    output.check()
    manifest = layout.write_manifest(
        output.dataset, output.spec["step"], inputs, config, output.fingerprint, extra
    )
    accounting.print_step(output.dataset.name, manifest["counts"])
    return manifest


def run_shards(
    step: str,
    names: list[str],
    worker_cls: type,
    worker_kwargs: dict[str, Any],
    *,
    num_actors: int,
    num_cpus: float,
    num_gpus: float = 0.0,
) -> list[dict[str, Any]]:
    """Process shards with a fixed-size Ray Data actor pool, one shard per call.

    `worker_cls(**worker_kwargs)` is built once per actor; calling it with a batch
    `{"shard": [name]}` processes that shard (skipping it if already done) and returns
    `{"stats": [json]}`. Returns the per-shard stats, in shard order.
    """
    import ray

    if not names:
        print(f"[{step}] nothing to do: every shard is finished", flush=True)
        return []
    ds = ray.data.from_items([{"shard": n} for n in names], override_num_blocks=len(names))
    ds = ds.map_batches(
        worker_cls,
        fn_constructor_kwargs=worker_kwargs,
        batch_size=1,
        compute=ray.data.ActorPoolStrategy(size=min(num_actors, len(names))),
        num_cpus=num_cpus,
        num_gpus=num_gpus,
        batch_format="pyarrow",
        zero_copy_batch=True,
    )
    return progress.track(step, len(names), (json.loads(row["stats"]) for row in ds.iter_rows()))


def run_tasks(step: str, task: Any, names: list[str], *args: Any, keep_going: bool = False
              ) -> tuple[list[dict[str, Any]], dict[str, str]]:  # fmt: skip
    """Process shards as Ray tasks, one per shard: `task.remote(name, *args)` (a `ray.remote` function,
    with its retries set) returns the shard's stats. Returns the stats in shard order and {shard: why} of
    the shards that failed after their retries: with `keep_going` each is reported on stderr and the other
    shards go on; without, the first failure is raised."""
    import ray

    failed: dict[str, str] = {}

    def finished() -> Iterator[dict[str, Any]]:
        pending = {task.remote(n, *args): n for n in names}
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            name = pending.pop(ready[0])
            try:
                yield ray.get(ready[0])
            except Exception as e:
                if not keep_going:
                    raise
                failed[name] = f"{type(e).__name__}: {e}".splitlines()[0]
                print(f"[{step}] shard {name} failed after its retries: {failed[name]}", file=sys.stderr,
                      flush=True)  # fmt: skip

    return progress.track(step, len(names), finished()), failed


class ShardWorker:
    """Base class for per-shard actors: subclasses implement `process(name) -> stats`."""

    def __init__(self, in_dir: Store, out_dir: Store) -> None:
        self.in_dir = Store.at(in_dir)
        self.out_dir = Store.at(out_dir)

    def process(self, name: str) -> dict[str, Any]:  # pragma: no cover - interface
        raise NotImplementedError

    def __call__(self, batch: pa.Table) -> dict[str, list[str]]:
        out = []
        for name in batch.column("shard").to_pylist():
            if layout.done_marker(self.out_dir, name).exists():
                stats = layout.stats_path(self.out_dir, name).read_json()
            else:
                t0 = time.monotonic()
                stats = self.process(name)
                stats.setdefault("seconds", round(time.monotonic() - t0, 3))
            out.append(json.dumps(stats))
        return {"stats": out}
