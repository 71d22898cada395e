"""Atomic writes, the one home for them: a hidden temporary next to the target, fsync, then rename.

An interrupted write never leaves a half-written file or folder; readers see the old one or the new one.
Parent folders are created; errors name the user's path, never a temporary name. Files get the
permissions a plain open() would give (not mkstemp's 0600).

    write_atomic("out/a.json", text)                   # bytes or str
    with atomic_file("out/unet.pt2", suffix=".pt2") as tmp:  # a producer that writes to a path itself
        produce(tmp)
    with atomic_dir("out/bundle") as tmp:               # a whole folder, swapped in at the end
        ...
"""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil


def _parent(path: str) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise OSError(e.errno, f"cannot create the folder for {path}: {e.strerror}", folder) from None
    return folder


def temp_path_for(path: str, suffix: str = "") -> str:
    """Create an empty hidden file next to `path` (same file system, so the final rename is atomic)."""
    path = os.fspath(path)
    folder = _parent(path)
    while True:
        tmp = os.path.join(folder, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp{suffix}")
        try:
            open(tmp, "xb").close()
            return tmp
        except FileExistsError:
            continue
        except OSError as e:
            raise OSError(e.errno, f"cannot write {path}: {e.strerror}", path) from None


def commit(tmp: str, path: str) -> None:
    """fsync `tmp` and rename it over `path`."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


@contextlib.contextmanager
def atomic_file(path, suffix: str = ""):
    """Yield a temporary path next to `path`; on success it replaces `path`, on failure it is removed."""
    path = os.fspath(path)
    tmp = temp_path_for(path, suffix)
    try:
        yield tmp
        commit(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


def write_atomic(path, data) -> str:
    """Write `data` (str or bytes) to `path` atomically."""
    if not isinstance(data, (str, bytes)):
        raise TypeError(f"write_atomic writes str or bytes, got {type(data).__name__}")
    with atomic_file(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
    return os.fspath(path)


@contextlib.contextmanager
def atomic_dir(path):
    """Yield a temporary folder next to `path`; on success it replaces `path` (an older folder there is
    moved aside first, then removed), on failure it is removed."""
    path = os.path.abspath(os.fspath(path))
    _parent(path)
    if os.path.exists(path) and not os.path.isdir(path):
        raise FileExistsError(f"{path} exists and is not a folder")
    tmp = f"{os.path.dirname(path)}/.{os.path.basename(path)}.{secrets.token_hex(6)}.tmp"
    os.makedirs(tmp)
    try:
        yield tmp
        if os.path.isdir(path):
            old = f"{os.path.dirname(path)}/.{os.path.basename(path)}.{secrets.token_hex(6)}.old"
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
