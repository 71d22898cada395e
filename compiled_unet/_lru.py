"""Least-recently-used pruning of a cache folder, the one home for it (packages, exported graphs).

    prune(folder, ".pt2", keep=8, max_bytes=8 << 30, incoming_bytes=n)   # before storing an entry of n bytes

Recency is max(atime, mtime): readers `os.utime` an entry they use. Another process may remove entries first;
every filesystem error is ignored (pruning is housekeeping, never a reason to fail a compile).
"""
from __future__ import annotations

import contextlib
import os


def prune(root: str, suffix: str, keep: int, max_bytes: float = float("inf"), incoming_bytes: int = 0) -> None:
    """Keep the most recently used `*suffix` files of `root` (hidden temporaries aside) within `keep` files and
    `max_bytes`, room made for one more of `incoming_bytes`: strictly most recently used, so nothing older than
    an entry that does not fit stays."""
    entries = []
    for name in os.listdir(root) if os.path.isdir(root) else ():
        with contextlib.suppress(OSError):
            st = os.stat(os.path.join(root, name))
            if name.endswith(suffix) and not name.startswith("."):
                entries.append((max(st.st_atime, st.st_mtime), st.st_size, name))
    budget, count = max_bytes - incoming_bytes, keep - 1
    for _, size, name in sorted(entries, reverse=True):
        if count > 0 and size <= budget:
            budget, count = budget - size, count - 1
        else:
            budget = -1
            with contextlib.suppress(OSError):
                os.remove(os.path.join(root, name))
