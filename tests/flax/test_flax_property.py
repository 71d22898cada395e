"""Property suite (issue 11, item 4): hypothesis draws tiny configs and inputs (tests/strategies.py, the
PyTorch parity suite's strategies) and compares the Flax model under `jax.jit` with our PyTorch model on the
same weights (converted by `params_from_torch`, bit-exact against diffusers' converter: see
test_diffusers039_compat.py). Drawn families: every runnable one the Flax port covers; a drawn config the
port does not cover must raise a ValueError naming the argument at construction (never a silent fallback).

Examples per test are capped (CI budget: XLA compiles one program per drawn structure, ~5-15 s each on 2
cores); HYPOTHESIS_PROFILE=dev draws more.
"""
from __future__ import annotations

import dataclasses
import os

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

jax = pytest.importorskip("jax")  # the `flax` extra; CI installs it (a missing one fails there, see conftest)
import jax.numpy as jnp  # noqa: E402

from compiled_unet.config import UNetConfig  # noqa: E402
from compiled_unet.flax import FlaxUNet2DConditionModel  # noqa: E402
from compiled_unet.flax.model import unsupported  # noqa: E402
from tests.closeness import assert_close, closeness  # noqa: E402
from tests.flax.flax_pairs import flax_inputs, flax_params, jit_forward, torch_model  # noqa: E402
from tests.strategies import build_inputs, describe_spec, input_specs, unet_configs  # noqa: E402

_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
# Families whose blocks the Flax port implements (compiled_unet.flax.blocks.SUPPORTED_*); "k" and "gligen"
# are covered by the construction-error property below.
FLAX_FAMILIES = ("sd", "sdxl", "unclip", "kandinsky", "attn", "mixed")


def _cap(n_ci: int, n_dev: int):
    return settings(max_examples=n_ci if _CI else n_dev)


def _flax_spec(draw, cfg):
    """An input spec without what has no Flax counterpart (cross_attention_kwargs: LoRA scale, GLIGEN)."""
    spec = draw(input_specs(cfg))
    return dataclasses.replace(spec, lora_scale=None, gligen_boxes=0, return_dict=True)


@st.composite
def _case(draw, families=FLAX_FAMILIES):
    cfg = draw(unet_configs(families=families, max_blocks=2))
    return cfg, _flax_spec(draw, cfg)


def _family(cfg) -> str:
    blocks = set(cfg["down_block_types"]) | set(cfg["up_block_types"])
    if any("SimpleCrossAttn" in b for b in blocks):
        return "unclip/kandinsky-like"
    if cfg.get("addition_embed_type") == "text_time":
        return "sdxl-like"
    if any(b.startswith("CrossAttn") for b in blocks):
        return "sd-like"
    return "attn/resnet-only"


def _torch_forward(model, inputs):
    with torch.no_grad():
        return model(**inputs).sample


def _float32_timestep(inputs: dict) -> dict:
    """A Python-float timestep as the float32 value a jitted Flax model receives. Why: it reaches jax.jit as float32
    (JAX's 32-bit default; a weakly typed float stays float32 even with jax_enable_x64), while diffusers' PyTorch
    UNet (and ours) makes it a float64 tensor, so Fourier time features are computed in float64 there and their
    phases differ by up to |t| * |w| * 2 pi * 2^-24 (~3e-4 at t = 768; one drawn tiny Fourier config: rel-L2 2.8e-5,
    ~3e-7 with both on the float32 value). The port's arithmetic is what the fp32 test compares."""
    if isinstance(inputs.get("timestep"), float):
        inputs["timestep"] = torch.tensor(inputs["timestep"], dtype=torch.float32)
    return inputs


@_cap(6, 30)
@given(_case())
def test_flax_fp32_matches_torch(case):
    cfg, spec = case
    bad = unsupported(UNetConfig(**cfg))
    if bad:  # a config the port does not implement must be refused by name, at construction
        with pytest.raises(ValueError, match=bad[0][0]):
            FlaxUNet2DConditionModel(**cfg)
        return
    tmodel = torch_model(cfg, seed=spec.seed % 1000)
    fmodel = FlaxUNet2DConditionModel(**cfg)
    params = flax_params(tmodel, fmodel)
    ref = _torch_forward(tmodel, _float32_timestep(build_inputs(cfg, spec)))
    out = jit_forward(fmodel)(params, flax_inputs(_float32_timestep(build_inputs(cfg, spec))))
    # fp32, XLA vs PyTorch CPU kernels on identical weights: rel-L2 <= 1e-5 (issue 11), max-abs <= 1e-4 x max(1, |ref|)
    c = assert_close(torch.from_numpy(np.array(out)), ref, scale_tol=1e-4, rel_l2=1e-5,
                     what=f"Flax fp32 vs PyTorch [{_family(cfg)}; {describe_spec(spec)}]")
    print(f"[fp32 {_family(cfg)}] {c}; output {tuple(ref.shape)}, |ref| max {float(ref.abs().max()):.3g}")


@st.composite
def _bf16_case(draw):
    cfg = draw(unet_configs(families=("sd", "sdxl"), max_blocks=2))
    spec = _flax_spec(draw, cfg)
    return cfg, dataclasses.replace(spec, encoder_mask=None, attention_mask=None, fully_masked_row=False)


def _bf16(x):
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.to(torch.bfloat16)
    if isinstance(x, dict):
        return {k: _bf16(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_bf16(v) for v in x)
    return x


@_cap(2, 10)
@given(_bf16_case())
def test_flax_bf16_within_torch_bf16_error(case):
    """bf16 compute (params kept fp32 in Flax: dtype=bfloat16, param_dtype=float32; the PyTorch model cast
    to bf16): both measured against the fp32 PyTorch output."""
    cfg, spec = case
    tmodel = torch_model(cfg, seed=spec.seed % 1000)
    ref = _torch_forward(tmodel, build_inputs(cfg, spec))
    fmodel = FlaxUNet2DConditionModel(**cfg, dtype=jnp.bfloat16)
    params = flax_params(tmodel, fmodel)
    out = jit_forward(fmodel)(params, flax_inputs(build_inputs(cfg, spec)))
    flax_err = closeness(torch.from_numpy(np.array(out, dtype=np.float32)), ref)
    torch_err = closeness(_torch_forward(tmodel.to(torch.bfloat16), _bf16(build_inputs(cfg, spec))).float(), ref)
    print(f"[bf16 {_family(cfg)}] Flax bf16 vs fp32: {flax_err}; PyTorch bf16 vs fp32: {torch_err}")
    # Flax's bf16 error at most twice PyTorch's (rel-L2), with a floor of 1e-2 for draws where PyTorch's bf16
    # happens to be very close (bf16 keeps 8 mantissa bits: one rounding is ~4e-3 relative)
    assert flax_err.rel_l2 <= max(2 * torch_err.rel_l2, 1e-2), \
        f"Flax bf16 error {flax_err} > 2x PyTorch bf16 error {torch_err} [{describe_spec(spec)}]"


@_cap(3, 15)
@given(unet_configs(families=("k", "gligen"), max_blocks=2))
def test_unsupported_configs_refused_by_name(cfg):
    """Blocks or options the Flax port lacks (K blocks, GLIGEN attention) raise at construction, naming the
    argument: never a model that silently computes something else."""
    bad = unsupported(UNetConfig(**cfg))
    assert bad, f"expected this config to be outside the Flax port: {cfg}"
    with pytest.raises(ValueError, match=bad[0][0]):
        FlaxUNet2DConditionModel(**cfg)
