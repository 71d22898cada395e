"""Inductor's CPU SIMD probe, done once per machine instead of once per process.

Before its first C++ kernel, every process Inductor compiles in checks each SIMD ISA the CPU lists (AMX,
AVX-512 VNNI, AVX-512, AVX2 on a recent Xeon) by building a test library (cached on disk) and starting a child
Python per ISA that loads it: ~1 s per ISA, 4.3 s of a 31 s warm SD1.5 compile on a 2-core Intel Xeon
(benchmarks/NOTES.md). The build is cached; the loads are not.

Here the first process runs Inductor's own probe and records, in Inductor's cache folder, whether every listed
ISA passed, under a key of what the result depends on (torch, the C++ compiler binary, the CPU's ISA flags).
When it did, compiles set `cpp.vec_isa_ok=True`, which makes Inductor trust the CPU's flags without probing
and so pick exactly the ISA list the probe gave. When an ISA failed the probe (an old compiler, a kernel that
disables AVX-512), nothing is set and Inductor probes as before. The cold process sets the entry too, so the
cache keys of cold and warm processes agree. A compile starts the probe in a background thread
(`start_probe`) so that a first process overlaps it with the export and the passes.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import sys
import threading

import torch

from .._atomic import write_atomic

log = logging.getLogger("compiled_unet")


_probe_lock = threading.Lock()
_probe_thread: threading.Thread | None = None


def vec_isa_config() -> dict:
    """{"cpp.vec_isa_ok": True} when every SIMD ISA this CPU lists passed Inductor's probe on this machine
    (probing and recording it the first time); {} elsewhere (not x86-64 Linux, or an ISA failed)."""
    from torch._inductor import cpu_vec_isa

    found = _record_key()
    if found is None:
        return {}
    key, compiler, listed = found
    record = _record_path(key)
    try:
        with open(record) as f:
            all_valid = json.load(f)["all_valid"] is True
    except (OSError, ValueError, KeyError, TypeError):
        _wait_for_probe()
        valid = [str(isa) for isa in cpu_vec_isa.valid_vec_isa_list()]  # Inductor's probe, once per process
        all_valid = valid == listed
        write_atomic(record, json.dumps({"listed": listed, "valid": valid, "all_valid": all_valid,
                                         "torch": torch.__version__, "compiler": compiler}))
    return {"cpp.vec_isa_ok": True} if all_valid else {}


def start_probe() -> None:
    """Start Inductor's probe in a background thread when this machine has no record of it yet, so that its
    compiler runs and child processes (~4-5 s on 2 cores) overlap the export and the passes; `vec_isa_config`
    waits for it. Nothing to do when the record exists or the probe has run in this process."""
    global _probe_thread
    found = _record_key()
    if found is None or os.path.exists(_record_path(found[0])):
        return
    from torch._inductor import cpu_vec_isa

    def probe():
        try:
            cpu_vec_isa.valid_vec_isa_list()     # functools.cache: the main thread's call then returns at once
        except Exception as e:   # noqa: BLE001 - the main thread's own call raises it again, in context
            log.debug("background SIMD probe failed (%s)", e)

    with _probe_lock:
        if _probe_thread is None:
            _probe_thread = threading.Thread(target=probe, name="compiled_unet-simd-probe", daemon=True)
            _probe_thread.start()


def _wait_for_probe() -> None:
    with _probe_lock:
        thread = _probe_thread
    if thread is not None:
        thread.join()


def _record_key() -> tuple[str, str, list[str]] | None:
    """(record key, compiler path, listed ISAs); None where no record applies (not x86-64 Linux, the user set
    the ISA, no compiler)."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return None
    from torch._inductor import config, cpu_vec_isa

    if config.cpp.vec_isa_ok is not None or config.cpp.simdlen is not None:
        return None  # the user decided; leave Inductor's choice alone
    flags = cpu_vec_isa.x86_isa_checker()
    listed = [str(isa) for isa in cpu_vec_isa.supported_vec_isa_list
              if all(flag in flags for flag in str(isa).split())]
    identity = compiler_identity()
    if identity is None:  # no compiler found: Inductor's own error is the clear one
        return None
    key = hashlib.sha256(json.dumps([torch.__version__, *identity, sorted(flags), listed]).encode()).hexdigest()[:32]
    return key, identity[0], listed


def _record_path(key: str) -> str:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return os.path.join(cache_dir(), "compiled_unet_vec_isa", key + ".json")


def compiler_identity() -> tuple[str, int, int] | None:
    """(path, size, modification time) of the C++ compiler Inductor runs, or None when there is none: what
    records of compiled results are keyed by (another compiler binary is another key)."""
    try:
        from torch._inductor.cpp_builder import get_cpp_compiler

        compiler = os.path.realpath(shutil.which(get_cpp_compiler()) or get_cpp_compiler())
        stat = os.stat(compiler)
    except Exception as e:  # noqa: BLE001 - whatever Inductor raises without a compiler
        log.debug("no C++ compiler identity (%s)", e)
        return None
    return compiler, stat.st_size, stat.st_mtime_ns


def cpu_flags() -> list[str]:
    """The CPU's SIMD flags as Inductor reads them (sorted), or [] where it cannot (not x86): part of what keys
    records of machine-specific results (packages, the linear kernel choice)."""
    try:
        from torch._inductor import cpu_vec_isa

        return sorted(cpu_vec_isa.x86_isa_checker())
    except Exception:  # not x86, or a torch without the checker: the compiler and torch still key the entry
        return []


# Settings that cap the ISA torch's libraries run below what the CPU lists: ATen's dispatch and Inductor's C++
# kernels (ATEN_CPU_CAPABILITY), oneDNN's kernels and weight layouts, MKL's code path. The same CPU under a cap
# runs other kernels and packs weights in other layouts, so a record of machine-specific results keys them too.
ISA_CAP_VARIABLES = ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "DNNL_MAX_CPU_ISA", "ONEDNN_CPU_ISA_HINTS",
                     "DNNL_CPU_ISA_HINTS", "MKL_ENABLE_INSTRUCTIONS", "MKL_DEBUG_CPU_TYPE")


def isa_cap_settings() -> dict[str, str]:
    """{variable: value} of the ISA caps set in this process's environment."""
    return {k: os.environ[k] for k in ISA_CAP_VARIABLES if os.environ.get(k)}


def isa_caps() -> dict[str, str]:
    """`isa_cap_settings()` plus the ISA ATen dispatches to: what keys records of machine-specific results."""
    caps = isa_cap_settings()
    capability = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", None)
    if capability is not None:
        caps["aten"] = capability()
    return caps
