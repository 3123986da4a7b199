"""The teacher's canvas (`breen.teacher`): pixel for pixel the canvas of the released BREEN code, and the
normalised pixels of Hugging Face's CLIPImageProcessor on it; the previous rule stays available by name."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image
from transformers import CLIPImageProcessor

from breen import teacher
from breen.settings import ConfigError
from pipelines.config import PrepareConfig, validate

# (width, height): even and odd numbers of padding patches, both orientations, square, tiny images,
# extreme aspect ratios, sizes whose rounding lands exactly on a multiple of 14.
SIZES = [(800, 500), (500, 800), (640, 480), (480, 640), (672, 448), (448, 672), (600, 337), (337, 600),
         (300, 300), (1, 1), (3, 2), (2, 3), (5, 400), (400, 5), (2000, 30), (30, 2000), (700, 350),
         (672, 211), (1000, 999), (999, 1000), (336, 14), (13, 336)]  # fmt: skip


def released_formula(img: Image.Image, size: int = 336, patch: int = 14) -> Image.Image:
    """The CLIP-side canvas of the released code's dataset class, written from its formula:
    `compute_basehw` (long side = size; short side = ceil(size * short / long / patch) patches; the
    padding before the image = (size // patch - patches) // 2 patches) and `resize2require` (a canvas of
    `tuple(int(x * 255) for x in image_mean)`, the resized image pasted after that padding); no canvas
    when the resized image is square. `Image.resize` with its default filter (bicubic)."""
    width, height = img.size
    if width > height:
        patches = math.ceil(size * height / width / patch)
        new_w, new_h = size, patches * patch
    else:
        patches = math.ceil(size * width / height / patch)
        new_w, new_h = patches * patch, size
    before = (size // patch - patches) // 2 * patch
    assert (size - before - patches * patch) % patch == 0
    resized = img.resize((new_w, new_h))
    if new_w == new_h:
        return resized
    canvas = Image.new(resized.mode, (size, size), tuple(int(x * 255) for x in teacher.CLIP_MEAN))
    canvas.paste(resized, (0, before) if width > height else (before, 0))
    return canvas


def photo(w: int, h: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), np.uint8))


@pytest.mark.parametrize(("w", "h"), SIZES)
def test_canvas_equals_the_released_code_pixel_for_pixel(w, h):
    img = photo(w, h, seed=w * 7 + h)
    ours = np.asarray(teacher.released_canvas(img))
    ref = np.asarray(released_formula(img))
    assert ours.shape == ref.shape == (336, 336, 3)
    assert np.array_equal(ours, ref), f"{w}x{h}: {np.argwhere(ours != ref)[:3].tolist()}"


def test_sizes_cover_odd_and_even_padding_in_both_orientations():
    seen = set()
    for w, h in SIZES:
        tw, th = teacher.letterbox_size(w, h, 336, 14)
        if tw != th:
            seen.add((tw > th, (24 - min(tw, th) // 14) % 2))  # (landscape, odd padding patches)
    assert seen == {(True, 0), (True, 1), (False, 0), (False, 1)}


@pytest.mark.parametrize(("size", "multiple"), [(336, 14), (672, 28)])  # the teacher's and the model's
def test_resize_rule_equals_the_released_float_formula(size, multiple):
    # breen.geometry.letterbox_size (integer arithmetic) is the released code's float formula, exactly
    for w in range(1, 700):
        for h in range(1, 700, 7):
            patches = math.ceil(size * min(w, h) / max(w, h) / multiple)
            short = min(size, max(multiple, patches * multiple))
            want = (size, short) if w >= h else (short, size)
            assert teacher.letterbox_size(w, h, size, multiple) == want, (w, h)


def test_fill_colour_and_the_odd_padding_case():
    assert teacher.fill_colour() == (122, 116, 104)
    canvas = np.asarray(teacher.released_canvas(photo(800, 500, seed=0)))  # 336x210: 15 patches, 9 to pad
    assert (canvas[:56] == (122, 116, 104)).all() and (
        canvas[266:] == (122, 116, 104)
    ).all()  # 4 above, 5 below
    assert not (canvas[56] == (122, 116, 104)).all(axis=-1).all()


@pytest.mark.parametrize(("w", "h"), [(800, 500), (480, 640), (300, 300), (2000, 30)])
def test_normalised_pixels_equal_clip_image_processor(w, h):
    processor = CLIPImageProcessor(size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336},
                                   image_mean=list(teacher.CLIP_MEAN), image_std=list(teacher.CLIP_STD))  # fmt: skip
    img = photo(w, h, seed=1)
    ref = processor.preprocess(released_formula(img), return_tensors="np")["pixel_values"][0]
    ours = teacher.letterbox(img)
    assert ours.dtype == np.float32 and ours.shape == (3, 336, 336)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-6)


def test_the_previous_rule_is_kept_by_name():
    img = photo(800, 500, seed=2)
    v1 = teacher.letterbox(img, teacher.PREPROCESS_CENTRED_V1)
    assert np.abs(v1[:, :63]).max() < 1e-6  # centred: 63 px of exact-mean canvas above (126 / 2)
    assert not np.allclose(v1, teacher.letterbox(img))  # half a patch lower than the released canvas
    with pytest.raises(ValueError, match="unknown teacher preprocessing"):
        teacher.letterbox(img, "letterbox-nope")


def test_config_names_the_field_of_an_unknown_rule():
    cfg = PrepareConfig()
    cfg.teacher.random_init_seed = 0
    cfg.teacher.preprocess = "letterbox-nope"
    with pytest.raises(ConfigError, match=r"teacher\.preprocess"):
        validate(cfg)
