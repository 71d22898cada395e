"""Helpers for the Flax tests: one set of weights in both models, and forward inputs in both conventions.

The oracle is always our PyTorch `UNet2DConditionModel` (itself checked against diffusers by the parity
suite); the Flax model gets its weights through `params_from_torch`, which the diffusers-0.39 fixtures pin
bit-exact to diffusers' own converter.
"""
from __future__ import annotations

import numpy as np
import torch

import jax
import jax.numpy as jnp

from compiled_unet import UNet2DConditionModel
from compiled_unet.flax import FlaxUNet2DConditionModel
from compiled_unet.flax.convert import params_from_torch

# The one small model of the transformation tests: SD-like, GroupNorm(4), dropout for the train path.
TINY = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), norm_num_groups=4,
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block=1, cross_attention_dim=8, attention_head_dim=4, dropout=0.1,
)


def torch_model(cfg: dict, seed: int = 0) -> UNet2DConditionModel:
    """Our PyTorch model with every parameter perturbed (seeded), so biases and norm scales are not the
    zeros/ones of a fresh init and a swapped or dropped one shows in the output."""
    torch.manual_seed(seed)
    model = UNet2DConditionModel(**cfg).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def flax_params(tmodel: UNet2DConditionModel, fmodel) -> dict:
    return jax.tree_util.tree_map(jnp.asarray, params_from_torch(tmodel.state_dict(), fmodel.config))


def pair(cfg: dict, seed: int = 0, **flax_kw):
    """(torch model, Flax model, Flax params) sharing one set of weights."""
    tmodel = torch_model(cfg, seed)
    fmodel = FlaxUNet2DConditionModel(**cfg, **flax_kw)
    return tmodel, fmodel, flax_params(tmodel, fmodel)


def _np(x):
    return x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x


def _nhwc(x):
    return np.ascontiguousarray(_np(x).transpose(0, 2, 3, 1))


def _keep_mask(m):
    return _np(m).astype(np.float32)  # bool / long / float 1-keep-0-drop, as both models read it


def flax_inputs(torch_inputs: dict) -> dict:
    """The Flax forward kwargs for a PyTorch forward kwargs dict (tests/strategies.build_inputs'): NCHW sample
    and hint, NHWC ControlNet/adapter residuals (diffusers' Flax convention), `timesteps` for `timestep`."""
    t = dict(torch_inputs)
    t.pop("return_dict", None)
    if t.pop("cross_attention_kwargs", None):
        raise ValueError("cross_attention_kwargs (LoRA scale, GLIGEN) has no Flax counterpart")
    out = dict(sample=_np(t.pop("sample")), timesteps=_np(t.pop("timestep")),
               encoder_hidden_states=_np(t.pop("encoder_hidden_states")))
    for k in ("attention_mask", "encoder_attention_mask"):
        if k in t:
            out[k] = _keep_mask(t.pop(k))
    for k in ("class_labels", "timestep_cond"):
        if k in t:
            out[k] = _np(t.pop(k))
    if "added_cond_kwargs" in t:
        out["added_cond_kwargs"] = {k: _np(v) for k, v in t.pop("added_cond_kwargs").items()}
    if "mid_block_additional_residual" in t:
        out["down_block_additional_residuals"] = tuple(_nhwc(r) for r in t.pop("down_block_additional_residuals"))
        out["mid_block_additional_residual"] = _nhwc(t.pop("mid_block_additional_residual"))
    if "down_block_additional_residuals" in t:  # the deprecated T2I-Adapter path (no mid residual)
        out["down_block_additional_residuals"] = tuple(_nhwc(r) for r in t.pop("down_block_additional_residuals"))
    if "down_intrablock_additional_residuals" in t:
        out["down_intrablock_additional_residuals"] = tuple(_nhwc(r)
                                                            for r in t.pop("down_intrablock_additional_residuals"))
    if t:
        raise ValueError(f"no Flax mapping for forward inputs {sorted(t)}")
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a) if isinstance(a, np.ndarray) else a, out)


def jit_forward(fmodel):
    """jax.jit of (params, inputs dict) -> sample; python scalars in the inputs are traced like arrays."""
    return jax.jit(lambda params, kw: fmodel.apply({"params": params}, **kw).sample)


def tiny_inputs(batch: int = 2, height: int = 8, width: int = 8, seq: int = 3, seed: int = 0) -> dict:
    """PyTorch forward kwargs for TINY."""
    gen = torch.Generator().manual_seed(seed)
    return dict(sample=torch.randn(batch, 4, height, width, generator=gen),
                timestep=torch.rand(batch, generator=gen) * 999.0,
                encoder_hidden_states=torch.randn(batch, seq, 8, generator=gen))
