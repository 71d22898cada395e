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


def conv_peak(device: torch.device, dtype: torch.dtype, channels: int = 640, size: int = 32, repeats: int = 5) -> dict:
    """Best-of GFLOP/s of one 3x3 convolution (channels -> channels, batch 1, size x size, padding 1) on
    weights packed once: on CPU the oneDNN kernel the compiled UNets call (mkldnn._convolution_pointwise on a
    weight from mkldnn._reorder_convolution_weight); on CUDA cuDNN."""
    x = torch.randn(1, channels, size, size, device=device, dtype=dtype)
    w = torch.randn(channels, channels, 3, 3, device=device, dtype=dtype)
    if device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available():
        packed = torch.ops.mkldnn._reorder_convolution_weight(w, [1, 1], [1, 1], [1, 1], 1, list(x.shape))

        def conv():
            return torch.ops.mkldnn._convolution_pointwise(x, packed, None, [1, 1], [1, 1], [1, 1], 1, "none", [], "")
    else:
        def conv():
            return torch.nn.functional.conv2d(x, w, padding=1)
    best = math.inf
    with torch.no_grad():
        conv()
        for _ in range(repeats):
            sync(device)
            t0 = time.perf_counter()
            conv()
            sync(device)
            best = min(best, time.perf_counter() - t0)
    flops = 2 * channels * channels * 9 * size * size
    return {"channels": channels, "size": size, "dtype": str(dtype).removeprefix("torch."), "gflops": flops / best / 1e9,
            "seconds": best}


def measured_peak(device: torch.device, dtype: torch.dtype) -> dict:
    """The machine's practical dense peak in this run: the better of a large matmul and a packed 3x3 conv."""
    mm, conv = matmul_peak(device, dtype), conv_peak(device, dtype)
    return {"matmul": mm, "conv3x3": conv, "gflops": max(mm["gflops"], conv["gflops"]),
            "method": f"best of {mm['n']}^2 mm and a {conv['channels']}ch 3x3 conv at {conv['size']}^2, "
                      f"best of 5 each, same process, just before the timed rounds"}


def better_peak(before: dict, after: dict) -> dict:
    """The better of two `measured_peak`s of one run, taken just before and just after the timed rounds: on a shared
    VM a short probe can land in a slow minute (2026-12-05: 339 GFLOP/s before the rounds while the forward itself
    then ran at 357), and what the machine can do is the best it showed in the run. Both are kept in the record."""
    mm = max(before["matmul"], after["matmul"], key=lambda m: m["gflops"])
    conv = max(before["conv3x3"], after["conv3x3"], key=lambda c: c["gflops"])
    return {"matmul": mm, "conv3x3": conv, "gflops": max(mm["gflops"], conv["gflops"]),
            "method": f"best of {mm['n']}^2 mm and a {conv['channels']}ch 3x3 conv at {conv['size']}^2, best of 5 "
                      f"each, measured just before and just after the timed rounds (the better)",
            "before_gflops": before["gflops"], "after_gflops": after["gflops"]}


def cpu_flags() -> dict:
    """What the CPU offers for dense math: torch's dispatch ISA and the relevant /proc/cpuinfo flags."""
    wanted = ("avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16",
              "avx_vnni")
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    from compiled_unet.backends.vec_isa import isa_cap_settings

    capability = getattr(getattr(torch.backends, "cpu", None), "get_cpu_capability", lambda: "unknown")()
    # A cap (ONEDNN_MAX_CPU_ISA=AVX2, ...) makes an AVX-512 CPU run the AVX2 kernels: the row must say so.
    return {"capability": capability, "flags": [f for f in wanted if f in flags], "caps": isa_cap_settings()}


def rss_bytes() -> int:
    """This process's resident set size now (Linux /proc; 0 where unavailable)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


class PeakRss:
    """Peak RSS of one phase: `with PeakRss() as p: ...; p.peak, p.before`. The kernel's high-water mark (VmHWM),
    reset on entry through /proc/self/clear_refs, is exact; where that is unavailable, a thread samples RSS every
    `interval` s, which misses short peaks while another thread holds the GIL (AOTInductor copying a 3.4 GB
    library into its archive: 1x the weights unseen). `p.exact` says which one `p.peak` is.
    `p.cpu`: the phase's CPU seconds (user, system; its own and its waited-for children's, the C++ compiler) and
    page faults. System time is where a VM's slow first touch of memory shows (benchmarks/NOTES.md)."""

    def __init__(self, interval: float = 0.05):
        import threading

        self.interval, self.before, self.peak, self.sampled_peak, self.exact = interval, 0, 0, 0, False
        self.cpu: dict[str, float] = {}
        self._usage = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.wait(self.interval):
            self.sampled_peak = max(self.sampled_peak, rss_bytes())

    def __enter__(self):
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets this process's peak RSS to its current RSS
            self.exact = _high_water_mark() > 0
        except OSError:
            self.exact = False
        self.before = self.sampled_peak = rss_bytes()
        self._usage = _usage()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.sampled_peak = max(self.sampled_peak, rss_bytes())
        self.peak = max(self.sampled_peak, _high_water_mark() if self.exact else 0)
        self.cpu = {k: v - self._usage[k] for k, v in _usage().items()}


def _usage() -> dict[str, float]:
    import resource

    me, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"user_s": me.ru_utime, "sys_s": me.ru_stime, "children_user_s": children.ru_utime,
            "children_sys_s": children.ru_stime, "minor_faults": me.ru_minflt, "major_faults": me.ru_majflt}


def _high_water_mark() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


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
            "cpu_isa": cpu_flags(),
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
    isa = info.get("cpu_isa") or {}
    where = info.get("gpu") or (f"{info['cpu']} ({info['cores']} cores, {info['torch_threads']} threads"
                                + (f"; {isa['capability']}: {' '.join(isa['flags'])}" if isa else "")
                                + (f"; capped: {' '.join(f'{k}={v}' for k, v in isa['caps'].items())}"
                                   if isa.get("caps") else "") + ")")
    return f"{where}; torch {info['torch']}"
