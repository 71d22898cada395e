"""How fast one forward could be on this machine: a per-layer roofline from the run's measured peak and memory
bandwidth, to read "% of peak" against.

Each matmul-class op of one eager forward (convolutions, linears, bmm, attention; counted by torch's
FlopCounterMode) needs at least max(its FLOPs / peak, its weights' bytes / bandwidth): a weight of SD1.5 (3.4 GB
in all) cannot stay in a cache between forwards, so every forward reads it from memory once. Summed over the ops
that is the **per-layer roofline**, the usual bound for kernels that run one after another. Two looser bounds go
beside it: all FLOPs at the peak (what "% of peak" measures against), and all FLOPs or all weight bytes, whichever
takes longer (compute and weight traffic overlapped perfectly across ops). Activations and elementwise ops are
left out (fused kernels can keep them in cache), so each bound is optimistic: no kernel of this machine beats it.
"""
from __future__ import annotations

import math
import time
from typing import Callable

import torch

# One GiB: far beyond any cache, well within the memory of every machine the benchmark runs on.
STREAM_BYTES = 1 << 30


def read_bandwidth(nbytes: int = STREAM_BYTES, repeats: int = 5) -> dict:
    """Best-of GB/s of reading `nbytes` of float32 once (a sum over all threads): the rate weights stream in."""
    x = torch.ones(nbytes // 4)
    best = math.inf
    x.sum()
    for _ in range(repeats):
        t0 = time.perf_counter()
        x.sum()
        best = min(best, time.perf_counter() - t0)
    return {"bytes": nbytes, "gbytes_per_s": nbytes / best / 1e9, "seconds": best}


def matmul_ops(model: torch.nn.Module, call: Callable[[], object]) -> list[tuple[int, int]]:
    """(FLOPs, weight bytes read) of each matmul-class op of one forward of `model` (eager), in order."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count
    from torch.utils._pytree import tree_leaves

    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    ops: list[tuple[int, int]] = []

    class Counter(FlopCounterMode):
        def _count_flops(self, func_packet, out, args, kwargs):
            if func_packet in self.flop_registry:
                flops = self.flop_registry[func_packet](*args, **kwargs, out_val=out)
                read = sum(t.numel() * t.element_size() for t in tree_leaves((args, kwargs))
                           if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() in weights)
                ops.append((int(flops), read))
            return super()._count_flops(func_packet, out, args, kwargs)

    extra = {}
    flash_cpu = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if flash_cpu is not None:
        extra[flash_cpu] = lambda q, k, v, *a, out_shape=None, **kw: sdpa_flop_count(q, k, v)
    with Counter(display=False, custom_mapping=extra), torch.no_grad():
        call()
    return ops


def bounds(ops: list[tuple[int, int]], peak_gflops: float, gbytes_per_s: float) -> dict:
    """The three lower bounds on one forward's time (ms) and the best "% of peak" each allows."""
    flops = sum(f for f, _ in ops)
    weight_bytes = sum(b for _, b in ops)
    compute_s = flops / (peak_gflops * 1e9)
    per_layer_s = sum(max(f / (peak_gflops * 1e9), b / (gbytes_per_s * 1e9)) for f, b in ops)
    overlapped_s = max(compute_s, weight_bytes / (gbytes_per_s * 1e9))
    return {"flops": flops, "weight_bytes": weight_bytes, "ops": len(ops),
            "peak_gflops": peak_gflops, "read_gbytes_per_s": gbytes_per_s,
            "compute_ms": 1e3 * compute_s, "overlapped_ms": 1e3 * overlapped_s, "per_layer_ms": 1e3 * per_layer_s,
            "best_percent_of_peak": {"overlapped": 100 * compute_s / overlapped_s,
                                     "per_layer": 100 * compute_s / per_layer_s}}


def main(argv=None) -> int:
    """`python -m benchmarks.roofline --preset sd15 --size 32 [--batch 1]`: the bounds for one case on this
    machine (peak and bandwidth measured now; no compile), printed and returned as JSON on the last line."""
    import argparse
    import json

    from compiled_unet.presets import build_random, example_inputs

    from .measure import measured_peak

    p = argparse.ArgumentParser(prog="python -m benchmarks.roofline", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="sd15")
    p.add_argument("--size", type=int, default=None, help="latent size (default: the preset's)")
    p.add_argument("--batch", type=int, default=1)
    args = p.parse_args(argv)
    model = build_random(args.preset)
    sample, t, kw = example_inputs(args.preset, batch=args.batch, latent_size=args.size)
    ops = matmul_ops(model, lambda: model(sample, t, **kw, return_dict=False))
    peak, bandwidth = measured_peak(torch.device("cpu"), torch.float32), read_bandwidth()
    b = bounds(ops, peak["gflops"], bandwidth["gbytes_per_s"])
    print(f"{args.preset} {sample.shape[-1]}x{sample.shape[-2]} batch {args.batch}: {b['flops'] / 1e9:.1f} GFLOP, "
          f"{b['weight_bytes'] / 1e9:.2f} GB of weights over {b['ops']} ops; peak {peak['gflops']:.0f} GFLOP/s, "
          f"read {bandwidth['gbytes_per_s']:.1f} GB/s")
    print(f"at least {b['per_layer_ms']:.0f} ms layer by layer (at most {b['best_percent_of_peak']['per_layer']:.1f}% "
          f"of peak), {b['overlapped_ms']:.0f} ms overlapped ({b['best_percent_of_peak']['overlapped']:.1f}%), "
          f"{b['compute_ms']:.0f} ms at the peak")
    print(json.dumps({**b, "peak": peak, "bandwidth": bandwidth}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
