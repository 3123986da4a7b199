"""CLIP teacher-target math: letterbox preprocessing and pooling of the last-block patch grid.

The targets BREEN aligns its learnable queries to (reference §1.5):
  image -> long side resized to 336, short side rounded up to a multiple of 14, centred on a
  336x336 canvas of the CLIP mean colour -> CLIP ViT-L/14-336 last transformer block output
  (before the final LayerNorm, CLS dropped): [D=1024, 24, 24] -> average-pooled with
  kernel = stride = 3 (`fine`, 8x8 = 64 vectors) and 4 (`coarse`, 6x6 = 36 vectors), raster order.

Plain PyTorch/PIL; the data pipeline (`pipelines/teacher.py`) runs this once and caches the result,
so training never loads CLIP.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# open_clip.constants.OPENAI_DATASET_MEAN / STD (copied as numbers so `import breen` needs no open_clip).
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESS_VERSION = "letterbox-336-mean-bicubic-v1"
FINE_GRID = 8  # 24 / 3
COARSE_GRID = 6  # 24 / 4


def letterbox_size(width: int, height: int, size: int = 336, multiple: int = 14) -> tuple[int, int]:
    """Resized (width, height): long side = size, short side scaled and rounded up to `multiple`."""
    if width >= height:
        short = math.ceil(size * height / width / multiple) * multiple
        return size, min(size, max(multiple, short))
    short = math.ceil(size * width / height / multiple) * multiple
    return min(size, max(multiple, short)), size


def letterbox(img: Image.Image, size: int = 336, multiple: int = 14) -> np.ndarray:
    """PIL image -> normalised float32 [3, size, size], image centred on a CLIP-mean canvas."""
    img = img.convert("RGB")
    w, h = letterbox_size(img.width, img.height, size, multiple)
    img = img.resize((w, h), Image.Resampling.BICUBIC)
    mean = np.asarray(CLIP_MEAN, np.float32)
    canvas = np.empty((size, size, 3), np.float32)
    canvas[:] = mean  # the mean colour normalises to exactly 0
    top, left = (size - h) // 2, (size - w) // 2
    canvas[top : top + h, left : left + w] = np.asarray(img, np.float32) / 255.0
    canvas = (canvas - mean) / np.asarray(CLIP_STD, np.float32)
    return np.ascontiguousarray(canvas.transpose(2, 0, 1))  # [H, W, 3] -> [3, H, W]


def pool_targets(grid: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch grid [B, D, 24, 24] -> (fine [B, 64, D], coarse [B, 36, D]), raster order."""
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
