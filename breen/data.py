"""Turn one sample into model inputs (numpy), and pad a list of them into a batch.

Reads: a sample = image (PIL image, encoded bytes, or None) + text (a caption string for stages 1-2, or a
LLaVA ``conversations`` list for stage 3) + optional cached teacher features ``fine`` [64, clip_dim] and
``coarse`` [36, clip_dim]. Writes: a dict of numpy arrays (`encode_sample`), then a padded batch
(`collate`) or a packed one (`pack`: the samples back to back in one row) in the formats documented in
`breen.model`. Works with any Qwen2 tokenizer loaded from a local
directory (it needs ``<|im_start|>`` and ``<|im_end|>``).

Layouts (reference section 1.3):

- caption (stages 1-2, "plain"): ``[image tokens][100 queries]{caption}\\n``; only the caption and its
  ``\\n`` are supervised.
- conversations (stage 3 and inference, Qwen ChatML): the query block follows the first user turn, which
  holds the image, and that user turn is repeated without the image::

    <|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n
    <|im_start|>user\\n[image tokens]\\n{question}<|im_end|>\\n
    [100 queries]
    <|im_start|>user\\n\\n{question}<|im_end|>\\n
    <|im_start|>assistant\\n{answer}<|im_end|>\\n  ... further turns

  Labels (Qwen-VL style, as released): every turn's ``<|im_start|>`` and its closing ``<|im_end|>\\n`` are
  supervised, and so is the assistant content; role words, their ``\\n`` and system/user content are not.
  Text-only samples get no image, no query block and no repetition.

Special tokens in data text are neutralised, not rejected: captions, conversation turns (the system
prompt included) and inference questions are tokenised as plain text (``split_special_tokens=True``), so
a caption containing ``<|im_end|>`` or ``<|im_start|>system`` becomes the ordinary tokens that spell those
characters, never a control token: data cannot close a turn, open a system turn or fake an end of
sequence, and the sample keeps its text. Only the layout itself emits ``<|im_start|>`` / ``<|im_end|>``.
Text without special-token strings encodes exactly as before.

Length: ``max_length`` bounds the whole spliced sequence (stricter than the released code, which truncated
text only and let images overflow). Text is cut at the end; image and query tokens are never cut. A sample
whose image and queries do not fit, or that keeps no supervised answer token, raises `SampleRejected` with
a short ``reason`` instead of being mangled.

Image geometry (reference section 1.2): long side resized to ``image_size`` (672, upscaling small images),
short side scaled proportionally and rounded up to a multiple of ``size_multiple`` (28), bicubic resize,
centred on a square canvas filled with the CLIP mean colour. ``image_grid`` = (rows, cols) of 14-px
tokens in the valid region; the model keeps only those, in raster order.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import numpy as np
from PIL import Image

from breen.config import IGNORE_INDEX, IMAGE_TOKEN_ID, QUERY_TOKEN_ID, BreenConfig

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
IMAGE_PLACEHOLDER = "<image>"
DEFAULT_MAX_LENGTH = 4096  # whole spliced sequence: a square image (2304) + queries (100) + ~1.7k text
MAX_IMAGE_PIXELS = 64_000_000  # refuse larger images before decoding them (decompression bombs)
_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "Answer": "assistant",
    "system": "system",
}


class SampleRejected(ValueError):
    """A sample that cannot become model inputs; ``reason`` is a short code for the rejected-rows table.

    Reasons: ``decode_error``, ``image_too_large``, ``image_exceeds_max_length``,
    ``question_exceeds_max_length`` (stage 3: the first question precedes the queries), ``empty_text``,
    ``no_answer_after_truncation``, ``bad_conversation``, ``placeholder_without_image``,
    ``targets_without_image``, ``bad_target`` (teacher targets of the wrong shape, with a nan or inf,
    or only one of fine/coarse).
    """

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


# ----------------------------------------------------------------------------- images
def decode_image(image: Any, max_pixels: int = MAX_IMAGE_PIXELS) -> Image.Image:
    """PIL image or encoded bytes -> RGB PIL image. Oversized or corrupt inputs raise `SampleRejected`."""
    if isinstance(image, (bytes, bytearray, memoryview)):
        try:
            img = Image.open(io.BytesIO(bytes(image)))
        except Exception as err:  # PIL raises several types for garbage
            raise SampleRejected("decode_error", f"{type(err).__name__}: {err}") from err
    elif isinstance(image, Image.Image):
        img = image
    else:
        raise TypeError(f"image must be a PIL image or encoded bytes, got {type(image).__name__}")
    if img.width * img.height > max_pixels:
        raise SampleRejected("image_too_large", f"{img.width}x{img.height} > {max_pixels} pixels")
    try:
        return img.convert("RGB")  # forces the decode
    except Exception as err:
        raise SampleRejected("decode_error", f"{type(err).__name__}: {err}") from err


def letterbox(image: Image.Image, config: BreenConfig) -> tuple[np.ndarray, tuple[int, int]]:
    """RGB image -> (canvas uint8 [3, S, S], (rows, cols) of valid image tokens), S = config.image_size."""
    rows, cols = config.image_token_grid(image.width, image.height)
    w_px, h_px = cols * config.patch_size, rows * config.patch_size
    resized = image.resize((w_px, h_px), Image.Resampling.BICUBIC)
    s = config.image_size
    mean_colour = tuple(round(255 * m) for m in config.image_mean)
    canvas = Image.new("RGB", (s, s), mean_colour)
    canvas.paste(resized, ((s - w_px) // 2, (s - h_px) // 2))  # offsets are whole patches (size_multiple)
    chw = np.asarray(canvas, dtype=np.uint8).transpose(2, 0, 1).copy()  # [S, S, 3] -> [3, S, S]
    return chw, (rows, cols)


# ----------------------------------------------------------------------------- tokens
class _Seq:
    """Token ids, labels and an "answer" flag (supervised content) built piece by piece."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.labels: list[int] = []
        self.answer: list[bool] = []

    def add(self, ids: Sequence[int], supervised: bool, answer: bool = False) -> None:
        self.ids += ids
        self.labels += list(ids) if supervised else [IGNORE_INDEX] * len(ids)
        self.answer += [answer] * len(ids)


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """`text` as plain text: special-token strings in it are split into ordinary tokens."""
    return list(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"])


class _Tok:
    """The few token pieces the layouts need, from any Qwen2 tokenizer."""

    def __init__(self, tokenizer: Any):
        self.tokenizer = tokenizer
        self.im_start = self._special(tokenizer, "<|im_start|>")
        self.im_end = self._special(tokenizer, "<|im_end|>")
        self.nl = self.encode("\n")

    @staticmethod
    def _special(tokenizer: Any, token: str) -> int:
        tid = tokenizer.convert_tokens_to_ids(token)
        if tid is None or tid == tokenizer.unk_token_id:
            raise ValueError(f"tokenizer has no {token} token (not a Qwen2 tokenizer?)")
        return int(tid)

    def encode(self, text: str) -> list[int]:
        return encode_text(self.tokenizer, text)

    def turn(self, seq: _Seq, role: str, content: list[int], image_tokens: int = 0) -> None:
        """Append one ChatML turn with the reference's label masking."""
        seq.add([self.im_start], supervised=True)
        seq.add(self.encode(role) + self.nl, supervised=False)
        if image_tokens:
            seq.add([IMAGE_TOKEN_ID] * image_tokens, supervised=False)
        is_answer = role == "assistant"
        seq.add(content, supervised=is_answer, answer=is_answer)
        seq.add([self.im_end, *self.nl], supervised=True)


def _strip_placeholder(text: str) -> tuple[str, bool]:
    return text.replace(IMAGE_PLACEHOLDER, "").strip(), IMAGE_PLACEHOLDER in text


def _parse_conversations(conversations: Sequence[dict]) -> tuple[str | None, list[tuple[str, str]], bool]:
    """LLaVA turns -> (system prompt or None, [(role, text)], any image placeholder seen)."""
    turns, system, saw_placeholder = [], None, False
    for i, turn in enumerate(conversations):
        try:
            role, value = _ROLES[turn["from"]], str(turn["value"])
        except (KeyError, TypeError) as err:
            raise SampleRejected("bad_conversation", f"turn {i}: {err!r}") from err
        text, had = _strip_placeholder(value)
        saw_placeholder |= had
        if role == "system":
            if i != 0:
                raise SampleRejected("bad_conversation", "system turn not first")
            system = text
            continue
        expected = "user" if len(turns) % 2 == 0 else "assistant"
        if role != expected:
            raise SampleRejected("bad_conversation", f"turn {i} is {role}, expected {expected}")
        turns.append((role, text))
    if not turns:
        raise SampleRejected("empty_text", "no turns")
    return system, turns, saw_placeholder


def _build_chat(
    tok: _Tok, turns, system, image_tokens: int, num_queries: int, generation_prompt: bool
) -> _Seq:
    seq = _Seq()
    tok.turn(seq, "system", tok.encode(system if system is not None else DEFAULT_SYSTEM_PROMPT))
    for i, (role, text) in enumerate(turns):
        if i == 0 and image_tokens:
            question = tok.encode("\n" + text)  # "<image>\n{question}": the image comes first in its turn
            tok.turn(seq, "user", question, image_tokens=image_tokens)
            seq.add([QUERY_TOKEN_ID] * num_queries, supervised=False)
            tok.turn(seq, "user", question)  # the question again, after the queries
        else:
            tok.turn(seq, role, tok.encode(text))
    if generation_prompt:
        seq.add([tok.im_start], supervised=False)
        seq.add(tok.encode("assistant") + tok.nl, supervised=False)
    return seq


def encode_sample(
    tokenizer: Any,
    config: BreenConfig,
    *,
    text: str | Sequence[dict],
    image: Any = None,
    fine: np.ndarray | None = None,
    coarse: np.ndarray | None = None,
    max_length: int = DEFAULT_MAX_LENGTH,
) -> dict[str, np.ndarray]:
    """One sample -> model inputs (numpy arrays, unpadded); raises `SampleRejected` when it cannot fit.

    Returns ``input_ids`` int64 [L] (with image/query sentinels), ``labels`` int64 [L], ``image_grid``
    int64 [2] ((0, 0) without image), and when present ``pixel_values`` uint8 [3, S, S], ``fine``
    [64, clip_dim] and ``coarse`` [36, clip_dim] (dtype kept, e.g. float16).
    """
    pixel_values, (rows, cols) = None, (0, 0)
    if image is not None:
        pixel_values, (rows, cols) = letterbox(decode_image(image), config)
    n_image = rows * cols
    n_query = config.num_queries if n_image else 0
    if (fine is None) != (coarse is None):
        raise SampleRejected("bad_target", f"{'coarse' if fine is None else 'fine'} without the other target")
    if fine is not None:
        if not n_image:
            raise SampleRejected("targets_without_image", "fine/coarse given for a sample without image")
        _check_targets(config, fine, coarse)
    protected = n_image + n_query  # image + queries come before any text we may cut (plain layout)
    if protected > max_length:
        raise SampleRejected("image_exceeds_max_length", f"{n_image} image + {n_query} query > {max_length}")

    tok = _Tok(tokenizer)
    if isinstance(text, str):
        caption, _ = _strip_placeholder(text)
        if not caption:
            raise SampleRejected("empty_text", "empty caption")
        seq = _Seq()
        seq.add([IMAGE_TOKEN_ID] * n_image, supervised=False)
        seq.add([QUERY_TOKEN_ID] * n_query, supervised=False)
        seq.add(tok.encode(caption + "\n"), supervised=True, answer=True)
    else:
        system, turns, saw_placeholder = _parse_conversations(text)
        if saw_placeholder and not n_image:
            raise SampleRejected(
                "placeholder_without_image", "conversation mentions <image> but has no image"
            )
        if not any(role == "assistant" and t for role, t in turns):
            raise SampleRejected("empty_text", "no assistant answer")
        seq = _build_chat(tok, turns, system, n_image, n_query, generation_prompt=False)
        if n_query:
            protected = seq.ids.index(QUERY_TOKEN_ID) + n_query
            if protected > max_length:  # the first question sits before the queries and cannot be cut
                raise SampleRejected(
                    "question_exceeds_max_length", f"{protected} tokens up to the queries > {max_length}"
                )

    ids, labels, answer = seq.ids[:max_length], seq.labels[:max_length], seq.answer[:max_length]
    if not any(answer):
        raise SampleRejected("no_answer_after_truncation", f"{len(seq.ids)} tokens cut to {max_length}")
    out = {
        "input_ids": np.asarray(ids, dtype=np.int64),
        "labels": np.asarray(labels, dtype=np.int64),
        "image_grid": np.asarray([rows, cols], dtype=np.int64),
    }
    if pixel_values is not None:
        out["pixel_values"] = pixel_values
    if fine is not None:
        out["fine"], out["coarse"] = np.asarray(fine), np.asarray(coarse)
    return out


def encode_prompt(
    tokenizer: Any,
    config: BreenConfig,
    *,
    question: str,
    image: Any = None,
    system: str | None = None,
) -> dict[str, np.ndarray]:
    """Inference prompt in the stage-3 layout, ending with ``<|im_start|>assistant\\n`` (no truncation)."""
    pixel_values, (rows, cols) = None, (0, 0)
    if image is not None:
        pixel_values, (rows, cols) = letterbox(decode_image(image), config)
    text, _ = _strip_placeholder(question)
    n_image = rows * cols
    seq = _build_chat(
        _Tok(tokenizer),
        [("user", text)],
        system,
        n_image,
        config.num_queries if n_image else 0,
        generation_prompt=True,
    )
    out = {
        "input_ids": np.asarray(seq.ids, dtype=np.int64),
        "image_grid": np.asarray([rows, cols], dtype=np.int64),
    }
    if pixel_values is not None:
        out["pixel_values"] = pixel_values
    return out


def _check_targets(config: BreenConfig, fine: Any, coarse: Any) -> None:
    """Raise `SampleRejected` ("bad_target") unless fine/coarse are finite floats of the model's shapes."""
    want = {
        "fine": (config.num_fine_queries, config.clip_dim),
        "coarse": (config.num_coarse_queries, config.clip_dim),
    }
    for name, value in (("fine", fine), ("coarse", coarse)):
        try:
            arr = np.asarray(value)
        except Exception as err:  # ragged nested lists, objects numpy cannot hold
            raise SampleRejected("bad_target", f"{name}: not an array ({type(err).__name__})") from err
        if arr.shape != want[name]:
            raise SampleRejected("bad_target", f"{name} has shape {arr.shape}, expected {want[name]}")
        if not np.issubdtype(arr.dtype, np.floating):
            raise SampleRejected("bad_target", f"{name} has dtype {arr.dtype}, expected floats")
        if not np.isfinite(arr).all():
            bad = int((~np.isfinite(arr)).sum())
            raise SampleRejected("bad_target", f"{name} has {bad} nan/inf values of {arr.size}")


# ----------------------------------------------------------------------------- batching
def collate(
    samples: Sequence[dict[str, np.ndarray]],
    pad_token_id: int,
    pad_to_multiple_of: int | None = None,
    return_tensors: str = "pt",
) -> dict[str, Any]:
    """Right-pad and stack `encode_sample` outputs into the batch format of `breen.model`.

    ``pixel_values`` is present when any sample has an image (zeros for the others, whose image_grid is
    (0, 0)); ``fine``/``coarse``/``align_mask`` when any sample has targets (zeros and False otherwise).
    ``return_tensors``: "pt" (torch tensors) or "np".
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    b = len(samples)
    length = max(len(s["input_ids"]) for s in samples)
    if pad_to_multiple_of:
        length = -(-length // pad_to_multiple_of) * pad_to_multiple_of
    batch: dict[str, np.ndarray] = {
        "input_ids": np.full((b, length), pad_token_id, dtype=np.int64),
        "labels": np.full((b, length), IGNORE_INDEX, dtype=np.int64),
        "attention_mask": np.zeros((b, length), dtype=np.int64),
        "image_grid": np.stack([np.asarray(s["image_grid"], dtype=np.int64) for s in samples]),
    }
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        batch["input_ids"][i, :n] = s["input_ids"]
        if "labels" in s:
            batch["labels"][i, :n] = s["labels"]
        batch["attention_mask"][i, :n] = 1
    _per_sample(samples, batch)
    return _tensors(batch, return_tensors)


def pack(
    samples: Sequence[dict[str, np.ndarray]],
    pad_token_id: int,
    pad_to_multiple_of: int | None = None,
    return_tensors: str = "pt",
) -> dict[str, Any]:
    """Pack `encode_sample` outputs back to back into one row (the packed format of `breen.model`).

    ``input_ids``/``labels`` [1, T] (T = total length, rounded up to ``pad_to_multiple_of``), ``cu_seqlens``
    [n + 1] int32 sample boundaries, no ``attention_mask``. The per-sample keys (``image_grid``,
    ``pixel_values``, ``fine``/``coarse``/``align_mask``) are as in `collate`, one entry per sample. The model
    keeps attention inside each sample and restarts positions, so the losses equal those of `collate`'s
    padded batch; only the alignment tail (< ``pad_to_multiple_of`` tokens) is padding.
    """
    if not samples:
        raise ValueError("pack needs at least one sample")
    lengths = [len(s["input_ids"]) for s in samples]
    cu = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    total = int(cu[-1])
    if pad_to_multiple_of:
        total = -(-total // pad_to_multiple_of) * pad_to_multiple_of
    batch: dict[str, np.ndarray] = {
        "input_ids": np.full((1, total), pad_token_id, dtype=np.int64),
        "labels": np.full((1, total), IGNORE_INDEX, dtype=np.int64),
        "cu_seqlens": cu,
        "image_grid": np.stack([np.asarray(s["image_grid"], dtype=np.int64) for s in samples]),
    }
    for s, lo, hi in zip(samples, cu[:-1], cu[1:], strict=True):
        batch["input_ids"][0, lo:hi] = s["input_ids"]
        if "labels" in s:
            batch["labels"][0, lo:hi] = s["labels"]
    _per_sample(samples, batch)
    return _tensors(batch, return_tensors)


def _per_sample(samples: Sequence[dict[str, np.ndarray]], batch: dict[str, np.ndarray]) -> None:
    """Add the per-sample image and target arrays of `collate` / `pack` to ``batch``."""
    b = len(samples)
    with_image = [s for s in samples if s.get("pixel_values") is not None]
    if with_image:
        batch["pixel_values"] = np.zeros((b, *with_image[0]["pixel_values"].shape), dtype=np.uint8)
        for i, s in enumerate(samples):
            if s.get("pixel_values") is not None:
                batch["pixel_values"][i] = s["pixel_values"]
    with_targets = [s for s in samples if s.get("fine") is not None]
    if with_targets:
        ref = with_targets[0]
        batch["fine"] = np.zeros((b, *ref["fine"].shape), dtype=ref["fine"].dtype)
        batch["coarse"] = np.zeros((b, *ref["coarse"].shape), dtype=ref["coarse"].dtype)
        batch["align_mask"] = np.zeros(b, dtype=bool)
        for i, s in enumerate(samples):
            if s.get("fine") is not None:
                batch["fine"][i], batch["coarse"][i], batch["align_mask"][i] = s["fine"], s["coarse"], True


def _tensors(batch: dict[str, np.ndarray], return_tensors: str) -> dict[str, Any]:
    if return_tensors == "np":
        return batch
    if return_tensors != "pt":
        raise ValueError(f"return_tensors must be 'pt' or 'np', got {return_tensors!r}")
    import torch

    return {k: torch.from_numpy(v) for k, v in batch.items()}
