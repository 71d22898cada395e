"""Atomic file writes: a temporary file in the same folder, fsync, then rename over the target.

An interrupted write never leaves a half-written file; readers see the old file or the new one.
"""
from __future__ import annotations

import contextlib
import os
import tempfile


def write_atomic(path, data) -> str:
    """Write `data` (str or bytes) to `path` atomically, with the permissions a plain open() would give."""
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path
