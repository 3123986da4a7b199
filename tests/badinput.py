"""Bad-input corpus and a hostile HTTP server for the reliability tests (`tests/test_reliability_*.py`).

`bad_cases(server)` returns one `BadCase` per *kind* of bad input: broken payloads, awkward image
formats, hostile captions, duplicate rows, malformed URLs, refused addresses and hostile server
behaviour. A case contributes one or more URL-list rows and says which outcomes are correct: a set of
`(step, reason)` pairs (`KEPT` for rows that must survive), a regex the rejection detail must match,
and for kept rows a check of what was stored (e.g. an EXIF-rotated image is stored upright).
`FILE_CASES` are file-level problems (a URL list without a `url` column, ...): those must fail fast
with a message naming the file and the field.

`HostileServer` serves the payloads from 127.0.0.1 only and misbehaves on request: status codes,
redirect loops and chains, redirects to refused addresses, trickled bytes, never answering, oversized
and lying responses.

No case makes anything resolve a host name (this machine's resolver sits at a private address and
tests must not send traffic anywhere but 127.0.0.1): address cases use IP literals, refused before
any connection; metadata host names are refused by name. `tripwire()` turns any connection to a
non-public address other than 127.0.0.1 (and any lookup of the corpus' host names) into an error and
a log line, so a guard regression cannot reach the network and is reported.

    with HostileServer() as server:
        cases = bad_cases(server)
        write_url_list(cases, tmp / "urls.parquet")
"""

from __future__ import annotations

import contextlib
import gzip
import http.server
import io
import ipaddress
import json
import re
import socket
import struct
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from pipelines.synthetic import NOT_IMAGE_HTML, LocalServer, bomb_png, closed_port_url, draw

KEPT = ("kept", None)
D, C, F = "download", "captions", "filter"  # steps that reject rows
TINY = 2 * 1024 * 1024  # max_response_bytes used with this corpus (the tiff is ~700 KB)


@dataclass(frozen=True)
class Fate:
    """What the pipeline did with one input row."""

    step: str  # "kept" or the step that rejected it
    reason: str | None
    detail: str | None = None
    row: dict[str, Any] | None = field(default=None, compare=False)  # the final kept row


@dataclass
class BadCase:
    kind: str
    group: str  # payload | image | caption | duplicate | url | address | server
    rows: list[dict[str, Any]]  # URL-list rows: url, caption (str, bytes or None)
    expect: set[tuple[str, str | None]]  # correct outcomes for every row
    detail: str | None = None  # regex every rejection detail must match (case-insensitive)
    # Extra check over all rows' fates; returns a problem description or None.
    check: Callable[[list[Fate]], str | None] | None = None
    note: str = ""

    def verdict(self, fates: list[Fate]) -> str | None:
        """None when every row ended as expected, else what went wrong."""
        for f in fates:
            if (f.step, f.reason) not in self.expect:
                return f"unexpected outcome {f.step}/{f.reason} ({f.detail!r}); expected {sorted(self.expect, key=str)}"
            if f.step != "kept":
                if not f.detail or not f.detail.strip():
                    return f"rejected by {f.step} with reason {f.reason} but no detail"
                if self.detail and not re.search(self.detail, f.detail, re.IGNORECASE):
                    return f"detail {f.detail!r} does not match {self.detail!r}"
        return self.check(fates) if self.check else None


# ----------------------------------------------------------------------------- payloads


def picture(seed: int, w: int = 320, h: int = 240) -> Image.Image:
    """A distinct procedural RGB picture per seed (distinct perceptual hashes: no accidental near dups)."""
    return draw(np.random.default_rng([7007, seed]), w, h)


def encode(img: Image.Image, fmt: str, **kw: Any) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def on_white(img: Image.Image) -> Image.Image:
    rgba = img.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")


def looks_like(reference: Image.Image, tol: float = 14.0) -> Callable[[list[Fate]], str | None]:
    """Check: every kept row stores `reference` (size and pixels, within JPEG error)."""
    ref = reference.convert("RGB")

    def check(fates: list[Fate]) -> str | None:
        for f in fates:
            if f.row is None:
                continue
            got = Image.open(io.BytesIO(f.row["image"])).convert("RGB")
            if got.size != ref.size:
                return f"stored size {got.size} != expected {ref.size}"
            diff = np.abs(np.asarray(got, np.float32) - np.asarray(ref, np.float32)).mean()
            if diff > tol:
                return f"stored pixels differ from the expected picture (mean abs diff {diff:.1f} > {tol})"
        return None

    return check


def _jpeg_with_size(width: int, height: int) -> bytes:
    """A small valid JPEG whose SOF header is patched to declare width x height."""
    data = bytearray(encode(picture(900, 16, 16), "JPEG"))
    i = 2
    while i < len(data):
        marker, length = data[i + 1], struct.unpack(">H", data[i + 2 : i + 4])[0]
        if marker in (0xC0, 0xC2):  # SOF0 / SOF2: precision(1) height(2) width(2)
            data[i + 5 : i + 9] = struct.pack(">HH", height, width)
            return bytes(data)
        i += 2 + length
    raise AssertionError("no SOF marker")


def _gif_with_screen(width: int, height: int) -> bytes:
    """A GIF whose logical screen is width x height with a single 1x1 frame."""
    data = bytearray(encode(Image.new("P", (1, 1)), "GIF"))
    data[6:10] = struct.pack("<HH", width, height)
    return bytes(data)


def _png16(arr: np.ndarray) -> bytes:
    """A 16-bit PNG from a uint16 array (grey [H, W], RGB [H, W, 3] or RGBA [H, W, 4]), written by hand."""
    h, w = arr.shape[:2]
    channels = 1 if arr.ndim == 2 else arr.shape[2]
    colour = {1: 0, 3: 2, 4: 6}[channels]
    raw = b"".join(b"\x00" + arr[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body))
            + kind
            + body
            + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", w, h, 16, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")
    )


def _frames(seed: int) -> list[Image.Image]:
    return [picture(seed + k) for k in range(3)]


def _animated(fmt: str, seed: int, **kw: Any) -> tuple[bytes, Image.Image]:
    frames = _frames(seed)
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], **kw)
    with Image.open(io.BytesIO(data)) as im:
        first = im.convert("RGB")  # what a viewer shows first (GIF: after palette quantisation)
    return data, first


def image_payloads() -> dict[str, tuple[bytes, str, set, str | None, Callable | None, str]]:
    """kind -> (bytes, content type, expected outcomes, detail regex, kept check, note)."""
    out: dict[str, tuple[bytes, str, set, str | None, Callable | None, str]] = {}
    dec = {(D, "decode_error")}
    # --- broken payloads: the download succeeds, the decode guard or the decoder refuses them
    rng = np.random.default_rng(1)
    jpeg = encode(picture(1, 640, 480), "JPEG", quality=90)
    png = encode(picture(2, 320, 240), "PNG")
    out["corrupt_random_bytes"] = (rng.bytes(5000), "image/jpeg", dec, "not a decodable image", None, "")
    out["corrupt_after_jpeg_marker"] = (
        b"\xff\xd8\xff\xe0" + rng.bytes(5000),
        "image/jpeg",
        dec,
        None,
        None,
        "",
    )
    out["truncated_jpeg"] = (jpeg[: len(jpeg) // 2], "image/jpeg", dec, None, None, "half of a valid JPEG")
    out["truncated_png"] = (png[: len(png) * 6 // 10], "image/png", dec, None, None, "60 % of a valid PNG")
    out["zero_byte"] = (b"", "image/jpeg", dec, "empty", None, "")
    out["html_served_as_jpeg"] = (
        NOT_IMAGE_HTML.encode(),
        "image/jpeg",
        dec,
        "not a decodable image",
        None,
        "",
    )
    out["json_served_as_png"] = (json.dumps({"error": "gone"}).encode(), "image/png", dec, None, None, "")
    # Formats Pillow could open but the decode guard never hands to a decoder: EPS (Pillow renders it
    # with Ghostscript) and exotic rasters (TGA here); refused from the first bytes, no decoder runs.
    out["eps_served_as_jpeg"] = (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 300 200\n%%EndComments\n"
                                 b"newpath 0 0 moveto 300 200 lineto stroke showpage\n%%EOF\n", "image/jpeg", dec,
                                 r"not a decodable image: not JPEG/", None, "Ghostscript never runs")  # fmt: skip
    out["tga_image"] = (encode(picture(3, 320, 240), "TGA"), "image/x-tga", dec, r"not a decodable image: not JPEG/",
                        None, "exotic raster format")  # fmt: skip
    out["svg_image"] = (b'<svg xmlns="http://www.w3.org/2000/svg" width="300" height="200"><rect width="300" '
                        b'height="200" fill="red"/></svg>', "image/svg+xml", dec, None, None,
                        "vector image: no raster decoder")  # fmt: skip
    # --- decompression bombs: refused from the header, before any pixel is decoded
    bomb = "decompression bomb"
    out["bomb_png_40000x40000"] = (bomb_png(), "image/png", dec, bomb, None, "190 KB file, 1.6 Gpx declared")
    out["bomb_jpeg_header_65000x65000"] = (_jpeg_with_size(65000, 65000), "image/jpeg", dec, bomb, None, "")
    out["bomb_gif_screen_65535x65535"] = (_gif_with_screen(65535, 65535), "image/gif", dec, bomb, None, "")
    out["over_pixel_limit_8000x6000"] = (encode(Image.new("1", (8000, 6000)), "PNG"), "image/png", dec, bomb,
                                         None, "48 Mpx > filter.max_pixels 40 Mpx")  # fmt: skip
    return out


def format_payloads() -> dict[str, tuple[bytes, str, set, str | None, Callable | None, str]]:
    """Valid but awkward images: kept with the pixels a viewer sees, or rejected by a size rule."""
    out: dict[str, tuple[bytes, str, set, str | None, Callable | None, str]] = {}
    seed = iter(range(100, 1000, 10))
    # Multi-frame: the first frame is what is stored (what a viewer shows before animating).
    for kind, fmt, kw in [("animated_gif", "GIF", {"duration": 100, "loop": 0}),
                          ("animated_png", "PNG", {"duration": 100}),
                          ("animated_webp", "WEBP", {"duration": 100, "lossless": True}),
                          ("multipage_tiff", "TIFF", {})]:  # fmt: skip
        data, first = _animated(fmt, next(seed), **kw)
        ctype = {"GIF": "image/gif", "PNG": "image/png", "WEBP": "image/webp", "TIFF": "image/tiff"}[fmt]
        out[kind] = (data, ctype, {KEPT}, None, looks_like(first), "first frame kept")
    pic = picture(next(seed))
    cmyk = Image.open(io.BytesIO(encode(pic.convert("CMYK"), "JPEG", quality=95)))
    out["cmyk_jpeg"] = (encode(pic.convert("CMYK"), "JPEG", quality=95), "image/jpeg", {KEPT}, None,
                        looks_like(cmyk.convert("RGB")), "stored as RGB")  # fmt: skip
    # 16-bit: stored with the right 8-bit values (OpenCV alone clips 16-bit samples to 255).
    grad = np.linspace(0, 65535, 240 * 320).reshape(240, 320).astype(np.uint16)
    out["grey_16bit_png"] = (_png16(grad), "image/png", {KEPT}, None,
                             looks_like(Image.fromarray(np.rint(grad / 257).astype(np.uint8), "L")), "")  # fmt: skip
    rgb = np.asarray(picture(next(seed)), np.uint16) * 257
    out["rgb_16bit_png"] = (_png16(rgb), "image/png", {KEPT}, None,
                            looks_like(Image.fromarray((rgb // 257).astype(np.uint8))), "48-bit RGB")  # fmt: skip
    alpha = np.tile(np.linspace(0, 65535, 320), (240, 1)).astype(np.uint16)
    rgba16 = np.dstack([rgb, alpha])
    ref = on_white(Image.fromarray(np.dstack([rgb // 257, alpha // 257]).astype(np.uint8), "RGBA"))
    out["rgba_16bit_png"] = (_png16(rgba16), "image/png", {KEPT}, None, looks_like(ref), "alpha on white")
    # Palette, transparency: composited on white.
    pic = picture(next(seed))
    pal = pic.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    out["palette_png"] = (encode(pal, "PNG"), "image/png", {KEPT}, None, looks_like(pal.convert("RGB")), "")
    pal_t = pic.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
    tdata = encode(pal_t, "PNG", transparency=0)
    out["palette_transparent_png"] = (tdata, "image/png", {KEPT}, None,
                                      looks_like(on_white(Image.open(io.BytesIO(tdata)))), "")  # fmt: skip
    rgba = picture(next(seed)).convert("RGBA")
    rgba.putalpha(Image.fromarray(np.tile(np.linspace(0, 255, 320), (240, 1)).astype(np.uint8)))
    out["rgba_png"] = (encode(rgba, "PNG"), "image/png", {KEPT}, None, looks_like(on_white(rgba)), "")
    la = picture(next(seed)).convert("LA")
    la.putalpha(128)
    out["grey_alpha_png"] = (encode(la, "PNG"), "image/png", {KEPT}, None, looks_like(on_white(la)), "")
    webp_a = picture(next(seed)).convert("RGBA")
    webp_a.putalpha(Image.fromarray(np.tile(np.linspace(255, 0, 240), (320, 1)).T.astype(np.uint8)))
    out["webp_alpha"] = (encode(webp_a, "WEBP", lossless=True), "image/webp", {KEPT}, None,
                         looks_like(on_white(webp_a)), "")  # fmt: skip
    # EXIF orientation: stored upright (as browsers display it), without the tag.
    for kind, tag, op in [("exif_rotated_90", 6, Image.Transpose.ROTATE_270),
                          ("exif_mirrored", 2, Image.Transpose.FLIP_LEFT_RIGHT)]:  # fmt: skip
        pic = picture(next(seed), 400, 300)
        exif = Image.Exif()
        exif[0x0112] = tag
        out[kind] = (encode(pic, "JPEG", quality=95, exif=exif.tobytes()), "image/jpeg", {KEPT}, None,
                     looks_like(pic.transpose(op)), f"orientation {tag}: stored upright")  # fmt: skip
    grey = picture(next(seed)).convert("L")
    out["greyscale_jpeg"] = (
        encode(grey, "JPEG", quality=95),
        "image/jpeg",
        {KEPT},
        None,
        looks_like(grey),
        "",
    )
    prog = picture(next(seed))
    out["progressive_jpeg"] = (encode(prog, "JPEG", quality=95, progressive=True), "image/jpeg", {KEPT}, None,
                               looks_like(prog), "")  # fmt: skip
    bmp = picture(next(seed))
    out["bmp"] = (encode(bmp, "BMP"), "image/bmp", {KEPT}, None, looks_like(bmp), "")
    # Degenerate geometry: decoded fine, dropped by the size and aspect-ratio rules.
    small = {(F, "too_small"), (F, "aspect_ratio"), (D, "decode_error")}
    out["one_by_one"] = (
        encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"),
        "image/png",
        small,
        None,
        None,
        "",
    )
    line = np.random.default_rng(5).integers(0, 255, (1, 100000, 3), np.uint8)
    out["wide_100000x1"] = (encode(Image.fromarray(line), "PNG"), "image/png", small, None, None, "")
    out["tall_1x100000"] = (encode(Image.fromarray(line.reshape(100000, 1, 3)), "PNG"), "image/png", small,
                            None, None, "")  # fmt: skip
    return out


# ----------------------------------------------------------------------------- captions


def caption_cases() -> list[tuple[str, Any, set, Callable | None, str]]:
    """(kind, caption, expected outcomes, kept check, note); each goes with its own valid picture."""
    empty = {(C, "empty_caption")}

    def clean(fates: list[Fate]) -> str | None:
        for f in fates:
            if f.row is None:
                continue
            c = f.row["caption"]
            if (
                not isinstance(c, str)
                or "\ufffd" in c
                or any(ord(ch) < 32 or 0x7F <= ord(ch) < 0xA0 for ch in c)
            ):
                return f"kept caption still has control or replacement characters: {c[:80]!r}"
            if "\u202e" in c or "\ufeff" in c or "\u200b" in c:
                return f"kept caption still has invisible format characters: {c[:80]!r}"
        return None

    def short(fates: list[Fate]) -> str | None:
        bad = [len(f.row["caption"]) for f in fates if f.row is not None and len(f.row["caption"]) > 1000]
        return f"kept caption of {bad[0]} chars > captions.max_chars" if bad else None

    long_text = "A quiet wooden house stands near the river under a grey sky while children play. " * 13000
    bad_text = {(D, "invalid_unicode")}
    return [
        ("caption_invalid_utf8", b"A red bicycle parked outside the caf\xe9 on the corner \xff\xfe today", bad_text,
         None, "text that is not UTF-8 is rejected, not repaired into a caption it never was"),
        ("caption_invalid_utf8_only", b"\xff\xfe\xfd\xc3\x28", bad_text, None, ""),
        ("caption_lone_surrogate", "A small dog \ud800 asleep on a sofa", bad_text, None,
         "a lone UTF-16 surrogate (written as UTF-8 with surrogatepass: ED A0 80)"),
        ("caption_control_characters", "A small boat\x00 floating\x07 on the\x1b quiet lake\u202e at noon\ufeff",
         {KEPT}, clean, "NUL, BEL, ESC, bidi override, BOM removed"),
        ("caption_1mb", long_text[:1_000_000], {KEPT}, short, "cut to captions.max_chars"),
        ("caption_empty", "", empty, None, ""),
        ("caption_null", None, empty, None, ""),
        ("caption_whitespace_only", " \t\n \r\n ", empty, None, ""),
        ("caption_invisible_only", "\u200b\u200e\ufeff\x00\u2060", empty, None, ""),
        ("caption_markup_only", "<script>alert(1)</script><b></b><!-- x -->", empty, None, ""),
        ("caption_one_word", "cat", {(F, "caption_too_short")}, None, "below filter.min_words"),
    ]  # fmt: skip


# ----------------------------------------------------------------------------- URL and address cases


def malformed_urls(port: int) -> dict[str, Any]:
    base = f"http://127.0.0.1:{port}"
    return {
        "url_not_a_url": "not a url",
        "url_no_host": "http://",
        "url_scheme_file": "file:///etc/passwd",
        "url_scheme_ftp": f"ftp://127.0.0.1:{port}/f/ok.jpg",
        "url_scheme_javascript": "javascript:alert(1)",
        "url_scheme_data": "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk",
        "url_scheme_relative": f"//127.0.0.1:{port}/f/ok.jpg",
        "url_with_space": f"{base}/f/a b.jpg",
        "url_with_control_character": f"{base}/f/\x00.jpg",
        "url_too_long": f"{base}/f/" + "a" * 5000 + ".jpg",
        "url_bad_ipv6_literal": "http://[::1/x.jpg",
        "url_bad_port": "http://127.0.0.1:99999/x.jpg",
        "url_null": None,
        "url_empty": "",
    }


def refused_addresses(port: int) -> dict[str, str]:
    """Loopback (other than the allowed 127.0.0.1), private, link-local, metadata, multicast, tricks."""
    return {
        "addr_loopback_127_0_0_2": f"http://127.0.0.2:{port}/f/ok.jpg",
        "addr_loopback_ipv6": f"http://[::1]:{port}/f/ok.jpg",
        "addr_private_10": "http://10.0.0.1/x.jpg",
        "addr_private_172_16": "http://172.16.0.1/x.jpg",
        "addr_private_192_168": "http://192.168.1.1/x.jpg",
        "addr_private_ipv6_ula": "http://[fc00::1]/x.jpg",
        "addr_shared_100_64": "http://100.64.0.1/x.jpg",
        "addr_link_local": "http://169.254.1.1/x.jpg",
        "addr_link_local_ipv6": "http://[fe80::1]/x.jpg",
        "addr_metadata_aws": "http://169.254.169.254/latest/meta-data/iam/security-credentials/",
        "addr_metadata_gcp_name": "http://metadata.google.internal/computeMetadata/v1/",
        "addr_metadata_name_upper_dot": "http://METADATA.GOOGLE.INTERNAL./computeMetadata/v1/",
        "addr_metadata_alibaba": "http://100.100.100.200/latest/meta-data/",
        "addr_metadata_ipv6": "http://[fd00:ec2::254]/latest/meta-data/",
        "addr_multicast": "http://224.0.0.1/x.jpg",
        "addr_multicast_ipv6": "http://[ff02::1]/x.jpg",
        "addr_unspecified": "http://0.0.0.0/x.jpg",
        "addr_broadcast": "http://255.255.255.255/x.jpg",
        "addr_decimal_encoded": "http://167772161/x.jpg",  # 10.0.0.1
        "addr_hex_encoded": "http://0xa9.0xfe.0xa9.0xfe/latest/meta-data/",  # 169.254.169.254
        "addr_octal_encoded": "http://0251.0376.0251.0376/latest/meta-data/",  # 169.254.169.254
        "addr_short_form": "http://10.1/x.jpg",  # 10.0.0.1
        "addr_ipv4_mapped_ipv6": "http://[::ffff:169.254.169.254]/latest/meta-data/",
        "addr_6to4_metadata": "http://[2002:a9fe:a9fe::]/latest/meta-data/",  # 6to4 of 169.254.169.254
        "addr_nat64_private": "http://[64:ff9b::a00:1]/x.jpg",  # NAT64 of 10.0.0.1
        "addr_userinfo_trick": f"http://127.0.0.1:{port}@10.0.0.1/x.jpg",
    }


# Host names in the corpus: the guard must refuse them by name, never look them up.
CORPUS_HOST_NAMES = {"metadata.google.internal", "metadata.google.internal."}


# ----------------------------------------------------------------------------- the hostile server


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    timeout = 60

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        srv = self.server
        with srv.lock:
            srv.requests.append(self.path)
        route, _, arg = self.path.lstrip("/").partition("/")
        try:
            getattr(self, "_" + route.replace("-", "_"), self._missing)(arg)
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            pass

    def _missing(self, arg: str) -> None:
        self.send_error(404)

    def _send(self, code: int, body: bytes, ctype: str = "image/jpeg", headers: dict | None = None) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def _f(self, name: str) -> None:  # a payload
        if name not in self.server.files:
            return self.send_error(404)
        data, ctype = self.server.files[name]
        self._send(200, data, ctype)

    def _slow(self, name: str) -> None:  # a payload after a delay (slows a step down for fault tests)
        self.server.stop.wait(self.server.slow_s)
        self._f(name)

    def _status(self, code: str) -> None:
        headers = {"Retry-After": "3600"} if code == "429" else None
        self._send(int(code), b"<html>no</html>", "text/html", headers)

    def _redirect(self, name: str) -> None:
        self.send_response(302)
        self.send_header("Location", self.server.redirects[name])
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _loop(self, arg: str) -> None:  # redirects to itself forever
        self.send_response(302)
        self.send_header("Location", "/loop/")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _chain(self, arg: str) -> None:  # /chain/0 -> /chain/1 -> ... (each hop distinct)
        self.send_response(302)
        self.send_header("Location", f"/chain/{int(arg or 0) + 1}")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _trickle(self, name: str) -> None:  # a valid payload, 16 bytes every 0.1 s
        data, ctype = self.server.files[name]
        self.send_response(200)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        for i in range(0, len(data), 16):
            if self.server.stop.wait(0.1):
                return
            self.wfile.write(data[i : i + 16])
            self.wfile.flush()

    def _trickle_headers(self, arg: str) -> None:  # an endless header line, one byte every 0.1 s
        self.wfile.write(b"HTTP/1.0 200 OK\r\nX-Slow: ")
        for _ in range(3000):
            if self.server.stop.wait(0.1):
                return
            self.wfile.write(b"a")
            self.wfile.flush()

    def _hang(self, arg: str) -> None:  # reads the request, never answers
        self.server.stop.wait(120)

    def _huge_declared(self, arg: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(100 * 1024**3))
        self.end_headers()
        self.wfile.write(b"\xff\xd8" + b"\0" * 4096)

    def _huge_stream(self, arg: str) -> None:  # no Content-Length, more bytes than any cap allows
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.end_headers()
        block = b"\xff" * 65536
        for _ in range(4 * TINY // len(block)):
            if self.server.stop.is_set():
                return
            self.wfile.write(block)

    def _lie(self, arg: str) -> None:  # declares 100 kB, sends 1 kB, closes
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", "100000")
        self.end_headers()
        self.wfile.write(b"\xff\xd8" + b"\1" * 1000)

    def _gzip(self, name: str) -> None:  # a valid image, gzip content-encoded (urllib does not decode it)
        data, ctype = self.server.files[name]
        self._send(200, gzip.compress(data, mtime=0), ctype, {"Content-Encoding": "gzip"})


class _Server(http.server.ThreadingHTTPServer):
    # The corpus opens ~100 connections at once (7 shards x 16 threads): with socketserver's default
    # listen backlog of 5 the kernel drops SYNs, and a connect retried after 1 s and 3 s looks like a
    # timeout to a client with a short socket timeout.
    request_queue_size = 256

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.files: dict[str, tuple[bytes, str]] = {}
        self.redirects: dict[str, str] = {}
        self.requests: list[str] = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.slow_s = 0.0
        self.connections = 0  # TCP connections accepted

    def process_request(self, request, client_address) -> None:
        with self.lock:
            self.connections += 1
        super().process_request(request, client_address)


class HostileServer(LocalServer):
    """An HTTP server on 127.0.0.1 (free port) for payloads and misbehaviours; a context manager (the
    thread and the shutdown of `pipelines.synthetic.LocalServer`)."""

    httpd: _Server

    def __init__(self) -> None:
        super().__init__(_Server(), "hostile-http")

    def __enter__(self) -> HostileServer:
        super().__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.stop.set()  # first: handlers that wait (slow, trickle, hang) return at once
        super().__exit__(*exc)

    def add(self, name: str, data: bytes, ctype: str = "image/jpeg") -> str:
        self.httpd.files[name] = (data, ctype)
        return f"{self.base_url}/f/{name}"

    def redirect(self, name: str, target: str) -> str:
        self.httpd.redirects[name] = target
        return f"{self.base_url}/redirect/{name}"

    @property
    def requests(self) -> list[str]:
        with self.httpd.lock:
            return list(self.httpd.requests)

    @property
    def connections(self) -> int:
        with self.httpd.lock:
            return self.httpd.connections

    def set_slow(self, seconds: float) -> None:
        self.httpd.slow_s = seconds


# ----------------------------------------------------------------------------- the corpus


def bad_cases(server: HostileServer) -> list[BadCase]:
    """Every kind of bad input, with its rows served by `server`."""
    cases: list[BadCase] = []
    cap = iter(f"A photo of the test scene number {i} with a wooden table and a lamp" for i in range(10_000))

    for group, payloads in (("payload", image_payloads()), ("image", format_payloads())):
        for kind, (data, ctype, expect, detail, check, note) in payloads.items():
            url = server.add(kind, data, ctype)
            cases.append(
                BadCase(kind, group, [{"url": url, "caption": next(cap)}], expect, detail, check, note)
            )

    for i, (kind, caption, expect, check, note) in enumerate(caption_cases()):
        url = server.add(kind, encode(picture(2000 + i), "JPEG", quality=92))
        cases.append(BadCase(kind, "caption", [{"url": url, "caption": caption}], expect, None, check, note))

    def one_kept(fates: list[Fate]) -> str | None:
        n = sum(f.step == "kept" for f in fates)
        return None if n == 1 else f"{n} copies kept (expected exactly 1)"

    dup = {KEPT, (F, "duplicate")}
    same = server.add("dup_same_url", encode(picture(3000), "JPEG", quality=92))
    cases.append(BadCase("duplicate_rows_same_url", "duplicate", [
        {"url": same, "caption": "A yellow kite above the beach at noon"},
        {"url": same, "caption": "A yellow kite above the beach at noon"},  # an identical row
        {"url": same, "caption": "The same kite with another caption"},
    ], dup, "same bytes as", one_kept, "3 rows: the smallest key is kept"))  # fmt: skip
    data = encode(picture(3001), "PNG")
    urls = [server.add("dup_bytes_a", data, "image/png"), server.add("dup_bytes_b", data, "image/png")]
    cases.append(BadCase("duplicate_bytes_two_urls", "duplicate",
                         [{"url": u, "caption": next(cap)} for u in urls], dup, "same bytes as", one_kept))  # fmt: skip

    refused = {(D, "url_refused")}
    for kind, url in malformed_urls(server.port).items():
        cases.append(BadCase(kind, "url", [{"url": url, "caption": next(cap)}], refused,
                             r"malformed|unsupported scheme|missing url|no host"))  # fmt: skip
    for kind, url in refused_addresses(server.port).items():
        cases.append(BadCase(kind, "address", [{"url": url, "caption": next(cap)}], refused,
                             r"not public|metadata"))  # fmt: skip

    ok = encode(picture(4000), "JPEG", quality=92)
    server.add("ok.jpg", ok)
    dl = {(D, "download_error")}
    slow = "took longer than"
    server_cases: list[tuple[str, str, set, str | None, Callable | None]] = [
        ("http_404", server.url("status/404"), dl, "404", None),
        ("http_403", server.url("status/403"), dl, "403", None),
        ("http_429_retry_after", server.url("status/429"), dl, "429", None),
        ("http_500", server.url("status/500"), dl, "500", None),
        ("http_503", server.url("status/503"), dl, "503", None),
        ("closed_port", closed_port_url() + "/x.jpg", dl, "refused", None),
        ("server_never_answers", server.url("hang/"), dl, r"timed out|" + slow, None),
        ("server_trickles_body", server.url("trickle/ok.jpg"), dl, slow, None),
        ("server_trickles_headers", server.url("trickle-headers/"), dl, slow, None),
        ("redirect_loop", server.url("loop/"), dl, "redirect", None),
        ("redirect_chain_too_long", server.url("chain/0"), dl, "redirect", None),
        ("redirect_to_private", server.redirect("private", "http://10.0.0.1/x.jpg"), refused,
         "redirect to .*not public", None),
        ("redirect_to_metadata", server.redirect("metadata", "http://169.254.169.254/latest/meta-data/"), refused,
         "redirect to .*not public", None),
        ("redirect_to_metadata_name", server.redirect("metaname", "http://metadata.google.internal/v1/"), refused,
         "redirect to .*metadata", None),
        ("redirect_to_other_loopback", server.redirect("lo2", f"http://127.0.0.2:{server.port}/f/ok.jpg"),
         refused, "redirect to .*not public", None),
        ("redirect_to_file_scheme", server.redirect("file", "file:///etc/passwd"), dl | refused,
         "not allowed|unsupported scheme", None),
        ("redirect_to_ftp_scheme", server.redirect("ftp", f"ftp://127.0.0.1:{server.port}/x"), refused | dl,
         "not allowed|unsupported scheme", None),
        ("redirect_to_allowed_image", server.redirect("fine", server.url("f/ok.jpg")), {KEPT}, None,
         looks_like(Image.open(io.BytesIO(ok)))),
        ("oversized_declared_length", server.url("huge-declared/"), dl, "too large", None),
        ("oversized_streamed", server.url("huge-stream/"), dl, "too large", None),
        ("content_length_lie", server.url("lie/"), dl, r"incomplete|read", None),
        ("gzip_encoded_body", server.url("gzip/ok.jpg"), {(D, "decode_error")}, None, None),
    ]  # fmt: skip
    for kind, url, expect, detail, check in server_cases:
        cases.append(BadCase(kind, "server", [{"url": url, "caption": next(cap)}], expect, detail, check))
    kinds = [c.kind for c in cases]
    assert len(kinds) == len(set(kinds)), "duplicate kind names"
    return cases


def url_rows(cases: list[BadCase]) -> list[dict[str, Any]]:
    """URL-list rows in case order, each tagged with its `case` (an extra column carried through)."""
    return [{**r, "case": c.kind, "group": c.group} for c in cases for r in c.rows]


def write_url_list(cases: list[BadCase], path: Path) -> int:
    """Parquet URL list; captions as *binary* so invalid UTF-8 survives to the download step."""
    rows = url_rows(cases)
    caps = [
        c.encode("utf-8", "surrogatepass") if isinstance(c, str) else c for c in (r["caption"] for r in rows)
    ]
    table = pa.table({
        "url": pa.array([r["url"] for r in rows], pa.string()),
        "caption": pa.array(caps, pa.binary()),
        "case": [r["case"] for r in rows],
        "group": [r["group"] for r in rows],
    })  # fmt: skip
    pq.write_table(table, path)
    return len(rows)


# ----------------------------------------------------------------------------- file-level cases


def file_cases(tmp: Path) -> list[tuple[str, Path, str]]:
    """(kind, URL-list file, text the error must contain): each must fail fast, naming the file/field."""
    tmp.mkdir(parents=True, exist_ok=True)
    out = []

    def put(name: str, data: bytes | str) -> Path:
        p = tmp / name
        p.write_bytes(data if isinstance(data, bytes) else data.encode())
        return p

    out.append(
        (
            "url_list_without_url_column",
            put("nourl.csv", "link,caption\nhttp://127.0.0.1/a.jpg,a cat\n"),
            "no 'url' column",
        )
    )
    out.append(
        (
            "url_list_without_caption_column",
            put("nocap.jsonl", '{"url": "http://127.0.0.1/a.jpg"}\n'),
            "no 'caption' column",
        )
    )
    out.append(
        (
            "url_list_with_key_column",
            put("key.tsv", "url\tcaption\tkey\nhttp://127.0.0.1/a.jpg\tc\t7\n"),
            "'key'",
        )
    )
    nested = tmp / "nested.parquet"
    pq.write_table(
        pa.table({"url": ["http://127.0.0.1/a.jpg"], "caption": ["c"], "tags": [["a", "b"]]}), nested
    )
    out.append(("url_list_with_nested_column", nested, "column 'tags'"))
    out.append(("url_list_empty_file", put("empty.csv", b""), "cannot read as csv"))
    out.append(
        ("url_list_not_parquet", put("junk.parquet", b"PAR1 this is not parquet"), "cannot read as parquet")
    )
    out.append(
        ("url_list_unknown_extension", put("urls.txt", "http://127.0.0.1/a.jpg\n"), "unknown URL-list format")
    )
    out.append(
        (
            "url_list_invalid_json",
            put("bad.jsonl", '{"url": "http://127.0.0.1/a.jpg", "caption": \n'),
            "cannot read as jsonl",
        )
    )
    return out  # fmt: skip


# ----------------------------------------------------------------------------- bad records (SFT JSON, URL lists)

KEPT_SFT = ("kept", None, None)
NON_FINITE = (
    "sft_shards",
    "teacher_non_finite",
    r"^non-finite teacher features: \d+ of 4096 fine and \d+ of 2304",
)


def _turns(answer: str, question: str = "<image>\nWhat is in the picture?") -> list[dict[str, str]]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


def sft_bad_corpus(root: Path) -> tuple[Path, Path, list[tuple[str, str | None, str | None]]]:
    """An SFT JSON array (written as bytes: it holds raw escapes and invalid UTF-8) and its image folder.

    Returns (json, image folder, the expected fate of each record in order: (step, reason, detail regex),
    step "kept" for records that reach `sft_shards/`). Images: `grey.png` (the CLIP mean colour) and
    `noise.png` give small teacher activations, `pic1.png` / `pic2.png` large ones (see
    `fp16_overflow_teacher`).
    """
    folder = root / "images"
    folder.mkdir(parents=True)
    (folder / "grey.png").write_bytes(encode(Image.new("RGB", (300, 200), (123, 117, 104)), "PNG"))
    noise = np.random.default_rng(0).integers(0, 255, (240, 320, 3), dtype=np.uint8)
    (folder / "noise.png").write_bytes(encode(Image.fromarray(noise), "PNG"))
    for i in (1, 2):
        (folder / f"pic{i}.png").write_bytes(encode(picture(i), "PNG"))

    def rec(rid: str, answer: str, image: str | None = "grey.png", **extra: Any) -> bytes:
        r: dict[str, Any] = {
            "id": rid,
            **({"image": image} if image else {}),
            "conversations": _turns(answer),
        }
        if image is None:
            r["conversations"][0]["value"] = "Tell me a story."
        return json.dumps({**r, **extra}).encode()

    deep = b"[" * 100_000 + b"]" * 100_000
    cases: list[tuple[bytes, tuple[str, str | None, str | None]]] = [
        # first and long: the preflight reads the first 4 kB as UTF-8 (the invalid-UTF-8 record comes later)
        (rec("story", "Once upon a time. " * 300, image=None), KEPT_SFT),
        (rec("grey", "A grey square."), KEPT_SFT),
        (rec("noise", "Coloured noise."), KEPT_SFT),
        (rec("emoji", "A smile \ud83d\ude00 (a valid surrogate pair)."), KEPT_SFT),
        (rec("brackets", 'He said "]}, {[" and left \\ the room.'), KEPT_SFT),
        (rec("nested-50", "Fine.", meta=json.loads("[" * 50 + "]" * 50)), KEPT_SFT),
        (rec("pic1", "A procedural picture.", "pic1.png"), NON_FINITE),
        (rec("pic2", "Another picture.", "pic2.png"), NON_FINITE),
        (rec("sur-value", "a \\ud800 b").replace(b"\\\\ud800", b"\\ud800"),
         ("sft_import", "invalid_unicode", r"^lone surrogate U\+D800 in conversations\[1\]\.value$")),
        (rec("sur-image", "x", "grey\\udfff.png").replace(b"\\\\udfff", b"\\udfff"),
         ("sft_import", "invalid_unicode", r"^lone surrogate U\+DFFF in image$")),
        (rec("sur-id-\\udbff", "x").replace(b"\\\\udbff", b"\\udbff"),
         ("sft_import", "invalid_unicode", r"^lone surrogate U\+DBFF in id$")),
        (rec("sur-key", "x", **{"\\ud800meta": 1}).replace(b"\\\\ud800", b"\\ud800"),
         ("sft_import", "invalid_unicode", r"^lone surrogate U\+D800 in the key")),
        (rec("bad-utf8", "caf\u00e9").replace(b"caf\\u00e9", b"caf\xe9"),
         ("sft_import", "invalid_unicode", r"^invalid UTF-8 in the record \(byte 0xe9 at offset \d+\)$")),
        (b'{"id": "deep", "conversations": ' + deep + b"}",
         ("sft_import", "invalid_record", r"^nesting deeper than 100 levels$")),
        (b'{"id": "broken", "conversations": tru}', ("sft_import", "invalid_record", r"^not valid JSON: ")),
        (rec("last", "The last one."), KEPT_SFT),
    ]  # fmt: skip
    path = root / "sft.json"
    path.write_bytes(b"[\n" + b",\n".join(c for c, _ in cases) + b"\n]\n")
    return path, folder, [e for _, e in cases]


def fp16_overflow_teacher(
    path: Path, model_config: Path, folder: Path, small: list[str], large: list[str]
) -> Path:
    """Teacher weights (safetensors) whose forward overflows float16 on the images `large` but not on `small`.

    A random tiny open_clip ViT with its residual stream scaled by s: `ln_pre` and every block's output
    projections (attention and MLP) times s multiply the last block's output by exactly s (the blocks'
    LayerNorms do not see the scale). s sits between the two groups' largest pooled activations, so the
    float16 targets of `large` hold inf (beyond 65504) and those of `small` stay finite: the failure of a
    real teacher whose activations outgrow float16.
    """
    import open_clip
    import torch
    from safetensors.torch import save_file

    from breen.teacher import last_block_grid, pool_targets
    from pipelines.teacher import decode

    open_clip.add_model_config(str(model_config))
    torch.manual_seed(0)
    model = open_clip.create_model(model_config.stem, pretrained=None).eval()

    def peak(name: str) -> float:
        pixels = torch.from_numpy(decode((folder / name).read_bytes())[None])
        with torch.inference_mode():
            return max(float(t.abs().max()) for t in pool_targets(last_block_grid(model.visual, pixels)))

    lo, hi = max(map(peak, small)), min(map(peak, large))
    assert hi > 1.3 * lo, (lo, hi)  # a clear margin on both sides of float16's 65504
    scale = 65504 / (lo * hi) ** 0.5
    state = model.state_dict()
    for k, v in state.items():
        if k.startswith("visual.") and any(p in k for p in ("ln_pre.", ".attn.out_proj.", ".mlp.c_proj.")):
            state[k] = v * scale
    save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    return path


def url_list_bad_text(root: Path, url: str) -> dict[str, tuple[Path, list[tuple[str, str | None]]]]:
    """URL lists (JSONL, CSV, TSV, Parquet) with text that is not valid Unicode in the url, the caption or an
    extra column (a lone surrogate where the format can hold one, invalid UTF-8 everywhere), each beside
    a good row. {format: (file, expected (reason, detail regex) per row, reason None for kept)}."""
    root.mkdir(parents=True, exist_ok=True)
    ok = "A photo of a red bicycle on a sunny street"
    bad = "invalid_unicode"
    out: dict[str, tuple[Path, list[tuple[str, str | None]]]] = {}
    jsonl = root / "urls.jsonl"
    jsonl.write_bytes(b"\n".join([
        json.dumps({"url": url, "caption": ok, "src": "a"}).encode(),
        json.dumps({"url": url + "?\\ud800", "caption": ok, "src": "b"}).encode().replace(b"\\\\ud800", b"\\ud800"),
        json.dumps({"url": url, "caption": "A cat \\udc00 on a mat", "src": "c"}).encode().replace(b"\\\\udc00", b"\\udc00"),
        json.dumps({"url": url, "caption": "caf\u00e9 latte on a table", "src": "d"}).encode().replace(b"\\u00e9", b"\xe9"),
        b"",  # a blank line: skipped, as pyarrow skips it
        json.dumps({"url": url, "caption": ok, "src": "e\\ud800"}).encode().replace(b"\\\\ud800", b"\\ud800"),
        json.dumps({"url": url, "caption": ok + " again", "src": "f"}).encode(),
    ]) + b"\n")  # fmt: skip
    out["jsonl"] = (jsonl, [(None, None), (bad, r"^lone surrogate U\+D800 in column 'url'$"),
                            (bad, r"^lone surrogate U\+DC00 in column 'caption'$"),
                            (bad, r"^invalid UTF-8 in column 'caption' \(byte 0xe9 at offset 3\)$"),
                            (bad, r"^lone surrogate U\+D800 in column 'src'$"), (None, None)])  # fmt: skip
    rows = [(url, ok, b"a"), (url.encode() + b"?\xff", ok, b"b"), (url, b"A cat \xed\xa0\x80 on a mat", b"c"),
            (url, ok, b"e\xfe"), (url, ok + " again", b"f")]  # fmt: skip
    expect = [(None, None), (bad, r"^invalid UTF-8 in column 'url' \(byte 0xff"),
              (bad, r"^invalid UTF-8 in column 'caption' \(byte 0xed at offset 6\)$"),
              (bad, r"^invalid UTF-8 in column 'src' \(byte 0xfe at offset 1\)$"), (None, None)]  # fmt: skip
    as_bytes = [[v if isinstance(v, bytes) else v.encode() for v in r] for r in rows]
    for fmt, sep in (("csv", b","), ("tsv", b"\t")):
        path = root / f"urls.{fmt}"
        path.write_bytes(
            sep.join([b"url", b"caption", b"src"]) + b"\n" + b"".join(sep.join(r) + b"\n" for r in as_bytes)
        )
        out[fmt] = (path, expect)
    # Parquet: string columns written without validation (as some writers do), then a binary column
    cols = list(zip(*as_bytes, strict=True))
    table = pa.table({"url": pa.array(cols[0], pa.binary()).view(pa.string()),
                      "caption": pa.array(cols[1], pa.binary()).view(pa.string()), "src": pa.array(cols[2], pa.binary())})  # fmt: skip
    pq.write_table(table, root / "urls.parquet")
    out["parquet"] = (root / "urls.parquet", expect)
    return out


# ----------------------------------------------------------------------------- tripwire


_FORBIDDEN = [ipaddress.ip_network(n) for n in (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16", "172.16.0.0/12",
    "192.168.0.0/16", "224.0.0.0/4", "240.0.0.0/4", "::/128", "::1/128", "fc00::/7", "fe80::/10", "ff00::/8",
)]  # fmt: skip
_TRIP: dict[str, Any] = {"installed": False, "active": 0, "log": None, "exempt": set()}


def _local_addresses() -> set[str]:
    """This machine's own interface addresses (Ray talks to them; never forbidden)."""
    out = {"127.0.0.1"}
    try:
        import psutil

        for addrs in psutil.net_if_addrs().values():
            out.update(
                a.address.split("%")[0] for a in addrs if a.family in (socket.AF_INET, socket.AF_INET6)
            )
    except Exception:
        pass
    out.discard("::1")
    return out


def _trip(what: str) -> None:
    if _TRIP["log"]:
        with open(_TRIP["log"], "a") as f:
            f.write(what + "\n")
    raise PermissionError(f"tripwire: {what}")


def _audit(event: str, args: tuple) -> None:
    if not _TRIP["active"]:
        return
    if event == "socket.connect":
        addr = args[1]
        if not isinstance(addr, tuple) or not addr or not isinstance(addr[0], str):
            return
        host = addr[0].split("%")[0]
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped:
            ip = ip.ipv4_mapped
        if str(ip) in _TRIP["exempt"]:
            return
        if any(ip in n for n in _FORBIDDEN if n.version == ip.version):
            _trip(f"connect to {host} port {addr[1] if len(addr) > 1 else '?'}")
    elif event == "socket.getaddrinfo":
        host = args[0].decode() if isinstance(args[0], bytes) else args[0]
        if isinstance(host, str) and host.lower().rstrip(".") in {h.rstrip(".") for h in CORPUS_HOST_NAMES}:
            _trip(f"name lookup of {host}")


@contextlib.contextmanager
def tripwire(log: str | Path | None = None) -> Iterator[None]:
    """While active, connecting to a non-public address (except this machine's own) raises and is logged."""
    if not _TRIP["installed"]:
        _TRIP["exempt"] = _local_addresses()
        sys.addaudithook(_audit)  # cannot be removed: it stays, inert, once the block ends
        _TRIP["installed"] = True
    previous = _TRIP["log"]
    _TRIP["log"] = str(log) if log else None
    _TRIP["active"] += 1
    try:
        yield
    finally:
        _TRIP["active"] -= 1
        _TRIP["log"] = previous


def download_shard_under_tripwire(log: str, *args: Any) -> dict:
    """`pipelines.download.download_one_shard` inside `tripwire(log)` (runs as a Ray task)."""
    from pipelines.download import download_one_shard

    with tripwire(log):
        return download_one_shard(*args)


def wait_for(predicate: Callable[[], bool], timeout: float, every: float = 0.05) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(every)
    return predicate()
