"""Network, decode and text guards for untrusted URLs, image bytes and records.

- `AddressPolicy` refuses loopback, private, link-local, multicast, reserved and
  cloud-metadata addresses unless a host or CIDR is explicitly allowed.
- `vet_url` checks a URL before download (scheme, syntax, every resolved address).
- `install_guarded_opener` makes urllib (which img2dataset uses) vet every redirect target
  before connecting, connect only to resolved addresses the policy allows (the address
  checked is the address connected to: no packet ever goes to a refused address, and DNS
  rebinding between the check and the connection gains nothing), and cap the response size
  and the total time of one download (connect, redirects, headers and body: every socket
  read waits at most until the download's deadline, so a server that trickles bytes cannot
  hold a thread longer than `Limits.max_seconds`).
- `check_image_header` reads only the image header, with Pillow's openers for common web
  raster formats only (`IMAGE_FORMATS`: never EPS, which Pillow decodes with Ghostscript, or
  the long tail of exotic decoders), and refuses decompression bombs before anything decodes
  the pixels; `normalise_image` applies the EXIF orientation and
  reduces 16-bit samples to 8 bits (OpenCV would clip them) before the pixels are stored.
- `text_problem` / `utf8_problem` name the field of a record whose text is not valid Unicode (a lone
  surrogate, invalid UTF-8: reason `INVALID_UNICODE`); `json_array_records` splits a JSON array into its
  records without parsing them (no recursion, bounded memory) and flags the absurdly nested or huge ones
  (reason `INVALID_RECORD`); `json_depth` measures one line before a parser that would crash on it.
"""

from __future__ import annotations

import functools
import http.client
import io
import ipaddress
import re
import socket
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from PIL import Image

METADATA_HOSTS = {"metadata.google.internal", "metadata", "instance-data", "instance-data.ec2.internal"}
METADATA_IPS = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254"),
                ipaddress.ip_address("100.100.100.200")}  # fmt: skip
NAT64 = ipaddress.ip_network("64:ff9b::/96")  # well-known NAT64 prefix (RFC 6052)


class RefusedURL(ValueError):
    """A URL that must not be fetched; the message is the rejection detail."""


# Messages of refusals raised while downloading (a redirect or a connection to a refused
# address) start with this, so the download step can tell them from network errors.
URL_REFUSED_MARK = "url refused: "


@dataclass
class AddressPolicy:
    allow: list[str] = field(default_factory=list)  # hosts, IPs or CIDRs allowed despite being non-public

    def __post_init__(self) -> None:
        self._nets = []
        self._hosts = set()
        for a in self.allow:
            try:
                self._nets.append(ipaddress.ip_network(a, strict=False))
            except ValueError:
                self._hosts.add(a.lower())

    def allowed_ip(self, ip: str) -> bool:
        addr = ipaddress.ip_address(ip.split("%")[0])
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped:
            addr = addr.ipv4_mapped
        if any(addr in n for n in self._nets):
            return True
        if addr in METADATA_IPS:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.sixtofour is not None:
            # 6to4 (2002::/16, "global" to ipaddress) carries an IPv4 address: judge that one.
            return self.allowed_ip(str(addr.sixtofour))
        if addr in NAT64:  # DNS64 answers on IPv6-only networks: judge the IPv4 address inside
            return self.allowed_ip(str(ipaddress.IPv4Address(int(addr) & 0xFFFFFFFF)))
        return addr.is_global and not (addr.is_multicast or addr.is_reserved or addr.is_link_local)

    def check_ip(self, ip: str, host: str) -> None:
        if not self.allowed_ip(ip):
            raise RefusedURL(
                f"address {ip} of host {host!r} is not public (loopback/private/link-local/metadata)"
            )

    def allowed_name(self, host: str) -> bool:
        """True when `host` is allowed by name (no address check); raise for metadata names."""
        h = host.lower().rstrip(".")
        if h in self._hosts:
            return True
        if h in METADATA_HOSTS:
            raise RefusedURL(f"host {host!r} is a cloud metadata endpoint")
        return False

    def check_host(self, host: str, port: int | None) -> None:
        """Refuse metadata names; resolve and check every address of the host."""
        if self.allowed_name(host):
            return
        h = host.lower().rstrip(".")
        try:
            infos = socket.getaddrinfo(h, port or 80, proto=socket.IPPROTO_TCP)
        except (socket.gaierror, UnicodeError) as e:
            raise RefusedURL(f"cannot resolve host {host!r}: {e}") from None
        for info in infos:
            self.check_ip(str(info[4][0]), host)


def parse_url(url: object) -> tuple[str, int | None]:
    """(host, port) of a well-formed http(s) URL; raise RefusedURL otherwise. No network access."""
    if not isinstance(url, str) or not url.strip():
        raise RefusedURL("missing url")
    if any(c.isspace() or ord(c) < 32 for c in url.strip()) or len(url) > 4096:
        raise RefusedURL("malformed url (whitespace, control characters or too long)")
    try:
        parts = urlsplit(url.strip())
        port = parts.port
    except ValueError as e:
        raise RefusedURL(f"malformed url: {e}") from None
    if parts.scheme not in ("http", "https"):
        raise RefusedURL(f"unsupported scheme {parts.scheme!r}")
    if not parts.hostname:
        raise RefusedURL("malformed url: no host")
    return parts.hostname, port


def vet_url(url: object, policy: AddressPolicy) -> None:
    """Raise RefusedURL unless `url` is a well-formed http(s) URL to an allowed address."""
    policy.check_host(*parse_url(url))


class UrlVetter:
    """`vet_url` with one address check per (host, port): lists have many URLs per host."""

    def __init__(self, policy: AddressPolicy) -> None:
        self.policy = policy
        self._hosts: dict[tuple[str, int | None], str | None] = {}

    def __call__(self, url: object) -> str | None:
        """None if the URL may be fetched, else the reason it is refused."""
        try:
            host = parse_url(url)
        except RefusedURL as e:
            return str(e)
        if host not in self._hosts:
            try:
                self.policy.check_host(*host)
                self._hosts[host] = None
            except RefusedURL as e:
                self._hosts[host] = str(e)
        return self._hosts[host]


# ----------------------------------------------------------------------------- guarded urllib


@dataclass
class Limits:
    max_bytes: int = 32 * 1024 * 1024
    max_seconds: float = 30.0


class _DeadlineReader(io.RawIOBase):
    """A socket reader whose every read waits at most until `deadline` (time.monotonic)."""

    def __init__(self, sock, deadline: float, op_timeout: float | None, max_seconds: float) -> None:
        self.raw = sock.makefile("rb", buffering=0)  # counts as a reference: the socket stays open
        self.sock, self.deadline, self.op_timeout, self.max_seconds = sock, deadline, op_timeout, max_seconds

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise RefusedURL(f"download took longer than the {self.max_seconds:g}s limit")
        self.sock.settimeout(left if self.op_timeout is None else min(self.op_timeout, left))
        try:
            return self.raw.readinto(b)
        except TimeoutError:
            if time.monotonic() >= self.deadline:
                raise RefusedURL(f"download took longer than the {self.max_seconds:g}s limit") from None
            raise

    def close(self) -> None:
        self.raw.close()
        super().close()


def _guarded_classes(policy: AddressPolicy, limits: Limits):
    def too_slow() -> RefusedURL:
        return RefusedURL(f"download took longer than the {limits.max_seconds:g}s limit")

    class CappedResponse(http.client.HTTPResponse):
        def __init__(self, sock, *args, deadline: float, **kwargs) -> None:
            super().__init__(sock, *args, **kwargs)
            plain, self.fp = (
                self.fp,
                io.BufferedReader(_DeadlineReader(sock, deadline, sock.gettimeout(), limits.max_seconds)),
            )
            plain.close()
            self._deadline = deadline
            self._got = 0

        def read(self, amt: int | None = None) -> bytes:  # type: ignore[override]
            if amt is not None:
                data = super().read(amt)
                self._got += len(data)
                if self._got > limits.max_bytes:
                    raise RefusedURL(f"response too large: more than {limits.max_bytes} bytes")
                return data
            length = self.getheader("Content-Length")
            if length and length.isdigit() and int(length) > limits.max_bytes:
                raise RefusedURL(f"response too large: Content-Length {length} > {limits.max_bytes}")
            buf = io.BytesIO()
            while chunk := super().read(64 * 1024):
                buf.write(chunk)
                if buf.tell() > limits.max_bytes:
                    raise RefusedURL(f"response too large: more than {limits.max_bytes} bytes")
                if time.monotonic() > self._deadline:
                    raise too_slow()
            if self.length:  # read(amt) returns short data silently when the server closes early
                raise http.client.IncompleteRead(buf.getvalue(), self.length)
            return buf.getvalue()

    def vetted_connection(conn: http.client.HTTPConnection):
        """`socket.create_connection` for `conn` that connects only to addresses the policy allows."""

        def create(address, timeout=socket._GLOBAL_DEFAULT_TIMEOUT, source_address=None):
            host, port = address
            refusal: RefusedURL | None = None
            error: OSError | None = None
            try:
                by_name = policy.allowed_name(host)
                infos = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)
                for family, kind, proto, _, sockaddr in infos:
                    if not by_name:
                        try:
                            policy.check_ip(str(sockaddr[0]), host)
                        except RefusedURL as e:
                            refusal = refusal or e  # never connected to: no packet is sent
                            continue
                    sock = socket.socket(family, kind, proto)
                    try:
                        if timeout is not socket._GLOBAL_DEFAULT_TIMEOUT:
                            sock.settimeout(timeout)
                        if source_address:
                            sock.bind(source_address)
                        sock.connect(sockaddr)
                        return sock
                    except OSError as e:
                        sock.close()
                        error = error or e
            except RefusedURL as e:
                refusal = e
            if error is not None:
                raise error
            raise RefusedURL(f"{URL_REFUSED_MARK}connection to {conn.host!r}: {refusal or 'no address'}")

        return create

    def bounded(conn: http.client.HTTPConnection, deadline: float) -> None:
        """Bound the connect by the time left; responses read under the same deadline; vetted addresses."""
        left = deadline - time.monotonic()
        if left <= 0:
            raise too_slow()
        conn.timeout = left if not isinstance(conn.timeout, (int, float)) else min(conn.timeout, left)
        conn.response_class = functools.partial(CappedResponse, deadline=deadline)
        conn._create_connection = vetted_connection(conn)

    class GuardedHTTPConnection(http.client.HTTPConnection):
        def __init__(self, *args, deadline: float, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self._deadline = deadline

        def connect(self) -> None:
            bounded(self, self._deadline)
            super().connect()

    class GuardedHTTPSConnection(http.client.HTTPSConnection):
        def __init__(self, *args, deadline: float, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            self._deadline = deadline

        def connect(self) -> None:  # TCP to a vetted address first, then the TLS handshake
            bounded(self, self._deadline)
            super().connect()

    def deadline_of(req) -> float:
        # One deadline per download: set on the first request, copied to every redirect.
        if getattr(req, "_breen_deadline", None) is None:
            req._breen_deadline = time.monotonic() + limits.max_seconds
        return req._breen_deadline

    class GuardedHTTPHandler(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(functools.partial(GuardedHTTPConnection, deadline=deadline_of(req)), req)

    class GuardedHTTPSHandler(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(functools.partial(GuardedHTTPSConnection, deadline=deadline_of(req)), req)

    class GuardedRedirectHandler(urllib.request.HTTPRedirectHandler):
        max_redirections = 5

        def redirect_request(self, req, fp, code, msg, headers, newurl):
            try:
                vet_url(newurl, policy)  # before any connection to the new target
            except RefusedURL as e:
                raise RefusedURL(f"{URL_REFUSED_MARK}redirect to {newurl[:200]!r}: {e}") from None
            new = super().redirect_request(req, fp, code, msg, headers, newurl)
            if new is not None:
                new._breen_deadline = deadline_of(req)
            return new

    return GuardedHTTPHandler, GuardedHTTPSHandler, GuardedRedirectHandler


def install_guarded_opener(policy: AddressPolicy, limits: Limits) -> None:
    """Make `urllib.request.urlopen` in this process go through the guards (no proxies, no file://)."""
    http_h, https_h, redirect_h = _guarded_classes(policy, limits)
    opener = urllib.request.OpenerDirector()
    for handler in (urllib.request.UnknownHandler(), urllib.request.HTTPDefaultErrorHandler(),
                    urllib.request.HTTPErrorProcessor(), http_h(), https_h(), redirect_h()):  # fmt: skip
        opener.add_handler(handler)
    urllib.request.install_opener(opener)


# ----------------------------------------------------------------------------- decode guard


# Pillow openers tried on untrusted bytes: common web raster formats (JPEG also opens MPO). Never EPS
# (decoded by running Ghostscript) nor the long tail of rarely used decoders (FLI, SGI, PCX, DDS, ...).
IMAGE_FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "AVIF")


@functools.cache
def _openers() -> tuple[str, ...]:
    """The `IMAGE_FORMATS` this Pillow build can open (an absent plugin is skipped, not an error)."""
    Image.init()
    return tuple(f for f in IMAGE_FORMATS if f in Image.OPEN)


def check_image_header(data: bytes, max_pixels: int, max_bytes: int | None = None) -> tuple[int, int]:
    """Return (width, height) from the header only; raise ValueError for bombs and non-images."""
    with open_image(data, max_pixels, max_bytes) as im:
        return im.size


def open_image(data: bytes, max_pixels: int, max_bytes: int | None = None) -> Image.Image:
    """The image, opened (header read, pixels not decoded yet) after the checks of `check_image_header`:
    the caller decodes it with `load()`, without parsing the header a second time."""
    if max_bytes is not None and len(data) > max_bytes:
        raise ValueError(f"image is {len(data)} bytes (> {max_bytes})")
    if not data:
        raise ValueError("empty payload")
    try:
        im = Image.open(io.BytesIO(data), formats=_openers())
        w, h = im.size
    except Image.DecompressionBombError as e:
        raise ValueError(f"decompression bomb: {e}") from None
    except Image.UnidentifiedImageError:
        raise ValueError(f"not a decodable image: not {'/'.join(_openers())}") from None
    except Exception as e:
        raise ValueError(f"not a decodable image: {type(e).__name__}") from None
    if w <= 0 or h <= 0:
        im.close()
        raise ValueError(f"invalid image size {w}x{h}")
    if w * h > max_pixels:
        im.close()
        raise ValueError(f"decompression bomb: {w}x{h} = {w * h} pixels > {max_pixels}")
    return im


ORIENTATION = 0x0112  # EXIF tag
_TRANSPOSE = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
              4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270,
              7: Image.Transpose.TRANSVERSE, 8: Image.Transpose.ROTATE_90}  # fmt: skip
_HIGH_DEPTH_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")


def _orientation(im: Image.Image) -> int:
    """EXIF orientation from the header only (1 when absent or unreadable)."""
    try:
        if hasattr(im, "tag_v2"):  # TIFF: the tag is in the IFD
            return int(im.tag_v2.get(274, 1) or 1)
        raw = im.info.get("exif")  # JPEG/WebP; PNG when eXIf precedes the pixels
        if not raw:
            return 1
        exif = Image.Exif()
        exif.load(raw)
        return int(exif.get(ORIENTATION, 1) or 1)
    except Exception:
        return 1


def _high_depth(data: bytes, im: Image.Image) -> bool:
    """More than 8 bits per sample (OpenCV decodes these as uint16 and clips them when encoding)."""
    if im.mode in _HIGH_DEPTH_MODES:
        return True
    if data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 24:
        return data[24] > 8  # IHDR bit depth
    bits = getattr(im, "tag_v2", {}).get(258)  # TIFF BitsPerSample
    return bits is not None and max(bits if isinstance(bits, tuple) else (bits,)) > 8


def normalise_image(data: bytes, flatten_alpha: bool = False) -> bytes | None:
    """8-bit PNG bytes of the image as a viewer shows it, or None when `data` needs no change.

    Changes: EXIF orientation applied (browsers display it rotated; the stored copy has no
    EXIF), 16-bit (or 32-bit) samples scaled to 8 bits, and with `flatten_alpha` transparency
    composited on white (what the download step's decoder does). Call after
    `check_image_header`: this decodes the pixels when a change is needed.
    """
    with Image.open(io.BytesIO(data), formats=_openers()) as im:
        orientation = _orientation(im)
        high = _high_depth(data, im)
        alpha = flatten_alpha and (im.mode in ("RGBA", "LA", "PA", "La", "RGBa") or "transparency" in im.info)
        if (
            orientation not in _TRANSPOSE
            and not high
            and not alpha
            and not (flatten_alpha and im.mode == "CMYK")
        ):
            return None
        im.load()
        img = im
        if orientation in _TRANSPOSE:
            img = img.transpose(_TRANSPOSE[orientation])
        if img.mode in _HIGH_DEPTH_MODES:
            import numpy as np

            arr = np.asarray(img, dtype=np.float64)
            if img.mode != "F":
                arr = arr * (255.0 / 65535.0)  # 16-bit range (Pillow reads 16-bit grey as I;16)
            elif arr.max(initial=0.0) <= 1.0:
                arr = arr * 255.0  # float images in [0, 1]
            img = Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), "L")
        if alpha:
            rgba = img.convert("RGBA")
            white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            img = Image.alpha_composite(white, rgba).convert("RGB")
        elif flatten_alpha and img.mode == "CMYK":
            img = img.convert("RGB")
        out = io.BytesIO()
        img.save(out, "PNG", compress_level=1)
        return out.getvalue()


# ----------------------------------------------------------------------------- text and JSON guard

# Rejection reasons for records whose text or structure cannot be stored (one owner for both names).
INVALID_UNICODE = "invalid_unicode"  # invalid UTF-8, or a lone UTF-16 surrogate ("\ud800" in JSON)
INVALID_RECORD = "invalid_record"  # not valid JSON, nested deeper than MAX_JSON_DEPTH, or too large
# Nesting levels one record may have (an SFT record has 3: object, conversations list, turn object).
# Far below what Python's recursive json decoder survives (~1,000) and what crashes pyarrow's JSON
# reader (between 5,000 and 20,000 levels: a segmentation fault, not an exception).
MAX_JSON_DEPTH = 100
MAX_RECORD_BYTES = 16 * 1024 * 1024  # one JSON record (an SFT conversation is a few kB)

_SURROGATE = re.compile("[\ud800-\udfff]")
_IN_STRING = re.compile(rb'["\\]')  # what ends or escapes inside a JSON string
_STRUCTURE = re.compile(rb'["\[\]{},]')  # what matters outside strings
_QUOTE, _BACKSLASH, _COMMA = ord('"'), ord("\\"), ord(",")
_OPEN, _CLOSE = {ord("["): ord("]"), ord("{"): ord("}")}, (ord("]"), ord("}"))
_JSON_SPACE = b" \t\r\n"


class JsonStructureError(ValueError):
    """A JSON array whose record boundaries cannot be found (the message gives the byte offset)."""


def escape_text(value: str | bytes) -> str:
    """`value` as storable UTF-8 text: lone surrogates and invalid bytes become backslash escapes
    (``\\ud800``, ``\\xff``), so a rejected row shows what was there. Valid text is returned as is."""
    if isinstance(value, bytes):
        return value.decode("utf-8", "backslashreplace")
    return value.encode("utf-8", "backslashreplace").decode("utf-8") if _SURROGATE.search(value) else value


def utf8_problem(data: bytes, where: str) -> str | None:
    """None when `data` is valid UTF-8 (Python's codec also refuses encoded surrogates), else the
    rejection detail naming `where` and the first bad byte."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        return f"invalid UTF-8 in {where} (byte 0x{data[e.start]:02x} at offset {e.start})"
    return None


def text_problem(value: Any, where: str = "") -> str | None:
    """None when every string in the parsed JSON `value` (dict keys included) is valid Unicode, else the
    rejection detail for the first lone surrogate, naming its field (``conversations[1].value``). Walks
    the value iteratively (no recursion, whatever the nesting)."""
    stack: list[tuple[str, Any]] = [(where, value)]
    while stack:
        path, v = stack.pop()
        if isinstance(v, str):
            if m := _SURROGATE.search(v):
                return f"lone surrogate U+{ord(m.group()):04X} in {path or 'the record'}"
        elif isinstance(v, dict):
            items = []
            for k, item in v.items():
                key = f"{path}.{escape_text(str(k))}" if path else escape_text(str(k))
                if isinstance(k, str) and (m := _SURROGATE.search(k)):
                    return f"lone surrogate U+{ord(m.group()):04X} in the key {key!r}"
                items.append((key, item))
            stack.extend(reversed(items))
        elif isinstance(v, list):
            stack.extend(reversed([(f"{path}[{i}]", item) for i, item in enumerate(v)]))
    return None


def json_depth(data: bytes) -> int:
    """Deepest nesting of brackets and braces in JSON text `data` (strings honoured; nothing parsed)."""
    depth = deepest = 0
    pos, in_string = 0, False
    while True:
        m = (_IN_STRING if in_string else _STRUCTURE).search(data, pos)
        if m is None:
            return deepest
        c, pos = data[m.start()], m.end()
        if in_string:
            if c == _BACKSLASH:
                pos += 1  # the escaped byte
            else:
                in_string = False
        elif c == _QUOTE:
            in_string = True
        elif c in _OPEN:
            depth += 1
            deepest = max(deepest, depth)
        elif c in _CLOSE:
            depth -= 1


def json_array_records(
    f: Any, max_depth: int = MAX_JSON_DEPTH, max_bytes: int = MAX_RECORD_BYTES, block_size: int = 1 << 20
) -> Iterator[tuple[bytes, str | None]]:
    """(raw bytes, problem) of every element of the top-level JSON array in binary file `f`, in order.

    Reads `f` in blocks and never parses an element: a scanner finds the commas and brackets outside
    strings (escapes honoured), without recursion, so memory is one block plus one element. `problem` is
    None, or why the element cannot be a record: nested deeper than `max_depth` levels, or larger than
    `max_bytes` (then only its first `max_bytes` come back). Structure that hides where records begin
    and end (no array, mismatched brackets, a stray comma, a truncated file, data after the array) raises
    `JsonStructureError` with the byte offset.
    """
    block, offset = f.read(block_size), 0  # offset: of block[0] in the file
    while len(block) < 3 and (more := f.read(block_size)):  # room for the byte order mark
        block += more
    pos = 3 if block.startswith(b"\xef\xbb\xbf") else 0  # a UTF-8 byte order mark
    while True:  # whitespace, then the opening bracket
        while pos < len(block) and block[pos] in _JSON_SPACE:
            pos += 1
        if pos < len(block) or not block:
            break
        offset, block, pos = offset + len(block), f.read(block_size), 0
    if not block:
        raise JsonStructureError("empty file: expected a JSON array of records")
    if block[pos] != ord("["):
        what = "a JSON object" if block[pos] == ord("{") else f"{chr(block[pos])!r}"
        raise JsonStructureError(f"expected a JSON array of records, found {what} at byte {offset + pos}")
    opened = bytearray(b"[")  # open brackets, matched up to max_depth + 1 levels (deeper: only counted)
    depth, in_string, escape = 1, False, False
    # the current element: its bytes so far (at most max_bytes), its size, where its unread part of
    # `block` starts, its offset in the file, its deepest nesting; and how many elements came before
    element, size, seg, start, deepest, count = bytearray(), 0, pos + 1, offset + pos + 1, 0, 0
    pos += 1

    def take(end: int) -> tuple[bytes, str | None] | None:
        """The element that ends at block[end] (a separator), or None for the empty one of `[]`."""
        nonlocal element, size, seg, start, deepest, count
        piece = block[seg:end]
        element += piece[: max(0, max_bytes - len(element))]
        size += len(piece)
        raw = bytes(element).strip(_JSON_SPACE)
        problem = None
        if deepest > max_depth:
            problem = f"nesting deeper than {max_depth} levels"
        elif size > max_bytes:
            problem = f"record larger than {max_bytes} bytes"
        if not raw and problem is None:
            if count or block[end] == _COMMA:
                raise JsonStructureError(f"empty element (a stray comma?) at byte {start}")
            return None
        element, size, seg, start, deepest, count = bytearray(), 0, end + 1, offset + end + 1, 0, count + 1
        return raw, problem

    while True:
        n = len(block)
        while pos < n:
            if escape:
                pos, escape = pos + 1, False
                continue
            if in_string:
                m = _IN_STRING.search(block, pos)
                if m is None:
                    pos = n
                    break
                pos = m.end()
                escape = block[m.start()] == _BACKSLASH
                in_string = escape
                continue
            m = _STRUCTURE.search(block, pos)
            if m is None:
                pos = n
                break
            i, c = m.start(), block[m.start()]
            pos = i + 1
            if c == _QUOTE:
                in_string = True
            elif c in _OPEN:
                depth += 1
                deepest = max(deepest, depth - 1)
                if depth <= max_depth + 1:
                    opened.append(c)
            elif c in _CLOSE:
                if depth == len(opened):  # a level whose opener is tracked
                    opener = opened.pop()
                    if c != _OPEN[opener]:
                        raise JsonStructureError(
                            f"mismatched brackets: {chr(c)!r} at byte {offset + i} closes a {chr(opener)!r}"
                        )
                depth -= 1
                if depth == 0:  # the array's closing bracket
                    if (last := take(i)) is not None:
                        yield last
                    _expect_only_space(f, block, pos, offset, block_size)
                    return
            elif c == _COMMA and depth == 1 and (record := take(i)) is not None:
                yield record
        if seg < n:  # the current element continues in the next block
            piece = block[seg:n]
            element += piece[: max(0, max_bytes - len(element))]
            size += len(piece)
        offset, block, pos, seg = offset + n, f.read(block_size), 0, 0
        if not block:
            where = "a string" if in_string else "the array"
            raise JsonStructureError(f"the file ends inside {where} at byte {offset} (truncated?)")


def _expect_only_space(f: Any, block: bytes, pos: int, offset: int, block_size: int) -> None:
    """After the array's closing bracket: only whitespace to the end of the file."""
    while block:
        rest = block[pos:].lstrip(_JSON_SPACE)
        if rest:
            raise JsonStructureError(
                f"data after the array's closing ']' at byte {offset + len(block) - len(rest)}"
            )
        offset, block, pos = offset + len(block), f.read(block_size), 0
