"""pipelines.graph: the one declaration of the step graph is consistent, and every user reads it."""

from __future__ import annotations

import importlib

from pipelines import accounting, graph, prepare, report


def test_every_step_reads_only_what_earlier_steps_of_its_chain_write():
    seen: dict[str, set[str]] = {}
    for step in graph.STEPS:
        earlier = {s.name for s in graph.chain(step.chain)[: graph.chain(step.chain).index(step)]}
        if step.rows_from is not None:
            assert step.rows_from in earlier, step
        for dataset, columns in step.reads.items():
            assert dataset in earlier, (step.name, dataset)
            assert set(columns) <= seen[dataset], (step.name, dataset, set(columns) - seen[dataset])
        seen[step.name] = set(step.writes)
        assert callable(graph.runner(step))


def test_images_are_stored_once_per_chain():
    for chain, store in graph.IMAGE_STORE.items():
        writers = [s.name for s in graph.chain(chain) if "image" in s.writes]
        assert writers == [store], (chain, writers)
        assert "image_row" in graph.step(graph.TRAINING[chain]).writes


def test_steps_and_their_users_agree_with_the_graph():
    for name in ("captions", "filter"):
        module = importlib.import_module(f"pipelines.{name}")
        assert module.STEP_INFO is graph.step(name)
    assert list(report.STEPS) == graph.DATASETS
    assert {s.name: s.rows_from for s in graph.STEPS if s.rows_from} == report.UPSTREAM
    assert graph.text_source("shards") == ("captions", ("caption",))
    assert graph.text_source("sft_shards") == ("sft_import", ("caption", "conversations"))
    assert prepare.graph is graph


def test_accounting_balances_per_chain_and_checks_the_links():
    def c(rows_in, kept):
        return {"rows_in": rows_in, "kept": kept, "rejected_total": rows_in - kept}

    counts = {"download": c(10, 9), "captions": c(9, 8), "filter": c(8, 6), "shards": c(6, 6)}
    acc = accounting.chains(counts)
    assert acc["pretrain"] == {"input_rows": 10, "kept": 6, "rejected": 4, "balanced": True}
    assert "sft" not in acc  # no SFT chain ran
    counts["filter"] = c(7, 6)  # a row lost between captions and filter
    assert accounting.chains(counts)["pretrain"]["balanced"] is False
    del counts["shards"]
    assert "pretrain" not in accounting.chains(counts)  # an unfinished chain has no total
