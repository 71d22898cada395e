"""A compiled UNet as a drop-in denoiser: a diffusers scheduler loop (what `pipe.unet = compiled` runs).

    python examples/scheduler_loop.py                 # needs diffusers (the test extra)
"""
import torch
from diffusers import DDIMScheduler

import compiled_unet
from compiled_unet.presets import build_random, example_inputs

unet = build_random("tiny")
latents, _, kwargs = example_inputs("tiny", batch=1)
compiled = compiled_unet.compile(unet, latents, torch.tensor([999.0]), **kwargs)  # jit: packed weights + channels_last

scheduler = DDIMScheduler(num_train_timesteps=1000)
scheduler.set_timesteps(10)
for t in scheduler.timesteps:                               # 0-d int64 timesteps, as pipelines pass them
    noise_pred = compiled(latents, t, **kwargs).sample
    latents = scheduler.step(noise_pred, t, latents).prev_sample
print("denoised latents", tuple(latents.shape), "mean", latents.mean().item())
