"""Where paths may point: today local (or mounted) file systems only.

Object storage (`s3://`, `gs://`, ...) is not supported yet (issue 16): every path a user gives is checked
here first, so a URI fails at once naming the field instead of being written to a local folder called
`s3:`. Users on clusters mount the bucket or use a ReadWriteMany volume (`docs/cluster.md`).
"""

from __future__ import annotations

import re

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")


def scheme(path: str) -> str | None:
    """The URI scheme of `path` ("s3", "gs", "file", ...), None for a plain path."""
    m = _SCHEME.match(str(path))
    return m.group(1).lower() if m else None


def require_local(path: str | None, field: str) -> str | None:
    """`path` unchanged when it is a local path (a `file://` URI becomes its path); a ValueError naming
    `field` for any other URI."""
    if path is None:
        return None
    kind = scheme(path)
    if kind is None:
        return path
    if kind == "file":
        return str(path)[len("file://") :]
    raise ValueError(
        f"{field}: {path}: {kind}:// is not supported yet, only local or mounted paths (mount the bucket, "
        "or use a ReadWriteMany volume: docs/cluster.md)"
    )
