"""`--profile`: where the time goes, per UNet block and per op, against counted FLOPs and the machine's
measured matmul peak. The basis for benchmarks/NOTES.md.

  * FLOPs: torch.utils.flop_counter.FlopCounterMode over one eager forward of our model (conv, mm, addmm,
    bmm, baddbmm, SDPA incl. the CPU flash kernel), per top-level block (conv_in, time_embedding,
    down_blocks.N, mid_block, up_blocks.N, conv_out ...).
  * Block times: forward pre/post hooks on those blocks of the eager models (wall clock, synchronized on
    CUDA); "UNet glue" is the forward's time outside every block. Compiled graphs fuse across blocks, so
    they are profiled per op only.
  * Per op: torch.profiler self time per forward, top ops and a category split. On CPU, Inductor's fused
    C++ kernels are not profiler events: their time shows as self time of the compiled region.
  * Peak: the best GFLOP/s of one large square matmul in the run's dtype (measure.matmul_peak).
"""
from __future__ import annotations

import time
from collections import defaultdict

import torch

from .measure import matmul_peak, sync


def _blocks(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    out = []
    for name, child in model.named_children():
        if isinstance(child, torch.nn.ModuleList):
            out += [(f"{name}.{i}", m) for i, m in enumerate(child)]
        elif child is not None:
            out.append((name, child))
    return out


def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    from torch.utils.flop_counter import sdpa_flop_count

    return sdpa_flop_count(query_shape, key_shape, value_shape)


def count_flops(model: torch.nn.Module, call) -> tuple[int, dict[str, int]]:
    """(total FLOPs of one forward, FLOPs per top-level block)."""
    from torch.utils.flop_counter import FlopCounterMode

    extra = {}
    op = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if op is not None:
        extra[op] = _sdpa_cpu_flops
    counter = FlopCounterMode(display=False, custom_mapping=extra)
    with counter, torch.no_grad():
        call()
    counts = counter.get_flop_counts()
    root = type(model).__name__
    per_block = {name: int(sum(counts.get(f"{root}.{name}", {}).values())) for name, _ in _blocks(model)}
    return int(counter.get_total_flops()), per_block


def block_times(model: torch.nn.Module, call, device: torch.device, iters: int) -> dict[str, float]:
    """Seconds per forward spent in each top-level block (and 'UNet glue' outside them)."""
    spent: dict[str, float] = defaultdict(float)
    starts: dict[str, float] = {}
    handles = []
    for name, module in _blocks(model):
        def pre(_m, _a, name=name):
            sync(device)
            starts[name] = time.perf_counter()

        def post(_m, _a, _o, name=name):
            sync(device)
            spent[name] += time.perf_counter() - starts.pop(name)

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        with torch.no_grad():
            call()  # warm (hooks change nothing but the first call may allocate)
            spent.clear()
            sync(device)
            t0 = time.perf_counter()
            for _ in range(iters):
                call()
            sync(device)
            total = time.perf_counter() - t0
    finally:
        for h in handles:
            h.remove()
    out = {name: spent.get(name, 0.0) / iters for name, _ in _blocks(model)}
    out["UNet glue"] = max(0.0, total / iters - sum(out.values()))
    return out


_CATEGORIES = (
    ("attention", ("scaled_dot_product", "flash_attention", "efficient_attention", "softmax", "baddbmm", "bmm")),
    ("conv", ("conv",)),
    ("matmul", ("aten::mm", "aten::addmm", "matmul", "linear", "_mkl_", "aten::_addmm")),
    ("norm", ("group_norm", "layer_norm", "native_group_norm", "native_layer_norm")),
    ("compiled region", ("compiled", "torch-compiled", "cpp_fused", "triton_", "aotinductor", "## call")),
)


def _category(name: str) -> str:
    low = name.lower()
    for cat, keys in _CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "elementwise/other"


def op_times(fn, device: torch.device, iters: int, top: int = 12) -> dict:
    """Self time per forward by op (top `top`) and by category, from torch.profiler."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with torch.no_grad():
        fn()
        with profile(activities=activities) as prof:
            for _ in range(iters):
                fn()
            sync(device)
    rows = []
    for e in prof.key_averages():
        if device.type == "cuda":
            us = getattr(e, "self_device_time_total", None)
            us = getattr(e, "self_cuda_time_total", 0.0) if us is None else us
        else:
            us = e.self_cpu_time_total
        if us > 0:
            rows.append((e.key, us / iters / 1e3, e.count // iters))
    rows.sort(key=lambda r: -r[1])
    cats: dict[str, float] = defaultdict(float)
    for key, ms, _ in rows:
        cats[_category(key)] += ms
    return {"clock": "device" if device.type == "cuda" else "cpu",
            "top": [{"op": k, "ms": ms, "calls": n} for k, ms, n in rows[:top]],
            "categories_ms": dict(sorted(cats.items(), key=lambda kv: -kv[1]))}


def run(case, built: dict, medians_ms: dict[str, float], iters: int = 3, log=print) -> dict:
    """Profile the built variants; print the tables; return the JSON section."""
    dev = case.device
    x, t, kw = case.sample, case.timestep, case.kwargs
    peak = matmul_peak(dev, case.dtype)
    total, per_block = count_flops(case.ours, lambda: case.ours(x, t, **kw, return_dict=False))
    floor_ms = total / (peak["gflops"] * 1e9) * 1e3
    eager = {}
    if "ours-eager" in built or "torch-eager" in built:
        eager["ours-eager"] = block_times(case.ours, lambda: case.ours(x, t, **kw, return_dict=False), dev, iters)
    if case.has_diffusers and "diffusers-eager" in built:
        eager["diffusers-eager"] = block_times(case.base, lambda: case.base(x, t, **kw, return_dict=False), dev, iters)
    ops = {name: op_times(b.fn, dev, iters) for name, b in built.items() if b.fn is not None}

    log("")
    log(f"matmul peak: {peak['gflops']:.0f} GFLOP/s ({peak['dtype']} {peak['n']}x{peak['n']} mm on {dev.type}); "
        f"one forward: {total / 1e9:.1f} GFLOP -> floor {floor_ms:.1f} ms at that peak")
    log(f"{'variant':20s} {'median ms':>10s} {'GFLOP/s':>9s} {'% of peak':>9s}")
    for name, ms in medians_ms.items():
        log(f"{name:20s} {ms:10.2f} {total / ms / 1e6:9.1f} {100 * floor_ms / ms:8.1f}%")
    cols = list(eager)
    log("")
    log(f"{'block':16s} {'GFLOP':>8s} {'%flop':>6s}" + "".join(f" {c + ' ms':>20s} {'%':>5s} {'GF/s':>7s}" for c in cols))
    for name in [*per_block, "UNet glue"]:
        f = per_block.get(name, 0)
        line = f"{name:16s} {f / 1e9:8.3f} {100 * f / max(total, 1):5.1f}%"
        for c in cols:
            s = eager[c].get(name, 0.0)
            tot = sum(eager[c].values())
            line += f" {s * 1e3:20.2f} {100 * s / max(tot, 1e-12):4.1f}% {f / max(s, 1e-12) / 1e9:7.1f}"
        log(line)
    for name, o in ops.items():
        log("")
        log(f"{name}: self {o['clock']} time per forward by category: "
            + ", ".join(f"{k} {v:.1f} ms" for k, v in o["categories_ms"].items()))
        for r in o["top"][:8]:
            log(f"    {r['ms']:9.2f} ms  x{r['calls']:<4d} {r['op'][:70]}")
    return {"matmul_peak": peak, "flops_total": total, "flops_per_block": per_block, "floor_ms": floor_ms,
            "block_seconds": eager, "ops": ops,
            "method": "FLOPs: FlopCounterMode on ours eager (SDPA counted as 4*B*H*Lq*Lk*D); block times: "
                      "hooks on top-level modules of the eager models; ops: torch.profiler self time"}
