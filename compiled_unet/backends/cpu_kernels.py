"""Which kernel runs a UNet's token-wise linear layers faster on this CPU: oneDNN (as 1x1 convolutions) or MKL's
packed GEMM, measured once per machine.

Neither wins everywhere (benchmarks/NOTES.md): on an AMD EPYC the 1x1 convolutions ran SD1.5's transformer GEMMs
1.4x faster than MKL; on an Intel Xeon MKL's packed GEMM ran them ~13% faster than the convolutions, the gap by
which the freezing recipe (MKL for linears) beat our graph there. The answer is a property of the CPU and the
libraries, not of a machine's name: the first compile on a machine times both kernels on four SD1.5 linear shapes
(interleaved, medians, ~0.2 s) and records the winner in Inductor's cache folder under a key of what it depends
on (torch's version, the CPU's model, ISA flags and ISA caps, torch's thread count). MKL is chosen only when it
is at least 5% faster, so a noisy measurement between two equal kernels keeps the default (oneDNN). The record
is written once; delete it (or set `InductorOptions(linear_kernel=...)`) to decide otherwise.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import statistics
import time

import torch

from .._atomic import write_atomic
from .vec_isa import cpu_flags, isa_caps

log = logging.getLogger("compiled_unet")

KERNELS = ("onednn", "mkl")
MKL_MARGIN = 0.95  # MKL must take at most this fraction of oneDNN's time to be chosen
# (rows, in, out): SD1.5 at 32x32 latents: 256 tokens x 640 (fused QKV), 64 x 1280, 1024 x 320, 256 x 2560 -> 640.
_SHAPES = ((256, 640, 1920), (64, 1280, 1280), (1024, 320, 320), (256, 2560, 640))


def mkl_available() -> bool:
    return torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")


@functools.cache
def mkl_packed_op_runs() -> bool:
    """Whether the jit graph's MKL linear (passes/prepack_mkl_linear.py's custom op) runs here: torch < 2.13's
    custom-op wrapper reads every argument's storage to check aliasing and refuses MKL's packed (opaque) weight
    ("Cannot access storage of OpaqueTensorImpl", seen on torch 2.9). Tried once on a 2x4 linear."""
    if not mkl_available():
        return False
    from .. import passes  # noqa: F401  (registers compiled_unet::mkl_linear)

    x, w = torch.randn(2, 4), torch.randn(3, 4)
    try:
        y = torch.ops.compiled_unet.mkl_linear(x, torch.ops.mkl._mkl_reorder_linear_weight(w, 2), w, None)
    except (NotImplementedError, RuntimeError) as e:
        log.info("compiled_unet: MKL's packed linear cannot run as a graph op in this torch (%s); oneDNN instead", e)
        return False
    return torch.allclose(y, x @ w.T, rtol=1e-4, atol=1e-5)


@functools.cache
def faster_linear_kernel() -> str:
    """'mkl' or 'onednn' for float32 linears on this CPU (measured the first time on this machine, then read)."""
    if not (mkl_available() and torch.backends.mkldnn.is_available()):
        return "onednn" if torch.backends.mkldnn.is_available() else "mkl"
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    identity = [torch.__version__, _cpu_model(), cpu_flags(), isa_caps(), torch.get_num_threads()]
    key = hashlib.sha256(json.dumps(identity).encode()).hexdigest()[:32]
    record = os.path.join(cache_dir(), "compiled_unet_linear_kernel", key + ".json")
    try:
        with open(record) as f:
            kernel = json.load(f)["kernel"]
        if kernel in KERNELS:
            return kernel
    except (OSError, ValueError, KeyError, TypeError):
        pass
    times = measure_linear_kernels()
    kernel = "mkl" if times["mkl"] <= MKL_MARGIN * times["onednn"] else "onednn"
    log.info("compiled_unet: linear kernel for this CPU: %s (ms over %d shapes: %s)", kernel, len(_SHAPES), times)
    try:
        write_atomic(record, json.dumps({"kernel": kernel, "ms": times, "identity": identity}))
    except OSError as e:  # the choice stands for this process; the next one measures again
        log.warning("compiled_unet: could not record the linear kernel choice in %s (%s)", record, e)
    return kernel


def measure_linear_kernels(rounds: int = 7) -> dict[str, float]:
    """Median milliseconds, summed over the probe shapes, of MKL's packed GEMM and a packed oneDNN 1x1
    convolution computing the same float32 linear (interleaved rounds after two warm-up calls)."""
    total = {k: 0.0 for k in KERNELS}
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for rows, cin, cout in _SHAPES:
            x, w, b = (torch.randn(*s, generator=gen) for s in ((rows, cin), (cout, cin), (cout,)))
            packed = torch.ops.mkl._mkl_reorder_linear_weight(w, rows)
            x4 = x.t().reshape(1, cin, rows, 1).contiguous(memory_format=torch.channels_last)
            w4 = torch.ops.mkldnn._reorder_convolution_weight(w.reshape(cout, cin, 1, 1), [0, 0], [1, 1], [1, 1], 1,
                                                              [1, cin, rows, 1])
            calls = {"mkl": lambda: torch.ops.mkl._mkl_linear(x, packed, w, b, rows),
                     "onednn": lambda: torch.ops.mkldnn._convolution_pointwise(x4, w4, b, [0, 0], [1, 1], [1, 1], 1,
                                                                             "none", [], "")}
            samples = {k: [] for k in KERNELS}
            for _ in range(2):
                for call in calls.values():
                    call()
            for _ in range(rounds):
                for k, call in calls.items():
                    t0 = time.perf_counter()
                    call()
                    samples[k].append(time.perf_counter() - t0)
            for k in KERNELS:
                total[k] += statistics.median(samples[k]) * 1e3
    return {k: round(v, 3) for k, v in total.items()}


def _cpu_model() -> str:
    found = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "vendor_id")):
                    found.setdefault(line.split(":", 1)[0].strip(), line.split(":", 1)[1].strip())
    except OSError:
        pass
    return " / ".join(found[k] for k in sorted(found))
