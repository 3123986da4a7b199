"""Row accounting, the one place step statistics are added up: every input row is kept or rejected.

    shard   its stats (`pipelines.layout.write_shard`): rows_in, kept, rejected {reason: n}
    step    `summarize(stats)`: the counts of a step's finished shards (its manifest's ``counts``, the report)
    chain   `chains(counts)`: per chain of `pipelines.graph`, input rows (its first step) = kept (its last
            step) + rejected (every step of the chain), each step's input being its upstream's kept rows
    run     `collect(out)`: the counts of every step's manifest and the chain totals (`accounting.json`)

Invariant: rows_in == kept + rejected_total (`balanced`), per shard, per step and per chain.
"""

from __future__ import annotations

from collections import Counter
from typing import Any

from breen.storage import Location, Store
from pipelines import graph


class AccountingError(RuntimeError):
    """Rows were lost or duplicated: rows_in != kept + rejected."""


def summarize(stats: list[dict[str, Any]]) -> dict[str, Any]:
    """The counts of a list of shard stats: shards, rows_in, kept, rejected by reason (sorted), rejected_total."""
    rejected: Counter[str] = Counter()
    for s in stats:
        rejected.update({str(k): int(v) for k, v in (s.get("rejected") or {}).items()})
    return {
        "shards": len(stats),
        "rows_in": sum(int(s.get("rows_in", 0)) for s in stats),
        "kept": sum(int(s.get("kept", 0)) for s in stats),
        "rejected": dict(sorted(rejected.items())),
        "rejected_total": sum(rejected.values()),
    }


def balanced(counts: dict[str, Any]) -> bool:
    """rows_in == kept + rejected_total, for the counts of `summarize`."""
    return counts["rows_in"] == counts["kept"] + counts["rejected_total"]


def chains(counts: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per chain: input rows (its first step) = kept (its last step) + rejected (every step of the chain)."""
    out = {}
    for name in ("pretrain", "sft"):
        steps = [s.name for s in graph.chain(name) if s.name in counts]
        if not steps or steps[0] != graph.chain(name)[0].name or steps[-1] != graph.TRAINING[name]:
            continue
        rejected = sum(counts[s]["rejected_total"] for s in steps)
        first, last = counts[steps[0]], counts[steps[-1]]
        # every step's input is exactly its upstream's kept rows
        chained = all(counts[s]["rows_in"] == counts[graph.BY_NAME[s].rows_from]["kept"] for s in steps[1:])
        out[name] = {"input_rows": first["rows_in"], "kept": last["kept"], "rejected": rejected,
                     "balanced": chained and first["rows_in"] == last["kept"] + rejected}  # fmt: skip
    return out


def collect(out: Location) -> dict[str, Any]:
    """Per-step counts from the manifests under `out` and, per chain (`chains`), input = kept + all rejected."""
    out = Store.at(out)
    steps = {}
    for name in graph.DATASETS:
        m = out / name / "manifest.json"
        if m.exists():
            steps[name] = m.read_json()["counts"]
    return {"steps": steps, **chains(steps)}


def all_balanced(acc: dict[str, Any]) -> bool:
    """Every step and every chain of `collect`'s result balances."""
    return all(balanced(c) for c in acc["steps"].values()) and all(
        acc[chain]["balanced"] for chain in ("pretrain", "sft") if chain in acc
    )


def print_step(step: str, counts: dict[str, Any]) -> None:
    print(
        f"[{step}] rows in {counts['rows_in']} = kept {counts['kept']} + rejected {counts['rejected_total']}"
    )
    for reason, n in counts["rejected"].items():
        print(f"[{step}]     rejected {reason}: {n}")


def print_table(acc: dict[str, Any]) -> None:
    """The accounting table of `collect`'s result: one line per step, one total per chain."""
    print("\n== accounting: rows in = kept + rejected ==")
    print(f"{'step':<12} {'in':>8} {'kept':>8} {'rejected':>9}  reasons")
    for name, c in acc["steps"].items():
        reasons = ", ".join(f"{r}={n}" for r, n in c["rejected"].items()) or "-"
        ok = "ok" if balanced(c) else "MISMATCH"
        print(f"{name:<12} {c['rows_in']:>8} {c['kept']:>8} {c['rejected_total']:>9}  {reasons}  [{ok}]")
    for chain, what in (("pretrain", "input URLs"), ("sft", "SFT records")):
        if chain in acc:
            p = acc[chain]
            print(f"total: {p['input_rows']} {what} = {p['kept']} training rows + {p['rejected']} rejected "
                  f"[{'ok' if p['balanced'] else 'MISMATCH'}]")  # fmt: skip
