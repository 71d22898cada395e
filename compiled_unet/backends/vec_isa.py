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
cache keys of cold and warm processes agree.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import sys

import torch

from .._atomic import write_atomic

log = logging.getLogger("compiled_unet")


def vec_isa_config() -> dict:
    """{"cpp.vec_isa_ok": True} when every SIMD ISA this CPU lists passed Inductor's probe on this machine
    (probing and recording it the first time); {} elsewhere (not x86-64 Linux, or an ISA failed)."""
    if sys.platform != "linux" or platform.machine() != "x86_64":
        return {}
    from torch._inductor import config, cpu_vec_isa
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    if config.cpp.vec_isa_ok is not None or config.cpp.simdlen is not None:
        return {}  # the user decided; leave Inductor's choice alone
    flags = cpu_vec_isa.x86_isa_checker()
    listed = [str(isa) for isa in cpu_vec_isa.supported_vec_isa_list
              if all(flag in flags for flag in str(isa).split())]
    identity = compiler_identity()
    if identity is None:  # no compiler found: Inductor's own error is the clear one
        return {}
    compiler = identity[0]
    key = hashlib.sha256(json.dumps([torch.__version__, *identity, sorted(flags), listed]).encode()).hexdigest()[:32]
    record = os.path.join(cache_dir(), "compiled_unet_vec_isa", key + ".json")
    try:
        with open(record) as f:
            all_valid = json.load(f)["all_valid"] is True
    except (OSError, ValueError, KeyError, TypeError):
        valid = [str(isa) for isa in cpu_vec_isa.valid_vec_isa_list()]  # Inductor's probe, once per process
        all_valid = valid == listed
        write_atomic(record, json.dumps({"listed": listed, "valid": valid, "all_valid": all_valid,
                                         "torch": torch.__version__, "compiler": compiler}))
    return {"cpp.vec_isa_ok": True} if all_valid else {}


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
