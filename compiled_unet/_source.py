"""`source_digest`: one digest of a package's Python files, for cache keys that must change with the code."""
from __future__ import annotations

import functools
import hashlib
import os


@functools.lru_cache(maxsize=None)
def source_digest(root: str) -> str:
    """sha256 over every .py file under `root` (relative path and bytes, in sorted order; caches skipped)."""
    h = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "__pycache__")))
        for name in sorted(f for f in filenames if f.endswith(".py")):
            path = os.path.join(dirpath, name)
            h.update(os.path.relpath(path, root).encode() + b"\0")
            with open(path, "rb") as f:
                h.update(f.read())
    return h.hexdigest()
