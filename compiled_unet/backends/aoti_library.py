"""Load a CPU AOTInductor package without unpacking it on every load.

torch's loader (`aoti_load_package`) extracts the `.pt2` into a fresh temporary folder on each load and dlopens
the compiled library from there. A frozen CPU package keeps its weights inside that library (appended, then
mmapped), so each SD1.5 load wrote 3.4 GB, after our integrity check had read them once already (9.8 s).

Here the library is extracted once per content into a cache folder (its zip checksum verified while extracting,
written atomically) and every later load dlopens it from there; the weights are then mmapped from one file
that all processes loading the package share. A package file is trusted without reading it again only while
its identity (device, inode, size, modification time) is the one recorded when its library's bytes were last
verified (a rename keeps it); a copy, a rewrite or a new download is verified again (a read, no write), except
a copy this library made itself of a verified file (`vouch_for_copy`: `save` of a loaded package, the package
cache), which is recorded as verified when made.

    model = load_library_model(path)   # None: a layout this fast path does not handle (use aoti_load_package)
    model(*args, **kwargs); model.get_constant_fqns(); model.load_constants({...}, check_full_update=False)
    shutil.copyfile(src, dst); vouch_for_copy(src, dst)   # dst's first load skips the checksum read

Cache: $COMPILED_UNET_CACHE_DIR/aoti, default ~/.cache/compiled_unet/aoti (must allow executing mapped files).
The most recently used libraries are kept, at most eight and at most $COMPILED_UNET_CACHE_MAX_GB gigabytes
(default 8: two SD1.5 packages); the library just loaded is always kept, however large.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import time
import warnings
import zipfile

import torch
import torch.utils._pytree as pytree

from .._atomic import atomic_file, write_atomic
from ..errors import DamagedArtifact

KEEP_LIBRARIES = 8
DEFAULT_MAX_GB = 8.0  # a frozen SD1.5 package's library is 3.4 GB, SDXL's 10 GB: a count alone filled disks
_CHUNK = 1 << 24
# Members a CPU package may hold besides its one library; anything else (CUDA kernel binaries, weights stored
# outside the library, custom objects) means torch's own loader must read the package.
_PLAIN_SUFFIXES = (".json", ".cpp", ".h", ".txt")  # and extension-less bookkeeping (version, byteorder)


def cache_root() -> str:
    base = os.environ.get("COMPILED_UNET_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "compiled_unet")
    return os.path.join(base, "aoti")


def load_library_model(path: str) -> "LibraryModel | None":
    """The package's model, run from the cached library; None when the package is not a plain CPU package."""
    if not hasattr(torch._C._aoti, "AOTIModelContainerRunnerCpu"):
        return None
    with zipfile.ZipFile(path) as z:
        member = _library_member(z)
        if member is None:
            return None
        key = _member_key(member)
        library = os.path.join(cache_root(), "lib", key, "model.so")
        if os.path.exists(library) and is_verified(path, key):
            if (_seen(_identity(path)) or {}).get("path") != os.path.realpath(path):
                with contextlib.suppress(OSError):
                    _remember(path, key)  # renamed since (save writes a temporary): the record follows the name
        else:
            try:
                _verify_or_extract(path, z, member, library)
                _remember(path, key)
            except zipfile.BadZipFile as e:
                raise DamagedArtifact(f"{path}: damaged .pt2 package ({e})") from None
            except OSError as e:  # e.g. a read-only home: torch's loader extracts into a temporary folder
                warnings.warn(f"compiled_unet: cannot cache the compiled library of {path} under {cache_root()} "
                              f"({e}); loading it with torch's loader (slower). Set COMPILED_UNET_CACHE_DIR to a "
                              f"writable folder.", RuntimeWarning, stacklevel=3)
                return None
    with contextlib.suppress(OSError):
        os.utime(os.path.dirname(library))  # most recently used: the pruning of other loads keeps it
    return LibraryModel(library)


def library_key(path: str) -> str | None:
    """The cache key of the one library in the package at `path` (read from the zip directory, not the bytes);
    None when it is not a plain CPU package or not a zip at all."""
    try:
        with zipfile.ZipFile(path) as z:
            member = _library_member(z)
    except (zipfile.BadZipFile, EOFError, OSError):
        return None
    return None if member is None else _member_key(member)


def is_verified(path: str, key: str | None = None) -> bool:
    """Whether the library bytes of the file at `path` were checked (or copied from checked bytes) as it is now:
    same device, inode, size and modification time as recorded then, and the library `key` (default: read)."""
    key = key or library_key(path)
    try:
        identity = _identity(path)
        record = _seen(identity)
    except OSError:
        return False
    return key is not None and record is not None and all(record.get(k) == v for k, v in {**identity, "key": key}.items())


def remember_verified(path: str) -> None:
    """Record that the library bytes of `path`, as the file is now, were just checked by the caller."""
    key = library_key(path)
    if key is not None:
        with contextlib.suppress(OSError):
            _remember(path, key)


def vouch_for_copy(src: str, dst: str) -> bool:
    """Record `dst`, a copy this process has just made of `src` (the file, or its members copied with their
    checksums checked on the way), as verified when `src` is verified: its first load then trusts it without
    reading its library again (SD1.5: a 3.4 GB checksum read, ~3 s). A copy made by anyone else (cp, a download)
    is a file we have not seen, and is read once. Returns whether it did."""
    key = library_key(src)
    if key is None or not is_verified(src, key) or library_key(dst) != key:
        return False
    with contextlib.suppress(OSError):
        _remember(dst, key)
        return True
    return False


class LibraryModel:
    """The part of torch's `AOTICompiledModel` we use, over torch's CPU container runner of one library."""

    def __init__(self, library: str):
        self.library = library
        self.runner = torch._C._aoti.AOTIModelContainerRunnerCpu(library, 1)
        in_spec, out_spec = self.runner.get_call_spec()
        self._in_spec, self._out_spec = pytree.treespec_loads(in_spec), pytree.treespec_loads(out_spec)
        self._internal_name = {fqn: name for name, fqn in self.runner.get_constant_names_to_original_fqns().items()}
        self.released_bytes = _release_clean_pages(library)

    def __call__(self, *args, **kwargs):
        from torch.export._tree_utils import reorder_kwargs
        flat = pytree.tree_flatten((args, reorder_kwargs(kwargs, self._in_spec)))[0]
        outputs = self.runner.run([x for x in flat if isinstance(x, torch.Tensor)])
        return pytree.tree_unflatten(outputs, self._out_spec)

    def get_constant_fqns(self) -> list[str]:
        return list(self._internal_name)

    def load_constants(self, tensors, *, check_full_update: bool) -> None:
        unknown = sorted(set(tensors) - set(self._internal_name))
        if unknown:
            raise KeyError(f"constants not held by the package: {unknown[:5]}")
        self.runner.update_constant_buffer({self._internal_name[k]: v for k, v in tensors.items()},
                                           False, check_full_update)


def _release_clean_pages(library: str) -> int:
    """Drop this process's mapped pages of `library`'s weights once the runner has copied what it packs.

    The runner copies every oneDNN-packed weight out of the mapped library into memory of its own, so right after
    loading the process holds the weights twice (SD1.5: 7.0 GB resident for 3.4 GB). The mapped copy is clean
    file memory; dropping it (MADV_DONTNEED) leaves it in the page cache, and the few weights still read from
    the mapping (biases, norms) fault back in from the file. Only mappings nobody wrote to are dropped (a private
    page that was written would lose its content). Returns the bytes released (0 where unsupported)."""
    if not os.path.exists("/proc/self/smaps"):
        return 0
    import ctypes
    regions, current = [], None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5:
                current = None
                if len(head) >= 6 and os.path.realpath(head[5]) == os.path.realpath(library):
                    start, end = (int(x, 16) for x in head[0].split("-"))
                    current = [start, end, 0, 0]
                    regions.append(current)
            elif current is not None and head[0] in ("Private_Dirty:", "Rss:"):
                current[2 if head[0] == "Rss:" else 3] = int(head[1]) * 1024
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    released = 0
    for start, end, rss, dirty in regions:
        if end - start >= 64 << 20 and dirty == 0 and libc.madvise(start, end - start, 4) == 0:  # MADV_DONTNEED
            released += rss
    return released


def _library_member(z: zipfile.ZipFile) -> zipfile.ZipInfo | None:
    files = [i for i in z.infolist() if not i.is_dir()]
    libraries = [i for i in files if i.filename.endswith(".so")]
    plain = all(i in libraries or i.filename.endswith(_PLAIN_SUFFIXES) or "." not in os.path.basename(i.filename)
                for i in files)
    if len(libraries) != 1 or not plain:
        return None
    return libraries[0]


def _verify_or_extract(path: str, z: zipfile.ZipFile, member: zipfile.ZipInfo, library: str) -> None:
    """Check the library's bytes in `path` against the zip checksum; extract them if the cache lacks them."""
    if os.path.exists(library):
        with z.open(member) as src:
            while src.read(_CHUNK):  # zipfile raises BadZipFile at the end if the CRC-32 differs
                pass
        return
    lib_root = os.path.dirname(os.path.dirname(library))
    os.makedirs(lib_root, exist_ok=True)
    _prune(lib_root, incoming_bytes=member.file_size)  # room first: the new library may not fit beside the old
    os.makedirs(os.path.dirname(library), exist_ok=True)
    with atomic_file(library, suffix=".so") as tmp, z.open(member) as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst, _CHUNK)  # zipfile checks the CRC when the member ends
    _prune(lib_root, keep=os.path.basename(os.path.dirname(library)))


def _member_key(member: zipfile.ZipInfo) -> str:
    return hashlib.sha256(f"{member.filename}:{member.CRC:08x}:{member.file_size}".encode()).hexdigest()[:32]


def _identity(path: str) -> dict:
    # What a rewrite, a copy or a new download changes; a rename keeps it (the same bytes under a new name:
    # `save` writes a temporary and renames it into place).
    st = os.stat(path)
    return {"dev": st.st_dev, "ino": st.st_ino, "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def _record_path(identity: dict) -> str:
    name = hashlib.sha256(f"{identity['dev']}:{identity['ino']}".encode()).hexdigest()[:32]
    return os.path.join(cache_root(), "seen", name + ".json")


def _seen(identity: dict) -> dict | None:
    try:
        with open(_record_path(identity)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _remember(path: str, key: str) -> None:
    identity = _identity(path)
    write_atomic(_record_path(identity), json.dumps({**identity, "key": key, "path": os.path.realpath(path)}))


def max_cache_bytes() -> int:
    raw = os.environ.get("COMPILED_UNET_CACHE_MAX_GB", "")
    try:
        gb = float(raw) if raw else DEFAULT_MAX_GB
    except ValueError:  # a cache size is not worth failing a load for, but it is worth saying
        warnings.warn(f"compiled_unet: COMPILED_UNET_CACHE_MAX_GB={raw!r} is not a number of gigabytes (e.g. 8 or "
                      f"20.5); using {DEFAULT_MAX_GB:g}", RuntimeWarning, stacklevel=2)
        gb = DEFAULT_MAX_GB
    return int(gb * 1e9)


def _prune(lib_root: str, incoming_bytes: int = 0, keep: str | None = None) -> None:
    """Keep the most recently used libraries within KEEP_LIBRARIES and max_cache_bytes(), counting
    `incoming_bytes` of a library about to be written; `keep` (the one just written) always stays.
    A process that mapped a removed library keeps it until it exits."""
    entries = []
    for name in os.listdir(lib_root):
        with contextlib.suppress(OSError):
            folder = os.path.join(lib_root, name)
            size = sum(os.path.getsize(os.path.join(folder, f)) for f in os.listdir(folder))
            entries.append((name == keep, os.stat(folder).st_mtime, size, name))
    budget, count = max_cache_bytes() - incoming_bytes, KEEP_LIBRARIES - (1 if incoming_bytes else 0)
    for kept, _, size, name in sorted(entries, reverse=True):  # the one to keep first, then newest first
        if kept or (count > 0 and size <= budget):
            budget, count = budget - size, count - 1
        else:
            budget = -1  # older libraries than one that does not fit go too: strictly most recently used
            shutil.rmtree(os.path.join(lib_root, name), ignore_errors=True)
    seen = os.path.join(os.path.dirname(lib_root), "seen")
    for name in os.listdir(seen) if os.path.isdir(seen) else ():
        # A record names the file it was written for; one whose file is gone or replaced goes after a day (a
        # record written for a temporary that was then renamed into place is rewritten by its first load).
        record = os.path.join(seen, name)
        with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
            if time.time() - os.path.getmtime(record) < 86400:
                continue
            with open(record) as f:
                entry = json.load(f)
            try:
                st = os.stat(entry["path"])
                current = (st.st_dev, st.st_ino) == (entry["dev"], entry["ino"])
            except OSError:
                current = False
            if not current:
                os.remove(record)
