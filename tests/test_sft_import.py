"""pipelines.sft_import: SFT images are stored as a viewer sees them (EXIF orientation, 16-bit, alpha on
white) and files outside the image allowlist are refused from their header. The whole SFT chain with bad
records: test_reliability_badinput.py; its planning and preflight: test_graph.py, test_preflight.py."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from tests.badinput import _png16, encode, on_white, picture


def test_sft_images_are_normalised_like_downloads(tmp_path):
    """SFT import stores what a viewer sees: EXIF orientation applied, 16-bit scaled, alpha on white."""
    from pipelines.sft_import import load_image

    pic = picture(1, 400, 300)
    exif = Image.Exif()
    exif[0x0112] = 6
    (tmp_path / "rot.jpg").write_bytes(encode(pic, "JPEG", quality=95, exif=exif.tobytes()))
    grad = np.linspace(0, 65535, 300 * 400).reshape(300, 400).astype(np.uint16)
    (tmp_path / "g16.png").write_bytes(_png16(grad))
    rgba = picture(2).convert("RGBA")
    rgba.putalpha(100)
    (tmp_path / "a.png").write_bytes(encode(rgba, "PNG"))
    expected = {
        "rot.jpg": pic.transpose(Image.Transpose.ROTATE_270),
        "g16.png": Image.fromarray(np.rint(grad / 257).astype(np.uint8)),
        "a.png": on_white(rgba),
    }
    for name, ref in expected.items():
        data, w, h = load_image(tmp_path, name, 672, 10**8)
        got = Image.open(io.BytesIO(data))
        assert got.size == (w, h) == ref.size, name
        diff = np.abs(np.asarray(got.convert("RGB"), np.float32) - np.asarray(ref.convert("RGB"), np.float32))
        assert diff.mean() < 3, (name, diff.mean())


def test_sft_images_in_formats_outside_the_allowlist_are_refused_before_decoding(tmp_path, monkeypatch):
    """An EPS in an SFT image folder is refused from its header: Pillow would render it with Ghostscript."""
    from PIL import EpsImagePlugin

    from pipelines.sft_import import load_image

    ran: list[str] = []
    monkeypatch.setattr(EpsImagePlugin, "Ghostscript", lambda *a, **k: ran.append("gs") or None)
    (tmp_path / "x.eps").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 300 200\n%%EndComments\n"
                                     b"showpage\n%%EOF\n")  # fmt: skip
    (tmp_path / "x.tga").write_bytes(encode(picture(1), "TGA"))
    for name in ("x.eps", "x.tga"):
        with pytest.raises(ValueError, match="not a decodable image: not JPEG/"):
            load_image(tmp_path, name, 672, 10**8)
    assert not ran
