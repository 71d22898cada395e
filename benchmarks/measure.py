"""Measurements: interleaved timing rounds, per-forward peak memory, relative error, matmul peak, machine."""
from __future__ import annotations

import math
import os
import platform
import statistics
import time
from typing import Callable

import torch

Forward = Callable[[], torch.Tensor]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_rounds(fns: dict[str, Forward], rounds: int, device: torch.device, inner: int = 1) -> dict[str, list[float]]:
    """Seconds per forward for each variant: `rounds` rounds, each timing every variant once (mean of
    `inner` back-to-back calls between synchronizations), the order rotated every round so that no
    variant always runs right after the same neighbour (caches, clocks, other processes)."""
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    with torch.no_grad():
        for r in range(rounds):
            k = r % len(names)
            for name in names[k:] + names[:k]:
                fn = fns[name]
                sync(device)
                t0 = time.perf_counter()
                for _ in range(inner):
                    fn()
                sync(device)
                times[name].append((time.perf_counter() - t0) / inner)
    return times


def summarize(seconds: list[float]) -> dict:
    ms = [s * 1e3 for s in seconds]
    return {"median_ms": statistics.median(ms), "min_ms": min(ms), "max_ms": max(ms), "n": len(ms)}


MEMORY_METHOD = {
    "cpu": "peak bytes live in torch's CPU allocator during one forward, above the level at its start "
           "(torch.profiler profile_memory allocation events; activations and workspaces, not weights; "
           "oneDNN/MKL-internal scratch is not seen)",
    "cuda": "torch.cuda.max_memory_allocated during one forward minus memory_allocated before it "
            "(activations and workspaces; CUDA-graph pools are allocated at capture, so a replay shows ~0: "
            "see held_bytes for what each variant keeps resident)",
}


def peak_forward_bytes(fn: Forward, device: torch.device) -> int:
    """Peak extra memory of one forward (see MEMORY_METHOD)."""
    if device.type == "cuda":
        sync(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        with torch.no_grad():
            fn()
        sync(device)
        return int(torch.cuda.max_memory_allocated(device) - base)
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof, torch.no_grad():
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        live += e.nbytes()
        peak = max(peak, live)
    return int(peak)


def rel_l2(out: torch.Tensor, ref: torch.Tensor) -> float:
    """||out - ref|| / ||ref|| in float64 (inf when the output is not finite)."""
    out, ref = out.detach().double().cpu(), ref.detach().double().cpu()
    if out.shape != ref.shape:
        raise ValueError(f"output shape {tuple(out.shape)} != reference {tuple(ref.shape)}")
    if not torch.isfinite(out).all():
        return math.inf
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def matmul_peak(device: torch.device, dtype: torch.dtype, n: int | None = None, repeats: int = 5) -> dict:
    """Best-of GFLOP/s of one large square matmul: the machine's practical dense peak for this dtype."""
    n = n or (8192 if device.type == "cuda" else 2048)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = math.inf
    with torch.no_grad():
        torch.mm(a, b)
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            torch.mm(a, b)
            sync(device)
            best = min(best, time.perf_counter() - t0)
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "gflops": 2 * n**3 / best / 1e9, "seconds": best}


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> dict:
    info = {"cpu": _cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform()}
    try:
        info["load_avg_1m"] = os.getloadavg()[0]
    except OSError:
        pass
    try:
        import diffusers

        info["diffusers"] = diffusers.__version__
    except ImportError:
        info["diffusers"] = None
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
        info["cuda"] = torch.version.cuda
        try:
            import triton

            info["triton"] = triton.__version__
        except ImportError:
            info["triton"] = None
    return info


def describe(info: dict) -> str:
    """One line for RESULTS.md."""
    where = info.get("gpu") or f"{info['cpu']} ({info['cores']} cores, {info['torch_threads']} threads)"
    return f"{where}; torch {info['torch']}"
