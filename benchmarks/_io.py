"""Atomic file writes (write a temporary file in the same folder, then rename) and a locked append."""
from __future__ import annotations

import contextlib
import fcntl
import os
import tempfile


def write_atomic(path: str, data: str | bytes) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return path


def append_row_atomic(path: str, header: str, row: str) -> str:
    """Append one line to a Markdown file (creating it with `header`), atomically and under a file lock,
    so concurrent benchmark runs neither lose rows nor leave a half-written file."""
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, f".{os.path.basename(path)}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            with open(path) as f:
                text = f.read()
        except FileNotFoundError:
            text = header
        if text and not text.endswith("\n"):
            text += "\n"
        write_atomic(path, text + row.rstrip("\n") + "\n")
    return path
