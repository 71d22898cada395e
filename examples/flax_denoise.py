"""A scheduler-free Euler denoising loop in jnp with the Flax UNet (CPU here; the same code runs on a TPU).

    python examples/flax_denoise.py                   # tiny preset's config, random weights, 10 steps

The weights come from our PyTorch model through `params_from_torch` (bit-exact), so the loop can be checked
against the PyTorch model step by step (done at the end). A real checkpoint: `FlaxUNet2DConditionModel.
from_pretrained(folder, from_pt=True)` for a diffusers PyTorch folder, or a diffusers Flax folder as is.
"""
import jax
import jax.numpy as jnp
import numpy as np
import torch

from compiled_unet.flax import FlaxUNet2DConditionModel
from compiled_unet.flax.convert import params_from_torch
from compiled_unet.presets import build_random, example_inputs

STEPS = 10

tunet = build_random("tiny").eval()
sample, _, kwargs = example_inputs("tiny", batch=1)
config = {k: v for k, v in tunet.config.items() if not k.startswith("_")}
unet = FlaxUNet2DConditionModel(**config)
params = jax.tree_util.tree_map(jnp.asarray, params_from_torch(tunet.state_dict(), unet.config))
context = jnp.asarray(kwargs["encoder_hidden_states"].numpy())

# Karras-style sigmas from a scaled-linear beta schedule (SD's), as jnp; the model predicts epsilon.
betas = jnp.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2
alphas_cumprod = jnp.cumprod(1.0 - betas)
all_sigmas = jnp.sqrt((1 - alphas_cumprod) / alphas_cumprod)
timesteps = jnp.linspace(999, 0, STEPS)
sigmas = jnp.append(jnp.interp(timesteps, jnp.arange(1000), all_sigmas), 0.0)


@jax.jit  # one compile: the loop body has one shape
def euler_step(x, t, sigma, sigma_next):
    eps = unet.apply({"params": params}, x / jnp.sqrt(sigma ** 2 + 1), t, context).sample
    return x + (sigma_next - sigma) * eps      # dx/dsigma = eps for an epsilon-predicting model


x = jnp.asarray(sample.numpy()) * sigmas[0]
for i in range(STEPS):
    x = euler_step(x, timesteps[i], sigmas[i], sigmas[i + 1])
x = np.asarray(x)
print(f"denoised latents {x.shape}, mean {x.mean():+.4f}, std {x.std():.4f}")

# the same loop with the PyTorch model: the Flax UNet is the PyTorch one, to fp32 rounding
xt = torch.from_numpy(np.asarray(sample.numpy() * float(sigmas[0])))
with torch.no_grad():
    for i in range(STEPS):
        s, s1 = float(sigmas[i]), float(sigmas[i + 1])
        eps = tunet(xt / (s ** 2 + 1) ** 0.5, float(timesteps[i]), **kwargs).sample
        xt = xt + (s1 - s) * eps
rel = float(np.linalg.norm(x - xt.numpy()) / np.linalg.norm(xt.numpy()))
print(f"Flax vs PyTorch after {STEPS} Euler steps: rel-L2 {rel:.2e}")
