"""jobs.validation: what the validation LM loss averages and the sample prompts of chat rows."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa

from jobs import ingest


def test_supervised_tokens_counts_what_the_lm_loss_averages():
    import torch

    from jobs.validation import supervised_tokens

    labels = torch.tensor([[-100, 5, 6, -100], [-100, -100, 7, 8]])
    assert supervised_tokens({"labels": labels}) == 4
    packed = torch.tensor([[-100, 5, 6, 7, -100, 8]])  # two samples: [0, 4) and [4, 6)
    assert supervised_tokens({"labels": packed, "cu_seqlens": torch.tensor([0, 4, 6])}) == 4


def test_sample_prompts_of_chat_rows_end_where_the_first_answer_starts(init_dir, model_config):
    """Stage 3 chat rows label template tokens too (their first token, never predicted); the prompt
    must still hold the chat up to the answer, and the reference is the first answer."""
    from jobs.validation import Validator

    tokenizer = ingest.load_tokenizer(init_dir)
    enc = ingest.ReadEncode("", model_config.to_dict(), "conversations", 512, seed=0, tokenizer=tokenizer)
    conv = json.dumps([{"from": "human", "value": "What is it?"}, {"from": "gpt", "value": "A red cat."}])
    rows = enc.encode_rows(pa.table({"key": ["k0"], "conversations": [conv]}), 0, [None])
    assert rows["ok"][0] and np.frombuffer(rows["labels"][0], np.int32)[0] >= 0  # the case that matters
    validator = Validator.__new__(Validator)
    validator.tokenizer, validator.image_size = tokenizer, model_config.image_size
    sample = validator._prompt(rows, 0)
    assert len(sample["input_ids"]) > 1 and "What is it?" in sample["prompt"] and "pixel_values" not in sample
    assert sample["reference"].startswith("A red cat.") and sample["key"] == "k0"
