"""AOTInductor packages cached by content: compiling the same program with the same weights and options again
loads the package from the cache instead of running the passes, lowering and building it again.

Inductor caches what a jit compile makes (FX graphs, C++ kernels), but an AOTInductor compile always lowers the
whole graph and builds one library of all kernels and the wrapper (the tiny preset: 30-45 s with every kernel
already cached), and a frozen package embeds the weights, which Inductor's caches never key. Here the finished
`.pt2` is kept under a key of everything it is a function of. `compiled_unet.compile` takes the key BEFORE its
passes (`compile_key`): on CPU the passes pack every weight (3.4 GB of new memory for SD1.5), so a hit skips
them along with the lowering (SD1.5 32x32 on 2 cores: key ~1 s, then the load; the key after the passes cost
~12 s of packing and a 3.4 GB copy first). The key covers:
  * the program: the code of every graph module, the graph signature, the input/output tree specs, the example
    inputs' metadata, and every weight and constant (name, dtype, shape, stride and bytes: a frozen package holds
    them, so one changed value is another package);
  * the passes (`compile_key`): each one's module and name, and the source of the library and of the passes
    package. A pass that is not one of the library's own functions, or a process that replaced a library or
    torch function (export_cache.process_refusal), is keyed after the passes instead (`package_key`, over the
    optimized program, which needs no pass source);
  * the compile: the Inductor config entries we pass and Inductor's, functorch's global configs (what a user
    set process-wide), torch's version and build, float32 matmul precision and oneDNN switches;
  * the machine: the C++ compiler binary, the CPU's ISA flags and any cap set on them (vec_isa.isa_caps: an
    AVX-512 CPU told to run AVX2 builds other kernels and packs weights in other layouts), the Python version,
    and this module's and the Inductor backend's source (a change to how we compile is a new key);
  * the artifact document stored inside the package (signature, config, options, FreeU scales; before the
    passes, the caller's part of it: the rest is made by the passes from the program).
What is not covered (a tensor subclass or layout we cannot read, a program on a device other than CPU/CUDA)
is simply not cached. A cached package is checked (zip checksums) before its first use, and trusted afterwards
while the file is unchanged (aoti_library's records); a damaged one is removed and compiled again. An entry
copied from a package this process compiled is vouched for once that package's first load has checked it. The
package handed out is a hard link to the entry (a copy across file systems, recorded as verified), so loading
it reads nothing again. Entries live under Inductor's cache
folder (`compiled_unet_packages/`), so a fresh Inductor cache is a cold compile here too, and
`compile(cache_dir=...)` carries them. Kept: the most recently used eight, within COMPILED_UNET_CACHE_MAX_GB
gigabytes (default 8); COMPILED_UNET_PACKAGE_CACHE=0 turns it off.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import ctypes
import hashlib
import inspect
import json
import logging
import os
import shutil
import sys
import time
import zipfile
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.utils._pytree as pytree

from .. import _lru
from .._source import source_digest
from .._atomic import atomic_file
from . import aoti_library
from .aoti_library import KEEP_LIBRARIES, max_cache_bytes
from .vec_isa import compiler_identity, cpu_flags, isa_caps

log = logging.getLogger("compiled_unet")

FOLDER = "compiled_unet_packages"
_SOURCES = (__file__, os.path.join(os.path.dirname(__file__), "inductor.py"))


def enabled() -> bool:
    return os.environ.get("COMPILED_UNET_PACKAGE_CACHE", "1") != "0"


def package_key(ep: torch.export.ExportedProgram, inductor_config: Mapping[str, Any],
                metadata: Mapping[str, str]) -> str | None:
    """The content key of the package `aot_compile(ep, ...)` would write, or None when `ep` holds something
    this key cannot read (then nothing is cached)."""
    h = _toolchain_hash("compiled_unet.package/2", inductor_config, metadata)
    return h.hexdigest()[:40] if _add_program(h, ep) else None


def compile_key(exported: torch.export.ExportedProgram, passes: Sequence[Callable] | None,
                inductor_config: Mapping[str, Any], doc: Mapping[str, Any]) -> str | None:
    """The key of the package that running `passes` on `exported` and AOT-compiling the result makes, taken
    BEFORE the passes: a hit then skips them (on CPU they pack every weight: 3.4 GB of fresh memory for SD1.5)
    along with the lowering. What the package is a function of: `exported` (graph, signature, example inputs,
    every weight's bytes), the passes (each one's name; their code is this library's source and the passes
    package's), the compile (`package_key`'s toolchain and configs) and `doc`, the caller's part of the
    artifact document (config, FreeU scales, options; the rest is made from the program by the passes).
    None when a pass is not one of the library's own module-level functions (a user's pass, a lambda, a
    partial: their code is not ours to key), when this process replaced a library or torch function
    (export_cache.process_refusal), or when `exported` holds what the key cannot read; the compile then keys
    its package by content after the passes (`package_key`)."""
    from .. import export_cache, passes as graph_passes  # passes: the repo's passes/ folder

    refusal = export_cache.process_refusal()
    if refusal is not None:  # e.g. a library function the passes call was replaced: their source is not the code
        log.info("compiled_unet: the package cache keys this compile after its passes (%s)", refusal)
        return None
    names = []
    for p in passes or ():
        module = sys.modules.get(getattr(p, "__module__", None) or "")
        if (not inspect.isfunction(p) or module is None or not module.__name__.startswith(graph_passes.__name__ + ".")
                or getattr(module, p.__name__, None) is not p):
            return None
        names.append(f"{module.__name__}.{p.__qualname__}")
    h = _toolchain_hash("compiled_unet.compile/1", inductor_config, doc)
    h.update(json.dumps([None if passes is None else names, _library_source(),
                         source_digest(os.path.dirname(os.path.abspath(graph_passes.__file__)))]).encode())
    return h.hexdigest()[:40] if _add_program(h, exported) else None


def _library_source() -> str:
    return source_digest(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _toolchain_hash(version: str, inductor_config: Mapping[str, Any], metadata: Mapping[str, Any]):
    """sha256 started with what compiles a package: versions, compiler, CPU, configs, this module's source."""
    from torch._functorch import config as functorch_config
    from torch._inductor import config as inductor_global_config

    h = hashlib.sha256()
    _add(h, version, torch.__version__, torch.version.git_version, sys.version,
         torch.get_float32_matmul_precision(), torch.backends.mkldnn.enabled,
         torch.are_deterministic_algorithms_enabled(), compiler_identity(), cpu_flags(), isa_caps())
    for path in _SOURCES:
        with open(path, "rb") as f:
            h.update(hashlib.sha256(f.read()).digest())
    _add(h, dict(inductor_config), inductor_global_config.save_config_portable(),
         functorch_config.save_config_portable(), dict(metadata))
    return h


def _add(h, *parts) -> None:
    h.update(json.dumps(parts, sort_keys=True, default=repr).encode())
    h.update(b"\0")


def _add_program(h, ep: torch.export.ExportedProgram) -> bool:
    """Add `ep`'s graph, signature, example inputs' metadata and every weight and constant (name, dtype, shape,
    stride and bytes) to `h`; False when it holds what the key cannot read. The tensors are hashed on threads
    (hashlib releases the GIL): SD1.5's 3.4 GB in ~1 s on two cores instead of ~2 s."""
    _add(h, [m.code for m in ep.graph_module.modules() if isinstance(m, torch.fx.GraphModule)],
         str(ep.graph_signature), str(ep.call_spec.in_spec), str(ep.call_spec.out_spec), str(ep.range_constraints))
    leaves = pytree.tree_leaves(ep.example_inputs)
    _add(h, [_meta(v) if isinstance(v, torch.Tensor) else repr(v) for v in leaves])
    tensors = sorted({**ep.state_dict, **ep.constants}.items())
    if not all(isinstance(v, torch.Tensor) for _, v in tensors):
        return False  # a script object: its state is not ours to read

    def digest(value: torch.Tensor) -> bytes | None:
        data = _tensor_bytes(value)
        return None if data is None else hashlib.sha256(data).digest()

    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1))) as pool:
        digests = list(pool.map(digest, (v for _, v in tensors)))
    if any(d is None for d in digests):
        return False
    for (name, value), d in zip(tensors, digests):
        _add(h, name, _meta(value))
        h.update(d)
    return True


def lookup(key: str, package_path: str) -> bool:
    """Put the cached package for `key` at `package_path` (a hard link where the file system allows: no 3.4 GB
    copy for SD1.5; entries are replaced by rename, never rewritten, so the link keeps the bytes it was made
    with); False when there is none (or it was damaged)."""
    entry = _entry(key)
    if not os.path.isfile(entry):
        return False
    if not aoti_library.is_verified(entry):  # read once; afterwards trusted while the file is unchanged
        try:
            with zipfile.ZipFile(entry) as z:
                damaged = z.testzip()
        except (zipfile.BadZipFile, EOFError, OSError) as e:
            damaged = f"{type(e).__name__}: {e}"
        if damaged is not None:
            log.warning("compiled_unet: cached package %s is damaged (%s); compiling again", entry, damaged)
            with contextlib.suppress(OSError):
                os.remove(entry)
            return False
        aoti_library.remember_verified(entry)
    try:
        os.link(entry, package_path)  # the same file: verified as the entry is
    except OSError:  # another file system, or links not allowed
        shutil.copyfile(entry, package_path)
        aoti_library.vouch_for_copy(entry, package_path)  # so loading the copy does not read it all again
    with contextlib.suppress(OSError):  # most recently used: the access time (the modification time is part of
        os.utime(entry, ns=(time.time_ns(), os.stat(entry).st_mtime_ns))  # what says the entry was verified)
    return True


def discard(key: str) -> None:
    """Remove the entry for `key` (found unreadable by its user)."""
    with contextlib.suppress(OSError):
        os.remove(_entry(key))


def store(key: str, package_path: str) -> None:
    """Keep a copy of the package just compiled (failures only cost the next compile its shortcut). The copy is
    vouched for once the package itself has been loaded and verified (`vouch_for_stored`)."""
    entry = _entry(key)
    try:
        _prune(os.path.dirname(entry), incoming_bytes=os.path.getsize(package_path))
        with atomic_file(entry) as tmp:
            shutil.copyfile(package_path, tmp)
    except OSError as e:
        log.warning("compiled_unet: could not cache the package in %s (%s)", entry, e)
        return
    _stored_from[os.path.realpath(package_path)] = entry


# {package just compiled: its cache entry, a byte copy this process made}, until the package's first load.
_stored_from: dict[str, str] = {}


def vouch_for_stored(package_path: str) -> None:
    """After the first load of a package just compiled (which checked its library bytes): record the cache entry
    copied from it as verified too, so that the entry's first reuse does not read it all again (SD1.5: ~3 s).
    `vouch_for_copy` vouches only while the package is verified as it is now and both hold the same library."""
    entry = _stored_from.pop(os.path.realpath(package_path), None)
    if entry is not None and os.path.isfile(entry):
        aoti_library.vouch_for_copy(package_path, entry)


def folder() -> str:
    """Where the packages are kept: inside Inductor's cache folder (a fresh one is a cold compile here too)."""
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return os.path.join(cache_dir(), FOLDER)


def _entry(key: str) -> str:
    return os.path.join(folder(), key + ".pt2")


def _prune(root: str, incoming_bytes: int) -> None:
    """Keep the most recently used packages within KEEP_LIBRARIES and max_cache_bytes(), room made for one of
    `incoming_bytes`."""
    _lru.prune(root, ".pt2", KEEP_LIBRARIES, max_cache_bytes(), incoming_bytes)


def _meta(t: torch.Tensor) -> list:
    return [str(t.dtype), list(t.shape), list(t.stride()) if t.layout == torch.strided else None, str(t.layout),
            t.device.type]


def _tensor_bytes(t: torch.Tensor) -> memoryview | None:
    """The tensor's values as bytes (row-major), or None for what we cannot read (subclasses, sparse, meta)."""
    if type(t) not in (torch.Tensor, torch.nn.Parameter) or t.device.type not in ("cpu", "cuda"):
        return None
    t = t.detach()
    if t.is_mkldnn:
        t = t.to_dense()  # oneDNN-packed weights: their logical values (the packing follows from them + the ISA)
    elif t.layout != torch.strided:
        return None
    t = t.cpu().contiguous().reshape(-1)
    if not t.numel():
        return memoryview(b"")
    # Not `t.numpy()`: a numpy view marks the storage as not resizable for good, and a model given to
    # `compile(..., donate_weights=True)` could then not be freed. The array keeps `t` alive while it is read.
    data = (ctypes.c_char * (t.numel() * t.element_size())).from_address(t.data_ptr())
    data.tensor = t
    return memoryview(data).cast("B")
