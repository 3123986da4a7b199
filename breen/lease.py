"""A lease: one writer at a time for a folder (a dataset), on local disk or an S3 store.

The lease is one small JSON object, `<folder>/_lease.json`::

    {"owner": "host:pid:token", "command": "python -m pipelines.filter ...", "acquired": ..., "ttl_s": 120}

- Taken only when absent: on local disk with ``O_CREAT | O_EXCL``; on S3 with a conditional PUT
  (``If-None-Match: *``, which AWS S3, MinIO, Cloudflare R2 and moto honour): of two runs that race,
  exactly one gets it.
- Renewed while held: a thread rewrites it every ``ttl_s / 4`` seconds (on S3 ``If-Match`` the ETag of
  the holder's last write), so its modification time is the holder's heartbeat. A holder whose renewal
  finds the lease changed (taken over after it stalled for longer than ``ttl_s``) marks it lost:
  `Lease.check` raises `LeaseLost`, and the step stops before writing more.
- Taken over when stale: a lease not renewed for ``ttl_s`` seconds belongs to a run that died, as does
  at once one whose holder ran on this host and whose process is gone (a killed run relaunched). It is
  replaced (local disk: renamed aside, which one process wins; S3: ``If-Match`` its ETag, which one
  writer wins), with a line naming the old holder.
- Released at the end (deleted, only if still ours).

A second run on a held folder waits up to ``wait_s`` seconds (0: fail at once) and then raises
`LeaseHeld`, naming the holder, its command and how long ago it renewed. `holder` reads a lease without
taking it (a step checks that no run is rewriting the datasets it reads).

gs:// has no conditional write through pyarrow: there the lease is written and read back after a pause
(last writer wins), which catches most races but not all; the warning says so.
"""

from __future__ import annotations

import abc
import contextlib
import json
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pyarrow.fs as pafs

from breen.storage import Location, Store, _aws_region, temporary_name

LEASE_FILE = "_lease.json"
DEFAULT_TTL_S = 120.0


class LeaseHeld(RuntimeError):
    """Another live run holds the lease."""


class LeaseLost(RuntimeError):
    """This run's lease was taken over (it stopped renewing for longer than the lease's time to live)."""


def _command() -> str:
    """The holder's command line as typed (``python -m pipelines.filter --config ...``), shortened."""
    argv = getattr(sys, "orig_argv", sys.argv)
    return " ".join([os.path.basename(argv[0]), *argv[1:]])[:300]


@dataclass
class _Record:
    owner: str
    command: str
    acquired: float
    ttl_s: float

    def to_bytes(self) -> bytes:
        return (json.dumps(self.__dict__, sort_keys=True) + "\n").encode()


class _Backend(abc.ABC):
    """Create-if-absent, replace-if-unchanged, read and delete of one small object."""

    def __init__(self, store: Store):
        self.store = store

    @abc.abstractmethod
    def read(self) -> tuple[dict[str, Any], float, str] | None:
        """(content, age in seconds since the last write, version) or None when absent."""
        ...

    @abc.abstractmethod
    def create(self, data: bytes) -> str | None:
        """Write only if absent: the new version, or None when it exists."""
        ...

    @abc.abstractmethod
    def replace(self, data: bytes, version: str) -> str | None:
        """Write only if still at `version`: the new version, or None when it changed."""
        ...

    @abc.abstractmethod
    def delete(self, version: str) -> None:
        ...


class _LocalBackend(_Backend):
    def read(self):
        try:
            with open(self.store.path, "rb") as f:
                data = f.read()
                st = os.fstat(f.fileno())
        except FileNotFoundError:
            return None
        try:
            content = json.loads(data)
        except ValueError:  # not ours (leases are written whole): judged by its age like any other
            content = {"owner": "?", "command": "?", "acquired": 0, "ttl_s": DEFAULT_TTL_S}
        return content, time.time() - st.st_mtime, f"{st.st_ino}:{content.get('owner')}"

    def create(self, data: bytes):
        """Written whole under a temporary name, then hard-linked into place (fails if the name exists:
        atomic, and a reader never sees a half-written lease)."""
        os.makedirs(os.path.dirname(self.store.path), exist_ok=True)
        tmp = temporary_name(self.store.path)
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, self.store.path)
        except FileExistsError:
            return None
        finally:
            os.remove(tmp)
        return self._version()

    def _version(self) -> str | None:
        found = self.read()
        return found[2] if found else None

    def replace(self, data: bytes, version: str):
        if self._version() != version:
            return None
        if version.split(":", 1)[1] == json.loads(data)["owner"]:  # a renewal: rewrite in place
            with open(self.store.path, "r+b") as f:
                f.truncate(0)
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            return self._version()
        aside = f"{self.store.path}.stale-{uuid.uuid4().hex[:8]}"
        try:  # a takeover: of the processes renaming the stale lease, one wins
            os.rename(self.store.path, aside)
        except FileNotFoundError:
            return None
        os.remove(aside)
        return self.create(data)

    def delete(self, version: str):
        if self._version() == version:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.store.path)


class _S3Backend(_Backend):
    def __init__(self, store: Store):
        super().__init__(store)
        import boto3

        self.bucket, _, self.key = store.path.partition("/")
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if store.endpoint is None and region is None:
            region = _aws_region(self.bucket)
        self.client = boto3.client("s3", endpoint_url=store.endpoint, region_name=region)

    def _failed(self, err: Exception) -> bool:
        code = getattr(err, "response", {}).get("Error", {}).get("Code", "")
        return code in ("PreconditionFailed", "ConditionalRequestConflict", "412", "409")

    def read(self):
        from botocore.exceptions import ClientError

        try:
            obj = self.client.get_object(Bucket=self.bucket, Key=self.key)
        except ClientError as e:
            if e.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
        try:
            content = json.loads(obj["Body"].read())
        except ValueError:
            content = {"owner": "?", "command": "?", "acquired": 0, "ttl_s": DEFAULT_TTL_S}
        return content, time.time() - obj["LastModified"].timestamp(), obj["ETag"]

    def _put(self, data: bytes, **condition: str) -> str | None:
        from botocore.exceptions import ClientError

        try:
            return self.client.put_object(Bucket=self.bucket, Key=self.key, Body=data, **condition)["ETag"]
        except ClientError as e:
            if self._failed(e):
                return None
            raise

    def create(self, data: bytes):
        return self._put(data, IfNoneMatch="*")

    def replace(self, data: bytes, version: str):
        return self._put(data, IfMatch=version)

    def delete(self, version: str):
        found = self.read()
        if found and found[2] == version:
            self.client.delete_object(Bucket=self.bucket, Key=self.key)


class _ReadBackBackend(_Backend):
    """Stores without conditional writes (gs:// through pyarrow): write, pause, read back."""

    SETTLE_S = 2.0

    def read(self):
        info = self.store.fs.get_file_info(self.store.path)
        if info.type == pafs.FileType.NotFound:
            return None
        content = self.store.read_json()
        age = time.time() - info.mtime.timestamp() if info.mtime else 0.0
        return content, age, content.get("owner", "?") + f":{info.mtime_ns}"

    def _write(self, data: bytes) -> str | None:
        owner = json.loads(data)["owner"]
        self.store.write_bytes(data)
        time.sleep(self.SETTLE_S)
        found = self.read()
        return found[2] if found and found[0].get("owner") == owner else None

    def create(self, data: bytes):
        return None if self.read() else self._write(data)

    def replace(self, data: bytes, version: str):
        found = self.read()
        return self._write(data) if found and found[2] == version else None

    def delete(self, version: str):
        found = self.read()
        if found and found[2] == version:
            self.store.delete()


def _backend(store: Store) -> _Backend:
    if store.local:
        return _LocalBackend(store)
    if store.uri.startswith("s3://"):
        return _S3Backend(store)
    print(f"[lease] warning: {store.uri}: this store has no conditional writes here; the lease is written "
          "and read back (two runs starting within seconds of each other may both proceed)",
          file=sys.stderr, flush=True)  # fmt: skip
    return _ReadBackBackend(store)


def _dead_here(content: dict[str, Any]) -> bool:
    """The holder ran on this host and its process no longer exists (a killed or crashed run: its lease
    need not be waited out)."""
    host, _, rest = str(content.get("owner", "")).partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def describe(content: dict[str, Any], age: float) -> str:
    return (f"{content.get('owner', '?')} (command: {content.get('command', '?')}; last renewed "
            f"{age:.0f} s ago, expires after {float(content.get('ttl_s', 0)):.0f} s)")  # fmt: skip


def holder(folder: Location) -> str | None:
    """Who holds the live lease on `folder` (a description), or None when nobody does."""
    store = Store.at(folder)
    found = _backend(store / LEASE_FILE).read()
    if found is None:
        return None
    content, age, _ = found
    return describe(content, age) if age <= float(content.get("ttl_s", 0)) else None


@dataclass
class Lease:
    """A held lease (see the module docstring); `check()` raises `LeaseLost` once it was taken over."""

    folder: Store
    ttl_s: float
    _backend: _Backend
    _record: _Record
    _version: str
    _lost: str | None = None
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def check(self) -> None:
        if self._lost:
            raise LeaseLost(f"{self.folder}: {self._lost}")

    def renew(self) -> bool:
        """One heartbeat: rewrite the lease if it is still ours; False (and `check` raises from now on)
        when another run took it over."""
        if self._lost:
            return False
        version = self._backend.replace(self._record.to_bytes(), self._version)
        if version is None:
            found = self._backend.read()
            now = describe(*found[:2]) if found else "nobody"
            self._lost = f"lease lost: it is now held by {now}"
            print(f"[lease] {self.folder}: {self._lost}", file=sys.stderr, flush=True)
            return False
        self._version = version
        return True

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.ttl_s / 4):
            try:
                if not self.renew():
                    return
            except Exception as e:  # a store hiccup: try again at the next beat
                print(f"[lease] {self.folder}: renewal failed ({type(e).__name__}: {e}); retrying",
                      file=sys.stderr, flush=True)  # fmt: skip

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if not self._lost:
            self._backend.delete(self._version)


def acquire(folder: Location, wait_s: float = 0.0, ttl_s: float = DEFAULT_TTL_S, poll_s: float = 2.0) -> Lease:
    """Take the lease on `folder`, waiting up to `wait_s` seconds for a live holder to finish."""
    folder = Store.at(folder)
    backend = _backend(folder / LEASE_FILE)
    record = _Record(f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}", _command(), time.time(), ttl_s)
    deadline = time.monotonic() + wait_s
    while True:
        version = backend.create(record.to_bytes())
        if version is None:
            found = backend.read()
            if found is None:
                continue  # released meanwhile: try again
            content, age, current = found
            dead = _dead_here(content)
            if dead or age > float(content.get("ttl_s", 0)):
                version = backend.replace(record.to_bytes(), current)
                if version is not None:
                    why = "its process is gone" if dead else "stale"
                    print(f"[lease] {folder}: took over the lease of {describe(content, age)}: {why}", flush=True)
        if version is not None:
            lease = Lease(folder, ttl_s, backend, record, version)
            lease._thread = threading.Thread(target=lease._renew_loop, name="breen-lease", daemon=True)
            lease._thread.start()
            return lease
        if time.monotonic() >= deadline:
            raise LeaseHeld(f"{folder} is being written by another run: {describe(content, age)}. Wait for it "
                            f"to finish, or use another output folder")  # fmt: skip
        time.sleep(poll_s)


@contextlib.contextmanager
def held(folder: Location, wait_s: float = 0.0, ttl_s: float = DEFAULT_TTL_S) -> Iterator[Lease]:
    """`acquire` ... `release` around a block."""
    lease = acquire(folder, wait_s, ttl_s)
    try:
        yield lease
    finally:
        lease.release()
