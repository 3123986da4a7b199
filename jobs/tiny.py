"""A tiny random BREEN (``tiny`` preset) with an offline byte-level tokenizer: the demo's and tests'
stage-1 starting point, so nothing is downloaded; and small synthetic training shards (tests, benchmarks).

Writes a BREEN directory in Hugging Face layout (``config.json``, ``model.safetensors``, tokenizer files)
that `jobs.train` (``--init-from DIR``) and `breen.generate` load. The tokenizer is a byte-level BPE
trained on a few fixed sentences with the Qwen special tokens ``<|endoftext|>`` (pad, id 0),
``<|im_start|>`` (1) and ``<|im_end|>`` (2, eos) and a ChatML chat template, so any text encodes. It is the
one tiny tokenizer: the tests use it too (`tests._tiny_models` imports `tiny_tokenizer`), so the demo and
the tests share one vocabulary.

`write_tiny_shards` writes training shards in the `breen.shard_format` layout, images inline (key, image bytes,
width, height, caption | conversations, fine/coarse `fixed_shape_tensor` float16, teacher metadata,
markers, manifest) from random images and captions, in well under a second.

Run with:
    python -m jobs.tiny --out runs/tiny-init [--clip-dim 64] [--seed 0]
"""

from __future__ import annotations

import argparse
import functools
from pathlib import Path

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
_CORPUS = (
    "A photo of a small red boat on a calm lake at sunset.",
    "Two happy dogs run across a green meadow in front of a forest.",
    "What is in the image? Describe the picture in detail.",
    "You are a helpful assistant.",
    "The answer is yes. The answer is no. There are three apples on the table.",
    "A blue car, a yellow kite and an old white house on a rainy day.",
    "user assistant system\n\n",
)


@functools.cache
def _tokenizer_json(vocab_size: int) -> str:
    """The trained byte-level BPE as JSON (trained once per process: the tests build many tokenizers)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(_CORPUS) * 4, trainer=trainer)
    return tok.to_str()


def tiny_tokenizer(vocab_size: int = 400):
    """A Qwen-like fast tokenizer (ChatML template, pad ``<|endoftext|>``, eos ``<|im_end|>``), a fresh
    object on every call."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json(vocab_size)),
        pad_token="<|endoftext|>",
        eos_token="<|im_end|>",
        additional_special_tokens=["<|im_start|>"],
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def save_tiny_breen(out: str | Path, clip_dim: int = 32, seed: int = 0, **overrides) -> Path:
    """Save a tiny random `BreenForCausalLM` (fp32, safetensors) and the tiny tokenizer to `out`."""
    import torch

    from breen.config import BreenConfig
    from breen.model import BreenForCausalLM

    out = Path(out)
    config = BreenConfig.preset("tiny", clip_dim=clip_dim, **overrides)
    torch.manual_seed(seed)
    model = BreenForCausalLM(config)
    model.save_pretrained(out)
    tiny_tokenizer().save_pretrained(out)
    return out


_WORDS = [
    "a",
    "the",
    "small",
    "red",
    "blue",
    "green",
    "old",
    "happy",
    "dog",
    "cat",
    "boat",
    "car",
    "house",
    "tree",
    "lake",
    "sky",
    "kite",
    "apple",
    "table",
]


def write_tiny_shards(
    out: str | Path,
    n_rows: int,
    *,
    clip_dim: int = 64,
    rows_per_file: int = 16,
    sft: bool = False,
    text_only_every: int = 0,
    corrupt_rows: tuple[int, ...] = (),
    image_sides: tuple[int, int] = (20, 120),
    seed: int = 0,
    referenced: bool = False,
) -> Path:
    """Write ``n_rows`` synthetic training rows to `out` (`breen.shard_format`, images inline).

    `sft`: add a ``conversations`` column (two turns, the first with ``<image>``); `text_only_every` > 0:
    every k-th row has no image and null targets (SFT text-only samples); `corrupt_rows`: row indices
    whose image bytes are garbage (the ingest must reject them with ``decode_error``); `image_sides`:
    range of image width/height (small images are random-noise PNGs, larger ones smooth JPEGs);
    `referenced`: store the images once in ``<out>-images/`` and reference them from the shards, as the data
    preparation does (default: inline ``image`` bytes).
    """
    import io
    import json

    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc
    from PIL import Image

    from breen import shard_format as sf
    from breen.storage import Store
    from pipelines import fingerprint, layout

    out = Path(out)
    # a dataset records what it is made from before its shards (`pipelines.fingerprint`)
    made_from = [n_rows, clip_dim, rows_per_file, sft, text_only_every, list(corrupt_rows), list(image_sides), seed,
                 referenced]  # fmt: skip
    fingerprint.record(out, {"step": "shards", "inputs": {"write_tiny_shards": made_from}})
    rng = np.random.default_rng(seed)
    meta = {
        sf.META_TEACHER: "synthetic",
        sf.META_TEACHER_WEIGHTS: f"random:{seed}",
        sf.META_PREPROCESS: "none",
    }
    rows = []
    for i in range(n_rows):
        text_only = text_only_every > 0 and i % text_only_every == text_only_every - 1
        w, h = (int(rng.integers(*image_sides)) for _ in range(2))
        image = None
        if not text_only:
            buf = io.BytesIO()
            if max(w, h) <= 128:
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, format="PNG")
            else:
                small = Image.fromarray(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8))
                small.resize((w, h), Image.Resampling.BILINEAR).save(buf, format="JPEG", quality=90)
            image = b"not an image" if i in corrupt_rows else buf.getvalue()
        caption = " ".join(rng.choice(_WORDS, size=int(rng.integers(4, 10)))).capitalize() + "."
        row = {"key": f"{i:012d}", "image": image, "width": None if text_only else w,
               "height": None if text_only else h, "caption": caption}  # fmt: skip
        if sft:
            question = "<image>\nWhat is in the picture?" if image is not None else "Say something."
            row["conversations"] = json.dumps(
                [{"from": "human", "value": question}, {"from": "gpt", "value": caption}]
            )
        rows.append(row)
    fine = rng.standard_normal((n_rows, 64, clip_dim)).astype(np.float16)
    coarse = rng.standard_normal((n_rows, 36, clip_dim)).astype(np.float16)
    valid = np.array([r["image"] is not None for r in rows])
    names = [sf.KEY, sf.IMAGE, sf.WIDTH, sf.HEIGHT, sf.CAPTION] + ([sf.CONVERSATIONS] if sft else [])
    schema = [(c, sf.TYPES[c]) for c in names]
    for j, lo in enumerate(range(0, n_rows, rows_per_file)):
        hi = min(n_rows, lo + rows_per_file)
        table = pa.Table.from_pylist(rows[lo:hi], pa.schema(schema))
        table = table.append_column(sf.FINE, sf.tensor_array(fine[lo:hi], valid[lo:hi]))
        table = table.append_column(sf.COARSE, sf.tensor_array(coarse[lo:hi], valid[lo:hi]))
        name = layout.shard_name(j)
        file_meta = meta
        if referenced:
            store = out.parent / f"{out.name}-images"
            layout.write_table(store / f"{name}.parquet", table.select([sf.KEY, sf.IMAGE]))
            has = table.column(sf.IMAGE).is_valid()
            positions = pa.array(np.arange(hi - lo, dtype=np.int32))
            table = table.drop_columns([sf.IMAGE])
            table = table.add_column(1, sf.IMAGE_SHARD, pc.if_else(has, name, pa.scalar(None, pa.string())))
            table = table.add_column(2, sf.IMAGE_ROW, pc.if_else(has, positions, pa.scalar(None, pa.int32())))
            file_meta = {**meta, sf.META_IMAGES: f"../{store.name}"}
        empty = layout.with_reason(table.select(["key"]).slice(0, 0), [], [])
        layout.write_shard(out, name, table, empty, table.num_rows, metadata=file_meta)
    manifest = {"step": "shards", "teacher": {"name": "synthetic"}, "counts": {"kept": n_rows}}
    Store.at(out / "manifest.json").write_json(manifest)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jobs.tiny", description="Write a tiny random BREEN + tokenizer (offline).")
    parser.add_argument("--out", required=True)
    parser.add_argument("--clip-dim", type=int, default=32, help="teacher feature width D of the shards")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"tiny BREEN written to {save_tiny_breen(args.out, args.clip_dim, args.seed)}")


if __name__ == "__main__":
    main()
