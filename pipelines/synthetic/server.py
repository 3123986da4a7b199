"""A local HTTP server on 127.0.0.1, run in a daemon thread: the one wrapper for the synthetic corpus
(`serve`) and for any other handler (the tests' hostile server builds on `LocalServer`)."""

from __future__ import annotations

import functools
import http.server
import socket
import threading
from pathlib import Path
from typing import Any


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    extensions_map = {  # noqa: RUF012 - class attribute read by SimpleHTTPRequestHandler
        **http.server.SimpleHTTPRequestHandler.extensions_map,
        ".webp": "image/webp",
        ".jpg": "image/jpeg",
        ".png": "image/png",
        ".jsonl": "application/jsonl",
        ".parquet": "application/vnd.apache.parquet",
    }

    def log_message(self, format: str, *args: Any) -> None:
        pass


class LocalServer:
    """`httpd`, a `ThreadingHTTPServer` bound to 127.0.0.1, served from a daemon thread while used as a
    context manager (request threads are daemons too); on exit it is shut down and closed."""

    def __init__(self, httpd: http.server.ThreadingHTTPServer, name: str = "local-http") -> None:
        httpd.daemon_threads = True
        self.httpd = httpd
        self.thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, name=name,
                                       daemon=True)  # fmt: skip

    def __enter__(self) -> LocalServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)

    @property
    def port(self) -> int:
        return int(self.httpd.server_address[1])

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def url(self, rel_path: str) -> str:
        return f"{self.base_url}/{rel_path.lstrip('/')}"


def serve(directory: Path, port: int = 0) -> LocalServer:
    """Serve `directory` over HTTP on 127.0.0.1 (`port` 0: a free one) while the returned server is used as
    a context manager (``with serve(root) as server:``).

    Missing paths answer 404. Request logging is silenced. The server stops on exit.
    """
    directory = Path(directory).resolve()
    if not directory.is_dir():
        raise FileNotFoundError(f"not a directory: {directory}")
    handler = functools.partial(_QuietHandler, directory=str(directory))
    return LocalServer(http.server.ThreadingHTTPServer(("127.0.0.1", port), handler), "synthetic-http")


def closed_port_url() -> str:
    """`http://127.0.0.1:PORT` for a port that was bound and closed again: connecting is refused."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"
