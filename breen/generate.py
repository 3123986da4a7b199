"""Greedy generation with a KV cache, prompt in the stage-3 layout (image, queries, repeated question).

Reads a BREEN directory in Hugging Face layout (``config.json``, safetensors weights, tokenizer files, as
written by `breen.convert` or a training checkpoint export) and an image file; prints the answer. The
directory may be on an object store (``s3://``, ``gs://``; endpoint from ``AWS_ENDPOINT_URL``): it is
fetched once into ``$BREEN_CACHE`` (default ``~/.cache/breen``) and reused while it is unchanged.

Run with:
    python -m breen.generate --model DIR --image FILE --prompt TEXT \\
        [--max-new-tokens 128] [--dtype float32|bfloat16|float16] [--device auto|cpu|cuda]
``--image`` may be omitted for a text-only prompt. No CLIP model is needed at inference.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from breen.storage import StorageError, Store, fetch_dir

if TYPE_CHECKING:  # torch, transformers and the model load only when generating: `--help` and input
    import torch  # errors return at once

    from breen.model import BreenForCausalLM


def greedy_generate(
    model: BreenForCausalLM,
    input_ids: torch.Tensor,
    pixel_values: torch.Tensor | None = None,
    image_grid: torch.Tensor | None = None,
    max_new_tokens: int = 128,
    eos_token_ids: set[int] | None = None,
    stop: Callable[[list[int]], bool] | None = None,
) -> list[int]:
    """Greedy decoding of one prompt (input_ids [L] or [1, L] with sentinels) -> new token ids.

    The prompt (with image and queries) runs once to fill the cache; each new token is then one
    text-token step through the text expert. Stops at any id in `eos_token_ids` (kept in the output),
    or when `stop(new_tokens)` is true after a token (e.g. a stop string was decoded).
    """
    import torch

    with torch.no_grad():
        return _greedy(model, input_ids, pixel_values, image_grid, max_new_tokens, eos_token_ids, stop)


def _greedy(model, input_ids, pixel_values, image_grid, max_new_tokens, eos_token_ids, stop) -> list[int]:
    import torch

    model.eval()
    device = model.device
    ids = input_ids.view(1, -1).to(device)  # [1, L]
    if pixel_values is not None:
        pixel_values = pixel_values.view(1, *pixel_values.shape[-3:]).to(device)  # [1, 3, S, S]
        image_grid = image_grid.view(1, 2).to(device)
    out = model(
        input_ids=ids, pixel_values=pixel_values, image_grid=image_grid, use_cache=True, logits_to_keep=1
    )
    new_tokens: list[int] = []
    for _ in range(max_new_tokens):
        next_id = int(out.logits[0, -1].argmax())
        new_tokens.append(next_id)
        if (eos_token_ids and next_id in eos_token_ids) or (stop is not None and stop(new_tokens)):
            break
        step = torch.tensor([[next_id]], device=device)  # [1, 1]
        out = model(input_ids=step, cache=out.cache, use_cache=True, logits_to_keep=1)
    return new_tokens


def stop_ids(tokenizer, model: BreenForCausalLM) -> set[int]:
    """`<|im_end|>`, `<|endoftext|>` and the config's eos ids that exist in this tokenizer."""
    ids = set()
    for token in ("<|im_end|>", "<|endoftext|>"):
        tid = tokenizer.convert_tokens_to_ids(token)
        if tid is not None and tid != tokenizer.unk_token_id:
            ids.add(int(tid))
    eos = model.config.eos_token_id
    ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return ids


def answer(
    model: BreenForCausalLM,
    tokenizer,
    prompt: str,
    image=None,
    max_new_tokens: int = 128,
    until: Sequence[str] = (),
) -> str:
    """Generate the answer to `prompt` about `image` (PIL image, encoded bytes, or None).

    Decoding also stops once the answer contains a string of `until`; the answer is cut before the
    first one (lm-eval's ``until`` convention).
    """
    import torch

    from breen.data import encode_prompt

    until = [s for s in until if s]  # an empty stop string would stop at once

    def text(tokens: list[int]) -> str:
        return tokenizer.decode(tokens, skip_special_tokens=True)

    def stop(tokens: list[int]) -> bool:
        return any(s in text(tokens) for s in until)

    inputs = encode_prompt(tokenizer, model.config, question=prompt, image=image)
    pixel_values = torch.from_numpy(inputs["pixel_values"]) if "pixel_values" in inputs else None
    tokens = greedy_generate(
        model,
        torch.from_numpy(inputs["input_ids"]),
        pixel_values,
        torch.from_numpy(inputs["image_grid"]),
        max_new_tokens=max_new_tokens,
        eos_token_ids=stop_ids(tokenizer, model),
        stop=stop if until else None,
    )
    out = text(tokens)
    cut = min((i for i in (out.find(s) for s in until) if i >= 0), default=len(out))
    return out[:cut]


def load(model_dir: str | Path, device: str = "auto", dtype: str = "float32") -> tuple[BreenForCausalLM, Any]:
    """(model on `device` in eval mode, tokenizer) from a local BREEN directory.

    ``device`` "auto" is cuda when available; flash attention only on CUDA in half precision, else SDPA.
    """
    import torch
    from transformers import AutoTokenizer

    from breen.model import BreenForCausalLM

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    attn = None if device.startswith("cuda") and dtype != "float32" else "sdpa"
    model = BreenForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype), attn_implementation=attn)
    model = model.to(device).eval()
    # config=: no AutoConfig lookup of "breen"
    return model, AutoTokenizer.from_pretrained(model_dir, config=model.config)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m breen.generate", description="Greedy BREEN generation (stage-3 prompt layout)."
    )
    parser.add_argument(
        "--model", required=True, help="BREEN directory (config.json, safetensors, tokenizer), local or s3:// / gs://"
    )
    parser.add_argument("--image", default=None, help="image file (omit for a text-only prompt)")
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (cuda when available)")
    args = parser.parse_args(argv)
    try:  # every input checked before the model loads (minutes for 7B)
        model_dir = Store.at(args.model, "--model")
        if not (model_dir / "config.json").is_file():
            parser.error(f"--model: {args.model}: not a BREEN directory (no config.json there)")
        if args.image and not Path(args.image).is_file():
            parser.error(f"--image: {args.image}: file not found")
        args.model = str(fetch_dir(model_dir, "--model"))
    except (StorageError, OSError) as e:
        parser.error(str(e))
    model, tokenizer = load(args.model, args.device, args.dtype)
    image = Path(args.image).read_bytes() if args.image else None
    print(answer(model, tokenizer, args.prompt, image=image, max_new_tokens=args.max_new_tokens))


if __name__ == "__main__":
    main()
