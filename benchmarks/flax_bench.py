"""Report-only: the Flax UNet under jax.jit vs our PyTorch model in eager mode, same config, weights, inputs.

    python -m benchmarks.flax_bench                      # tiny preset, 8x8 latents
    python -m benchmarks.flax_bench --preset sd15 --size 16 --rounds 5

Prints median / min ms per forward (after warm-up; jit compile time reported apart) and the rel-L2 of the
Flax output against PyTorch's. Interleaved rounds in one process; on a shared machine the numbers are noisy
(benchmarks/NOTES.md). Nothing is asserted and nothing is written.
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

from compiled_unet.flax import FlaxUNet2DConditionModel
from compiled_unet.flax.convert import params_from_torch
from compiled_unet.presets import build_random, example_inputs


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="benchmarks.flax_bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="tiny")
    p.add_argument("--size", type=int, default=8, help="latent height = width")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    a = p.parse_args(argv)

    tunet = build_random(a.preset).eval()
    sample, timestep, kwargs = example_inputs(a.preset, batch=a.batch, latent_size=a.size)
    config = {k: v for k, v in tunet.config.items() if not k.startswith("_")}
    funet = FlaxUNet2DConditionModel(**config)
    params = jax.tree_util.tree_map(jnp.asarray, params_from_torch(tunet.state_dict(), funet.config))
    fx = dict(sample=jnp.asarray(sample.numpy()), timesteps=jnp.asarray(np.asarray(timestep)),
              encoder_hidden_states=jnp.asarray(kwargs["encoder_hidden_states"].numpy()))
    if "added_cond_kwargs" in kwargs:
        fx["added_cond_kwargs"] = {k: jnp.asarray(v.numpy()) for k, v in kwargs["added_cond_kwargs"].items()}
    fwd = jax.jit(lambda p, kw: funet.apply({"params": p}, **kw).sample)

    t0 = time.perf_counter()
    fwd(params, fx).block_until_ready()
    compile_s = time.perf_counter() - t0

    def run_flax():
        return fwd(params, fx).block_until_ready()

    def run_torch():
        with torch.no_grad():
            return tunet(sample, timestep, **kwargs).sample

    for _ in range(a.warmup):
        run_flax(), run_torch()
    times = {"flax jit": [], "torch eager": []}
    for _ in range(a.rounds):  # interleaved, so load changes hit both alike
        for name, fn in (("flax jit", run_flax), ("torch eager", run_torch)):
            t0 = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - t0) * 1e3)
    ref = run_torch().numpy()
    rel = float(np.linalg.norm(np.asarray(run_flax()) - ref) / np.linalg.norm(ref))
    print(f"{a.preset} {a.size}x{a.size} batch {a.batch}, CPU, {jax.device_count()} jax device(s), "
          f"torch threads {torch.get_num_threads()}; jit compile {compile_s:.1f} s; Flax vs PyTorch rel-L2 {rel:.2e}")
    for name, ts in times.items():
        print(f"  {name:12s} median {statistics.median(ts):8.2f} ms   min {min(ts):8.2f} ms   ({a.rounds} rounds)")


if __name__ == "__main__":
    main()
