"""Image files of the synthetic corpus: procedurally drawn pictures, their encoding (fixed settings, no
timestamps), the decompression-bomb PNG and the HTML page saved as an image."""

from __future__ import annotations

import functools
import io
import struct
import zlib

import numpy as np
from PIL import Image, ImageDraw

# 1.6 Gpx: above OpenCV's CV_IO_MAX_IMAGE_PIXELS (2**30), so img2dataset's cv2.imdecode refuses it
# instead of allocating ~4.8 GB (a 30000 px side would still be decoded), and above Pillow's
# 2 * MAX_IMAGE_PIXELS, so PIL.Image.open raises DecompressionBombError.
BOMB_SIDE = 40_000

NOT_IMAGE_HTML = (
    "<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>Page not found</title></head>\n"
    "<body><h1>Oops! This image is no longer available.</h1>\n"
    "<p>The page you requested has moved. <a href='/'>Return to the gallery</a>.</p></body></html>\n"
)


def draw(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A procedural RGB picture: a coloured gradient with low-frequency noise, random shapes, grain."""
    sw, sh = max(2, width // 8), max(2, height // 8)
    c0 = rng.integers(0, 256, 3).astype(np.float32)
    c1 = rng.integers(0, 256, 3).astype(np.float32)
    theta = rng.uniform(0, 2 * np.pi)
    yy, xx = np.mgrid[0:sh, 0:sw].astype(np.float32)
    t = xx / sw * np.cos(theta) + yy / sh * np.sin(theta)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    base = c0 * (1 - t[..., None]) + c1 * t[..., None]
    base += rng.normal(0, 18, (sh, sw, 3)).astype(np.float32)
    img = Image.fromarray(np.clip(base, 0, 255).astype(np.uint8), "RGB").resize(
        (width, height), Image.Resampling.BILINEAR
    )
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(4, 12))):
        x0, x1 = sorted(rng.integers(-width // 4, width + width // 4, 2).tolist())
        y0, y1 = sorted(rng.integers(-height // 4, height + height // 4, 2).tolist())
        x1, y1 = max(x1, x0 + 1), max(y1, y0 + 1)
        color = tuple(int(v) for v in rng.integers(0, 256, 3))
        kind = int(rng.integers(3))
        if kind == 0:
            draw.rectangle((x0, y0, x1, y1), fill=color)
        elif kind == 1:
            draw.ellipse((x0, y0, x1, y1), fill=color)
        else:
            draw.line(
                (x0, y0, x1, y1),
                fill=color,
                width=max(1, int(rng.integers(1, 1 + min(width, height) // 20 + 1))),
            )
    if rng.random() < 0.3:  # film grain on some images
        grain = rng.integers(-10, 11, (height, width, 3), dtype=np.int16)
        arr = np.clip(np.asarray(img, dtype=np.int16) + grain, 0, 255).astype(np.uint8)
        img = Image.fromarray(arr, "RGB")
    return img


def encode(img: Image.Image, fmt: str, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        img.save(buf, "JPEG", quality=quality, optimize=False, progressive=False)
    elif fmt == "PNG":
        img.save(buf, "PNG", compress_level=6)
    elif fmt == "WEBP":
        img.save(buf, "WEBP", quality=quality, method=4)
    else:
        raise ValueError(f"unknown image format {fmt!r}")
    return buf.getvalue()


EXT = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp"}


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return (
        struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    )


@functools.lru_cache(maxsize=1)  # ~0.5 s to build; the bytes never change
def bomb_png(side: int = BOMB_SIDE) -> bytes:
    """A valid 1-bit palette PNG of side x side px, all zeros (~190 KB on disk, 200 MB packed, 1.6 Gpx)."""
    row = bytes(1 + (side + 7) // 8)  # filter byte 0 + packed pixels
    comp = zlib.compressobj(9)
    chunks = []
    block = row * 1000
    for start in range(0, side, 1000):
        chunks.append(comp.compress(block if start + 1000 <= side else row * (side - start)))
    chunks.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 3, 0, 0, 0)  # bit depth 1, colour type 3 (palette)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"PLTE", bytes([250, 250, 250, 20, 20, 20]))
        + _png_chunk(b"IDAT", b"".join(chunks))
        + _png_chunk(b"IEND", b"")
    )


def normal_size(rng: np.random.Generator) -> tuple[int, int]:
    """Long side 400..1400, short side >= 256, aspect ratio 1..2.5, landscape or portrait."""
    long_side = int(rng.integers(400, 1401))
    aspect = float(rng.uniform(1.0, min(2.5, long_side / 256)))
    short_side = max(256, round(long_side / aspect))
    return (long_side, short_side) if rng.random() < 0.6 else (short_side, long_side)
