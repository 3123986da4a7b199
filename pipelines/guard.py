"""Network and decode guards for untrusted URLs and image bytes.

- `AddressPolicy` refuses loopback, private, link-local, multicast, reserved and
  cloud-metadata addresses unless a host or CIDR is explicitly allowed.
- `vet_url` checks a URL before download (scheme, syntax, every resolved address).
- `install_guarded_opener` makes urllib (which img2dataset uses) check the *connected*
  peer address of every connection, including each redirect hop, and caps the
  response size and total read time.
- `check_image_header` reads only the image header and refuses decompression bombs
  before anything decodes the pixels.
"""

from __future__ import annotations

import http.client
import io
import ipaddress
import socket
import time
import urllib.request
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from PIL import Image

METADATA_HOSTS = {"metadata.google.internal", "metadata", "instance-data", "instance-data.ec2.internal"}
METADATA_IPS = {ipaddress.ip_address("169.254.169.254"), ipaddress.ip_address("fd00:ec2::254"),
                ipaddress.ip_address("100.100.100.200")}  # fmt: skip


class RefusedURL(ValueError):
    """A URL that must not be fetched; the message is the rejection detail."""


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
        return addr.is_global and not (addr.is_multicast or addr.is_reserved or addr.is_link_local)

    def check_ip(self, ip: str, host: str) -> None:
        if not self.allowed_ip(ip):
            raise RefusedURL(
                f"address {ip} of host {host!r} is not public (loopback/private/link-local/metadata)"
            )

    def check_host(self, host: str, port: int | None) -> None:
        """Refuse metadata names; resolve and check every address of the host."""
        h = host.lower().rstrip(".")
        if h in self._hosts:
            return
        if h in METADATA_HOSTS:
            raise RefusedURL(f"host {host!r} is a cloud metadata endpoint")
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


def _guarded_classes(policy: AddressPolicy, limits: Limits):
    class CappedResponse(http.client.HTTPResponse):
        def read(self, amt: int | None = None) -> bytes:  # type: ignore[override]
            if amt is not None:
                return super().read(amt)
            length = self.getheader("Content-Length")
            if length and length.isdigit() and int(length) > limits.max_bytes:
                raise RefusedURL(f"response too large: Content-Length {length} > {limits.max_bytes}")
            deadline = time.monotonic() + limits.max_seconds
            buf = io.BytesIO()
            while chunk := super().read(64 * 1024):
                buf.write(chunk)
                if buf.tell() > limits.max_bytes:
                    raise RefusedURL(f"response too large: more than {limits.max_bytes} bytes")
                if time.monotonic() > deadline:
                    raise RefusedURL(f"download slower than {limits.max_seconds}s limit")
            return buf.getvalue()

    def checked_connect(conn: http.client.HTTPConnection) -> None:
        policy.check_ip(conn.sock.getpeername()[0], conn.host)

    class GuardedHTTPConnection(http.client.HTTPConnection):
        response_class = CappedResponse

        def connect(self) -> None:
            super().connect()
            checked_connect(self)

    class GuardedHTTPSConnection(http.client.HTTPSConnection):
        response_class = CappedResponse

        def connect(self) -> None:
            super().connect()
            checked_connect(self)

    class GuardedHTTPHandler(urllib.request.HTTPHandler):
        def http_open(self, req):
            return self.do_open(GuardedHTTPConnection, req)

    class GuardedHTTPSHandler(urllib.request.HTTPSHandler):
        def https_open(self, req):
            return self.do_open(GuardedHTTPSConnection, req)

    class GuardedRedirectHandler(urllib.request.HTTPRedirectHandler):
        max_redirections = 5

        def redirect_request(self, req, fp, code, msg, headers, newurl):
            vet_url(newurl, policy)
            return super().redirect_request(req, fp, code, msg, headers, newurl)

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


def check_image_header(data: bytes, max_pixels: int, max_bytes: int | None = None) -> tuple[int, int]:
    """Return (width, height) from the header only; raise ValueError for bombs and non-images."""
    if max_bytes is not None and len(data) > max_bytes:
        raise ValueError(f"image is {len(data)} bytes (> {max_bytes})")
    if not data:
        raise ValueError("empty payload")
    try:
        with Image.open(io.BytesIO(data)) as im:
            w, h = im.size
    except Image.DecompressionBombError as e:
        raise ValueError(f"decompression bomb: {e}") from None
    except Exception as e:
        raise ValueError(f"not a decodable image: {type(e).__name__}") from None
    if w <= 0 or h <= 0:
        raise ValueError(f"invalid image size {w}x{h}")
    if w * h > max_pixels:
        raise ValueError(f"decompression bomb: {w}x{h} = {w * h} pixels > {max_pixels}")
    return w, h
