"""Atomic file writes (write a temporary file in the same folder, then rename) and a locked append."""
from __future__ import annotations

import fcntl
import os

from compiled_unet._atomic import write_atomic  # noqa: F401 - re-exported for the benchmark modules


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
