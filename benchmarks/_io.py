"""Atomic file writes (write a temporary file in the same folder, then rename) and a locked append."""
from __future__ import annotations

import fcntl
import os

from compiled_unet._atomic import write_atomic  # noqa: F401 - re-exported for the benchmark modules


def insert_row(text: str, header: str, row: str) -> str:
    """`text` with `row` added as the last row of the table that `header` ends with (the table may sit
    above other sections); `header` appended first when that table is not there yet."""
    table_head = next(line for line in reversed(header.strip().splitlines()) if not line.startswith("|---"))
    lines = text.splitlines()
    if table_head not in lines:
        return text + header + row.rstrip("\n") + "\n"
    end = lines.index(table_head) + 1
    while end < len(lines) and lines[end].startswith("|"):
        end += 1
    return "\n".join(lines[:end] + [row.rstrip("\n")] + lines[end:]) + "\n"


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
        write_atomic(path, insert_row(text, header, row))
    return path
