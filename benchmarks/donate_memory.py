"""Compile memory with and without `compile(..., donate_weights=True)`: one fresh process per case.

    python -m benchmarks.donate_memory                 # SD1.5 32x32 batch 1, float32 CPU: jit default, then AOT
    python -m benchmarks.donate_memory --modes jit     # only the jit default
    python -m benchmarks.donate_memory --preset sdxl --modes jit --weights donate   # SDXL where 2x does not fit

Peak RSS is the kernel's high-water mark around the compile and first output (measure.PeakRss, reset on entry),
reported as bench.py reports compile memory: x the weights' bytes with the model counted once, i.e.
1 + (peak - RSS before the compile) / weights. Each case's output is compared with the model's own eager output,
computed before the compile (a donated model cannot run afterwards): relative L2. The forward median (5 calls
after 1 warm-up) is there to show donating costs no speed; it is not a benchmark of speed (bench.py is).
Run it with nothing else running; give each case a fresh cache folder (`--cache-root`) to measure cold compiles.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch


def _case(preset: str, size: int, batch: int, mode: str, donate: bool) -> dict:
    import compiled_unet
    from compiled_unet.backends import InductorOptions
    from compiled_unet.presets import build_random, example_inputs

    from .measure import PeakRss, rel_l2

    torch.set_grad_enabled(False)
    unet = build_random(preset)
    sample, timestep, kwargs = example_inputs(preset, batch=batch, latent_size=size)
    weights = sum(t.untyped_storage().nbytes() for t in unet.state_dict().values())
    ref = unet(sample, timestep, **kwargs).sample
    t0 = time.perf_counter()
    with PeakRss() as mem:
        compiled = compiled_unet.compile(unet, sample, timestep, **kwargs, donate_weights=donate, progress=False,
                                         options=InductorOptions(aot=mode == "aot"))
        out = compiled(sample, timestep, **kwargs).sample
    first_output_s = time.perf_counter() - t0
    times = []
    for _ in range(6):
        t1 = time.perf_counter()
        compiled(sample, timestep, **kwargs)
        times.append(time.perf_counter() - t1)
    return {"mode": mode, "donate_weights": donate, "weight_bytes": weights, "first_output_s": first_output_s,
            "rel_l2_err": rel_l2(out, ref), "donated_bytes": compiled.report.donated_bytes,
            "linear_kernel": compiled.options.linear_kernel, "exact_peak": mem.exact,
            "peak_x_weights": 1 + (mem.peak - mem.before) / weights,
            "forward_median_ms": 1e3 * statistics.median(times[1:])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="sd15")
    p.add_argument("--size", type=int, default=32)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--modes", default="jit,aot", help="jit, aot or both (comma-separated)")
    p.add_argument("--weights", default="plain,donate",
                   help="plain, donate or both (comma-separated): SDXL's plain compile needs ~2x its 10.3 GB")
    p.add_argument("--cache-root", default=None, help="a fresh Inductor and package cache per case under this folder")
    p.add_argument("--json", default=None, help="also write the machine and every case's record here")
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if not set(args.weights.split(",")) <= {"plain", "donate"} or not set(args.modes.split(",")) <= {"jit", "aot"}:
        p.error("--modes takes jit and/or aot, --weights plain and/or donate")
    if args.case:  # the child: one case, its record as the last line
        mode, donate = args.case.split(":")
        print(json.dumps(_case(args.preset, args.size, args.batch, mode, donate == "donate")))
        return
    from .measure import describe, machine

    info = machine(torch.device("cpu"))
    print(describe(info))
    records = []
    for mode in args.modes.split(","):
        for donate in args.weights.split(","):
            env = dict(os.environ, COMPILED_UNET_PROGRESS="0")
            if args.cache_root:
                root = os.path.join(os.path.abspath(args.cache_root), f"{mode}-{donate}")
                env.update(TORCHINDUCTOR_CACHE_DIR=os.path.join(root, "inductor"),
                           COMPILED_UNET_CACHE_DIR=os.path.join(root, "compiled_unet"))
            cmd = [sys.executable, "-m", "benchmarks.donate_memory", "--preset", args.preset, "--size", str(args.size),
                   "--batch", str(args.batch), "--case", f"{mode}:{donate}"]
            proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if proc.returncode != 0:
                sys.exit(f"{mode} {donate}: failed\n{proc.stderr[-3000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
            records.append({**r, "cold_caches": bool(args.cache_root)})
            print(f"{mode} {donate:6s}: peak {r['peak_x_weights']:.2f}x the weights ({r['weight_bytes'] / 1e9:.2f} GB, "
                  f"{'exact' if r['exact_peak'] else 'sampled'}), freed {r['donated_bytes'] / 1e9:.2f} GB, first "
                  f"output after {r['first_output_s']:.1f} s, forward {r['forward_median_ms']:.0f} ms, rel L2 "
                  f"{r['rel_l2_err']:.1e}, linears on {r['linear_kernel']}", flush=True)
    if args.json:
        from ._io import write_atomic

        write_atomic(args.json, json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": info, "machine_line": describe(info),
                                      "case": {"preset": args.preset, "size": args.size, "batch": args.batch,
                                               "dtype": "fp32", "device": "cpu"},
                                      "method": "peak RSS = the kernel's high-water mark around compile + first "
                                                "output; x weights with the model counted once", "records": records},
                                     indent=1) + "\n")


if __name__ == "__main__":
    main()
