"""CLIP teacher-target math: letterbox preprocessing and pooling of the last-block patch grid.

The targets BREEN aligns its learnable queries to (reference §1.5):
  image -> long side resized to 336 (bicubic), short side scaled and rounded up to a multiple of 14
  (the short side gains up to 13 px: a 1.59:1 photo, 336x211, becomes 336x224, stretched 6.2%), placed
  on a 336x336 canvas (`PREPROCESS_RELEASED`) -> CLIP ViT-L/14-336 last transformer block output
  (before the final LayerNorm, CLS dropped): [D=1024, 24, 24] -> average-pooled with
  kernel = stride = 3 (`fine`, 8x8 = 64 vectors) and 4 (`coarse`, 6x6 = 36 vectors), raster order.

Plain PyTorch/PIL (torch imported where it is used: the config validation reads the canvas rules without
it); the CLIP normalisation and the resize rule come from `breen.geometry`, shared with the model. The data pipeline (`pipelines/teacher.py`) runs this once and caches the result,
so training never loads CLIP.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from breen.geometry import CLIP_MEAN, CLIP_STD, letterbox_size

if TYPE_CHECKING:
    import torch

# The canvas rules, by the version string `breen.preprocess` records in every training shard.
#   released (default): as the released BREEN code (the CLIP-side `compute_basehw`/`resize2require` of its
#     dataset class): the padding before the image is rounded down to whole 14-px patches, the canvas
#     filled with int(255 * mean) = (122, 116, 104), which normalises to about (-0.011, -0.011, -0.001);
#     pixels normalised as Hugging Face's CLIPImageProcessor does (x * (1/255) in float64, then float32).
#   centred-v1: the image centred to the pixel ((336 - h) // 2: half a patch off the released code when the
#     number of padding patches is odd) on a float canvas of exactly the mean colour (normalises to 0);
#     kept for datasets made with it.
PREPROCESS_RELEASED = "letterbox-336-released-v2"
PREPROCESS_CENTRED_V1 = "letterbox-336-mean-bicubic-v1"
PREPROCESS_RULES = (PREPROCESS_RELEASED, PREPROCESS_CENTRED_V1)
PREPROCESS_VERSION = PREPROCESS_RELEASED  # the default
FINE_GRID = 8  # 24 / 3
COARSE_GRID = 6  # 24 / 4


def fill_colour(mean: tuple[float, ...] = CLIP_MEAN) -> tuple[int, ...]:
    """The released code's canvas colour: `tuple(int(x * 255) for x in image_mean)`."""
    return tuple(int(x * 255) for x in mean)


def released_canvas(img: Image.Image, size: int = 336, multiple: int = 14) -> Image.Image:
    """RGB image -> the released code's uint8 size x size canvas: resized by `letterbox_size`
    (`breen.geometry`), placed after a padding of whole `multiple`-px patches, (size / multiple - patches)
    // 2 of them."""
    img = img.convert("RGB")
    w, h = letterbox_size(img.width, img.height, size, multiple)
    resized = img.resize((w, h), Image.Resampling.BICUBIC)
    if w == h:
        return resized
    pad = (size // multiple - min(w, h) // multiple) // 2 * multiple  # whole patches before the image
    canvas = Image.new("RGB", (size, size), fill_colour())
    canvas.paste(resized, (0, pad) if w > h else (pad, 0))
    return canvas


def letterbox(
    img: Image.Image, preprocess: str = PREPROCESS_VERSION, size: int = 336, multiple: int = 14
) -> np.ndarray:
    """PIL image -> normalised float32 [3, size, size] by the canvas rule `preprocess` (`PREPROCESS_RULES`)."""
    mean, std = np.asarray(CLIP_MEAN, np.float32), np.asarray(CLIP_STD, np.float32)
    if preprocess == PREPROCESS_RELEASED:
        rgb = np.asarray(released_canvas(img, size, multiple))
        canvas = (rgb.astype(np.float64) * (1 / 255)).astype(np.float32)  # as CLIPImageProcessor.rescale
    elif preprocess == PREPROCESS_CENTRED_V1:
        img = img.convert("RGB")
        w, h = letterbox_size(img.width, img.height, size, multiple)
        img = img.resize((w, h), Image.Resampling.BICUBIC)
        canvas = np.empty((size, size, 3), np.float32)
        canvas[:] = mean  # the mean colour normalises to exactly 0
        top, left = (size - h) // 2, (size - w) // 2
        canvas[top : top + h, left : left + w] = np.asarray(img, np.float32) / 255.0
    else:
        raise ValueError(
            f"unknown teacher preprocessing {preprocess!r} (known: {', '.join(PREPROCESS_RULES)})"
        )
    canvas = (canvas - mean) / std
    return np.ascontiguousarray(canvas.transpose(2, 0, 1))  # [H, W, 3] -> [3, H, W]


def pool_targets(grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch grid [B, D, 24, 24] -> (fine [B, 64, D], coarse [B, 36, D]), raster order."""
    import torch.nn.functional as F

    gh, gw = grid.shape[-2:]
    assert gh == gw == 24, f"expected a 24x24 patch grid, got {gh}x{gw}"
    fine = F.avg_pool2d(grid.float(), kernel_size=3, stride=3)  # [B, D, 8, 8]
    coarse = F.avg_pool2d(grid.float(), kernel_size=4, stride=4)  # [B, D, 6, 6]
    fine = fine.flatten(2).transpose(1, 2)  # [B, D, 64] -> [B, 64, D]
    coarse = coarse.flatten(2).transpose(1, 2)  # [B, D, 36] -> [B, 36, D]
    return fine, coarse


def last_block_grid(visual: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
    """open_clip VisionTransformer: output of the last block before the final LayerNorm, CLS dropped.

    pixels [B, 3, 336, 336] -> [B, D, 24, 24].
    """
    out = visual.forward_intermediates(pixels, indices=1, intermediates_only=True, output_fmt="NCHW")
    return out["image_intermediates"][-1]
