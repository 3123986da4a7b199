"""One storage layer for local disk and object stores, on `pyarrow.fs` (what Ray Data and Ray Train use).

`Store.at(uri)` resolves a location from what the user wrote:
- a local path or `file://` URI -> `pyarrow.fs.LocalFileSystem`, absolute path;
- `s3://bucket/prefix` -> `pyarrow.fs.S3FileSystem`; S3-compatible stores (MinIO, Ceph, R2) through
  `endpoint_override` ("host:port" or "http(s)://host:port"), or the standard `AWS_ENDPOINT_URL_S3` /
  `AWS_ENDPOINT_URL` variables;
- `gs://bucket/prefix` -> `pyarrow.fs.GcsFileSystem`.
A `Store` behaves like a `pathlib.Path` for the few things the project does (`/`, `parent`, `name`,
`exists`, `read_bytes`, `write_bytes`, `read_text`, `read_json`, `write_json`, `glob`, `files`, `names`,
`mkdir`, `delete`), and hands `fs` and `path` to pyarrow and Ray (`pyarrow.parquet` takes
`store.path, filesystem=store.fs`). Stores are picklable: Ray tasks and actors receive them as they are
(the filesystem carries its endpoint, never credentials, which each process reads from the environment).

Completion semantics: on local disk a write goes to a temporary name and is renamed (readers never see a
partial file); on an object store one PUT is all or nothing, so objects are written in place.

Credentials come only from the standard places (environment variables, credentials files, instance or
workload identity): a URI carrying keys is refused, and `uri` (what logs and manifests record) never
holds a query string. Unknown schemes and missing buckets fail at once with `StorageError`, naming the
config field and the URI (`check_readable`, `check_writable` run before Ray starts).

`require_local` guards the few paths that must be local files (a custom open_clip model config), so a URI
fails naming the field instead of being read as a local folder called `s3:`.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import functools
import json
import os
import posixpath
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pyarrow.fs as pafs

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
OBJECT_STORES = ("s3", "gs")
_SECRET_PARAMS = ("access_key", "secret_key", "session_token")


_TMP = ".tmp-"


def temporary_name(path: str) -> str:
    """A temporary name beside `path` for a write-then-rename (never listed by `Store.names`)."""
    return f"{path}{_TMP}{os.getpid()}-{uuid.uuid4().hex[:8]}"


def is_temporary(name: str) -> bool:
    return _TMP in name


class StorageError(ValueError):
    """A location that cannot be used, naming the config field and the URI."""


def scheme(path: str) -> str | None:
    """The URI scheme of `path` ("s3", "gs", "file", ...), None for a plain path."""
    m = _SCHEME.match(str(path))
    return m.group(1).lower() if m else None


def require_local(path: str | None, field: str) -> str | None:
    """`path` unchanged when it is a local path (a `file://` URI becomes its path); a ValueError naming
    `field` for any other URI (for the few files that must be local)."""
    if path is None:
        return None
    kind = scheme(path)
    if kind is None:
        return path
    if kind == "file":
        return str(path)[len("file://") :]
    raise ValueError(
        f"{field}: {path}: must be a local file ({kind}:// is not read here: copy it to local disk)"
    )


def _endpoint(value: str | None) -> tuple[str | None, str | None]:
    """("host:port", "http"|"https") of an endpoint given as host:port or a URL; (None, None) if unset."""
    value = value or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if not value:
        return None, None
    if "://" in value:
        parts = urlsplit(value)
        return parts.netloc, parts.scheme
    return value, "https"


@functools.cache
def _aws_region(bucket: str) -> str | None:
    """AWS_REGION / AWS_DEFAULT_REGION, else the bucket's own region (one request, remembered); None
    leaves pyarrow's default when S3 cannot be asked (the first real request then names the error)."""
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        return region
    try:
        return pafs.resolve_s3_region(bucket)
    except OSError:
        return None


@dataclass(frozen=True)
class Store:
    """A location: a pyarrow filesystem and a path in it (no trailing slash)."""

    fs: pafs.FileSystem = dataclasses.field(compare=False)
    path: str
    uri: str  # what the user named, normalised; never credentials (equality and hashing use path and uri)
    # an S3-compatible endpoint as a URL ("http://127.0.0.1:9000"); None on AWS, GCS and local disk (what
    # clients other than pyarrow need, e.g. `breen.lease`'s conditional writes)
    endpoint: str | None = dataclasses.field(default=None, compare=False)

    @classmethod
    def at(cls, uri: str | Path | Store, field: str = "path", endpoint_override: str | None = None) -> Store:
        """The location `uri` names (see the module docstring); `field` names it in errors. A Store is
        returned as it is."""
        if isinstance(uri, Store):
            return uri
        text = str(uri)
        kind = scheme(text)
        if kind is None or kind == "file":
            local = Path(text[len("file://") :] if kind == "file" else text).expanduser().resolve()
            return cls(pafs.LocalFileSystem(), local.as_posix(), local.as_posix())
        if kind not in OBJECT_STORES:
            raise StorageError(
                f"{field}: {text}: unknown storage scheme {kind}:// (use a local path, s3:// or gs://)"
            )
        parts = urlsplit(text)
        query = parse_qs(parts.query)
        if any(k in query for k in _SECRET_PARAMS):
            raise StorageError(
                f"{field}: {kind}://{parts.netloc}{parts.path}: credentials in a URI are refused; set them in the "
                "environment, a credentials file or the workload identity"
            )
        if not parts.netloc:
            raise StorageError(f"{field}: {text}: no bucket in the URI")
        clean = f"{kind}://{parts.netloc}{parts.path}".rstrip("/")
        path = f"{parts.netloc}{parts.path}".rstrip("/")
        if kind == "s3":
            host, http = _endpoint(endpoint_override or (query.get("endpoint_override") or [None])[0])
            if host and (query.get("scheme") or [None])[0]:
                http = query["scheme"][0]
            if host:
                fs = pafs.S3FileSystem(endpoint_override=host, scheme=http)
                return cls(fs, path, clean, f"{http}://{host}")
            # AWS: the bucket's region from the environment, else asked of S3 once per bucket
            return cls(pafs.S3FileSystem(region=_aws_region(parts.netloc)), path, clean)
        return cls(pafs.GcsFileSystem(), path, clean)

    # ------------------------------------------------------------------ path-like
    @property
    def local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    @property
    def bucket(self) -> str | None:
        return None if self.local else self.path.split("/", 1)[0]

    def _at(self, path: str) -> Store:
        """Another location on the same filesystem (the URI keeps this one's scheme)."""
        prefix = self.uri[: len(self.uri) - len(self.path)]  # "" locally, "s3://" or "gs://" otherwise
        return Store(self.fs, path, prefix + path, self.endpoint)

    def __truediv__(self, part: str) -> Store:
        part = str(part).strip("/")
        return self._at(f"{self.path}/{part}")

    def joinpath(self, relative: str) -> Store:
        """This location followed by `relative`, which may climb with `..` (normalised, like a path)."""
        return self._at(posixpath.normpath(f"{self.path}/{relative}"))

    def relative_to_dir(self, other: Store) -> str:
        """This location as a relative path from folder `other` (`joinpath` inverts it)."""
        return posixpath.relpath(self.path, other.path)

    @property
    def parent(self) -> Store:
        return self._at(posixpath.dirname(self.path))

    @property
    def stem(self) -> str:
        return self.name.split(".", 1)[0]

    def __str__(self) -> str:
        return self.uri

    def _info(self) -> pafs.FileInfo:
        return self.fs.get_file_info(self.path)

    def exists(self) -> bool:
        return self._info().type != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self._info().type == pafs.FileType.File

    def is_dir(self) -> bool:
        """A folder, or on an object store a prefix that holds objects."""
        return self._info().type == pafs.FileType.Directory

    # ------------------------------------------------------------------ reads and writes
    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def write_bytes(self, data: bytes) -> None:
        """All or nothing: a temporary name, fsync, then a rename on local disk; one PUT on an object store."""
        if self.local:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            tmp = temporary_name(self.path)
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            return
        with self.fs.open_output_stream(self.path) as f:
            f.write(data)

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def read_json(self) -> Any:
        return json.loads(self.read_bytes())

    def write_json(self, obj: Any) -> None:
        self.write_bytes((json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())

    def open_input(self):
        """A binary file object to read (seekable: what pyarrow's CSV and JSON readers need)."""
        return self.fs.open_input_file(self.path)

    def mkdir(self) -> None:
        """Create the folder (and its parents) on local disk; nothing on an object store (no folders)."""
        if self.local:
            os.makedirs(self.path, exist_ok=True)

    def _entries(self, recursive: bool) -> list[pafs.FileInfo]:
        if not self.is_dir():
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=recursive))
        return [i for i in infos if i.type == pafs.FileType.File and not is_temporary(i.base_name)]

    def dirs(self) -> list[Store]:
        """The folders (prefixes holding objects) directly under this location, sorted."""
        if not self.is_dir():
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(self.path, recursive=False))
        return sorted((self._at(i.path) for i in infos if i.type == pafs.FileType.Directory),
                      key=lambda d: d.path)  # fmt: skip

    def names(self, suffix: str = "") -> list[str]:
        """Sorted names of the files directly under this location that end with `suffix`."""
        return sorted(i.base_name for i in self._entries(False) if i.base_name.endswith(suffix))

    def glob(self, pattern: str) -> list[Store]:
        """The files directly under this location whose name matches `pattern` (fnmatch), sorted."""
        return [self / n for n in self.names() if fnmatch.fnmatchcase(n, pattern)]

    def files(self, suffix: str = "") -> list[Store]:
        """Every file under this location, at any depth, that ends with `suffix`, sorted by path."""
        return [self._at(i.path) for i in sorted(self._entries(True), key=lambda i: i.path)
                if i.base_name.endswith(suffix)]  # fmt: skip

    def sizes(self, suffix: str = "", recursive: bool = True) -> dict[str, int]:
        """{path relative to this folder: size in bytes} of every file under it (directly under it when not
        `recursive`) that ends with `suffix`, temporary names left out (one listing)."""
        return {posixpath.relpath(i.path, self.path): i.size for i in self._entries(recursive)
                if i.base_name.endswith(suffix)}  # fmt: skip

    def delete(self) -> None:
        """Remove this file, or this folder / prefix and everything under it; nothing if absent."""
        info = self._info()
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path)
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(self.path)

    # ------------------------------------------------------------------ folders to and from local disk
    def upload_dir(self, local: str | Path, last: tuple[str, ...] = ()) -> None:
        """Every file under local folder `local` to this location (same relative paths); the files named
        in `last` (relative paths) after all others, so a reader that waits for them sees the rest."""
        local = Path(local)
        files = sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file())
        for rel in sorted(files, key=lambda r: (r in last, r)):
            (self / rel).write_bytes((local / rel).read_bytes())

    def download_dir(self, local: str | Path) -> None:
        """Every file under this location to local folder `local` (same relative paths)."""
        local = Path(local)
        for f in self.files():
            dest = local / f.relative_to_dir(self)
            dest.parent.mkdir(parents=True, exist_ok=True)
            dest.write_bytes(f.read_bytes())

    # ------------------------------------------------------------------ checks before Ray starts
    def _check_bucket(self, field: str) -> None:
        if self.local:
            return
        try:
            found = self.fs.get_file_info(self.bucket).type != pafs.FileType.NotFound
        except OSError as e:
            raise StorageError(f"{field}: {self.uri}: cannot reach the bucket: {e}") from None
        if not found:
            raise StorageError(
                f"{field}: {self.uri}: bucket {self.bucket!r} not found (or not visible with these credentials)"
            )

    def check_readable(self, field: str) -> None:
        """The location exists and can be listed or read."""
        self._check_bucket(field)
        try:
            kind = self._info().type
        except OSError as e:
            raise StorageError(f"{field}: {self.uri}: cannot be read: {e}") from None
        if kind == pafs.FileType.NotFound:
            raise StorageError(f"{field}: {self.uri}: not found")

    def check_writable(self, field: str) -> None:
        """Objects can be written here: on an object store a probe object is written and deleted (nothing
        is left); on local disk the folder, or its nearest existing ancestor, is a writable folder."""
        self._check_bucket(field)
        if self.local:
            existing = Path(self.path)
            if existing.exists() and not existing.is_dir():
                raise StorageError(f"{field}: {self.uri} is a file, not a folder")
            while not existing.exists():
                existing = existing.parent
            if not existing.is_dir():
                raise StorageError(
                    f"{field}: {self.uri} cannot be created: {existing} is a file, not a folder"
                )
            if not os.access(existing, os.W_OK | os.X_OK):
                raise StorageError(
                    f"{field}: {self.uri} cannot be written: no write permission on {existing}"
                )
            return
        probe = self / f".breen-write-probe-{uuid.uuid4().hex[:12]}"
        try:
            probe.write_bytes(b"")
            probe.delete()
        except OSError as e:
            raise StorageError(f"{field}: {self.uri}: cannot write there: {e}") from None


Location = str | Path | Store  # what the project's functions take: a local path, a URI or a Store


def cache_root() -> Path:
    """Where remote folders are fetched to: ``$BREEN_CACHE``, else ``~/.cache/breen``."""
    return Path(os.environ.get("BREEN_CACHE") or Path.home() / ".cache" / "breen")


def fetch_dir(location: Location, field: str = "path", endpoint_override: str | None = None) -> Path:
    """A local folder holding what `location` holds: the folder itself when it is local; for a remote one
    a copy under `cache_root()/fetched/`, fetched once and reused while the remote folder is unchanged
    (the cache key is a checksum of its listing: every file's path, size and modification time)."""
    import hashlib

    store = Store.at(location, field, endpoint_override)
    if store.local:
        return Path(store.path)
    infos = sorted(
        (i for i in store.fs.get_file_info(pafs.FileSelector(store.path, recursive=True))
         if i.type == pafs.FileType.File),
        key=lambda i: i.path,
    )  # fmt: skip
    if not infos:
        raise StorageError(f"{field}: {store.uri}: no files there")
    listing = [(i.path, i.size, i.mtime_ns) for i in infos]
    key = hashlib.sha256(json.dumps([store.uri, listing], default=str).encode()).hexdigest()[:24]
    dest = cache_root() / "fetched" / f"{store.name}-{key}"
    if (dest / ".complete").is_file():
        return dest
    tmp = Path(temporary_name(str(dest)))
    store.download_dir(tmp)
    (tmp / ".complete").write_text(store.uri + "\n")
    try:
        os.replace(tmp, dest)
    except OSError:  # another process fetched it meanwhile: keep theirs
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def fetch_file(location: Location, field: str = "path", endpoint_override: str | None = None) -> Path:
    """A local copy of one file: the file itself when it is local; for a remote one a copy under
    `cache_root()/fetched/`, fetched once and reused while the object is unchanged (size and time)."""
    import hashlib

    store = Store.at(location, field, endpoint_override)
    if store.local:
        return Path(store.path)
    info = store._info()
    if info.type != pafs.FileType.File:
        raise StorageError(f"{field}: {store.uri}: not found")
    key = hashlib.sha256(json.dumps([store.uri, info.size, info.mtime_ns], default=str).encode()).hexdigest()[:24]
    dest = cache_root() / "fetched" / key / store.name
    if not dest.is_file():
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = temporary_name(str(dest))
        with store.fs.open_input_stream(store.path) as src, open(tmp, "wb") as out:
            while block := src.read(1 << 24):
                out.write(block)
        os.replace(tmp, dest)
    return dest
