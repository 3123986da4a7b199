"""A real S3 API on 127.0.0.1 for benchmarks and tests: `moto_server` (from the lock) in a subprocess.

    with local_s3_server(buckets=("breen-test",)) as endpoint:   # "http://127.0.0.1:PORT"
        Store.at("s3://breen-test/x", endpoint_override=endpoint).write_bytes(b"...")

Credentials are whatever the environment holds (any value works with moto; set dummy ones before any
Ray worker starts so that workers inherit them). Nothing leaves 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A port free on 127.0.0.1 now and never returned before by this process: callers pick several
    ports before any server binds them (a Ray node's agents), and the kernel may hand out a port twice."""
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


@contextlib.contextmanager
def local_s3_server(buckets: tuple[str, ...] = (), timeout_s: float = 30.0) -> Iterator[str]:
    """Start `moto_server` on a free port with `buckets` created; yield its endpoint URL; stop it."""
    import boto3

    port = free_port()
    server = Path(sys.executable).parent / "moto_server"
    proc = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
    endpoint = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server did not start on port {port}") from None
                time.sleep(0.2)
        client = boto3.client("s3", endpoint_url=endpoint)
        for bucket in buckets:
            client.create_bucket(Bucket=bucket)
        yield endpoint
    finally:
        proc.terminate()
        proc.wait(timeout=10)
