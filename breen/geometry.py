"""Image geometry shared by the model and the CLIP teacher, with one owner: the CLIP normalisation and the
letterbox resize rule.

Both sides resize an image the same way, with different numbers: the model (`BreenConfig.image_token_grid`,
`breen.data.letterbox`) to 672 px rounded to 28, the teacher (`breen.teacher`) to 336 px rounded to 14.
This module imports nothing, so `breen.teacher` stays free of torch and transformers (pipelines import it
at ``--help`` time) while `breen.config` imports it too; exports carry it as remote code
(`breen.hf.REMOTE_MODULES`).
"""

from __future__ import annotations

# OpenAI CLIP normalisation (open_clip.constants.OPENAI_DATASET_MEAN / STD, copied as numbers so that
# `import breen` needs no open_clip); the mean colour also fills the letterbox canvas.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def letterbox_size(width: int, height: int, size: int, multiple: int) -> tuple[int, int]:
    """Resized (width, height): the long side becomes `size`; the short side is scaled proportionally and
    rounded *up* to a multiple of `multiple`, at least one multiple and at most `size`.

    Exact integer arithmetic for ceil(size * short / long / multiple), the released code's float formula
    (the two agree on every image up to 5000 x 5000 px; `tests/test_teacher_canvas.py` checks a range).
    """
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    long_side, short_side = max(width, height), min(width, height)
    short = -(-short_side * size // (long_side * multiple)) * multiple  # ceil(short*size/long / multiple) * m
    short = min(size, max(multiple, short))
    return (size, short) if width >= height else (short, size)
