"""diffusers as the numerical oracle: build a randomised reference UNet, run it, compare outputs.

Tolerance (fp32, CPU): an output matches the reference when
    rel_l2  = ||ours - ref||_2 / max(||ref||_2, tiny)      <= 1e-5, and
    max_abs = max |ours - ref|                             <= 1e-4 * max(1, max |ref|).
Both models hold the same fp32 weights and see the same inputs, so the only admissible differences are
reassociation of floating-point sums (matmul/conv/attention blocking, fused kernels); 1e-5 relative L2
is ~100x fp32 epsilon and far below any real mistake (a wrong scale, mask, order of norms or a missing
residual shows up as O(1e-2) or more).
"""
from __future__ import annotations

import copy
import logging
import math
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from tests.closeness import closeness

RTOL_L2 = 1e-5
ATOL_SCALE = 1e-4


def _quiet_diffusers():
    """diffusers logs a warning per attention call for `scale` kwargs etc.; keep test output readable."""
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    logging.getLogger("diffusers").setLevel(logging.ERROR)


@torch.no_grad()
def randomize_parameters_(model: nn.Module, seed: int) -> nn.Module:
    """Overwrite every parameter with seeded values of a sensible scale.

    diffusers zero-initialises several layers (conv_out, proj_out, GLIGEN gates, null features ...), which
    would hide whole sub-graphs from a parity test. Weights: N(0, 1/fan_in); biases: N(0, 0.1^2);
    normalisation weights 1 + N(0, 0.1^2); 0-d gates N(0, 1); GaussianFourierProjection keeps N(0, 1)
    (its real initialisation). Buffers are left untouched.
    """
    gen = torch.Generator().manual_seed(seed)
    norms = (nn.GroupNorm, nn.LayerNorm, nn.BatchNorm2d)
    norm_params = {id(p) for m in model.modules() if isinstance(m, norms) for p in m.parameters(recurse=False)}
    norm_weights = {id(m.weight) for m in model.modules() if isinstance(m, norms) and m.weight is not None}
    for name, param in model.named_parameters():
        shape = param.shape
        if param.dim() == 0:
            value = torch.randn((), generator=gen)
        elif id(param) in norm_weights:
            value = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        elif id(param) in norm_params or param.dim() == 1:
            scale = 1.0 if name.endswith("time_proj.weight") else 0.1  # Fourier frequencies are N(0, 1)
            value = scale * torch.randn(shape, generator=gen)
        else:
            fan_in = math.prod(shape[1:])
            value = torch.randn(shape, generator=gen) / math.sqrt(fan_in)
        param.copy_(value.to(param.dtype))
    return model


def build_diffusers_unet(config: dict, seed: int = 0):
    """diffusers' UNet2DConditionModel for `config`, fp32, eval mode, every parameter randomised by `seed`."""
    _quiet_diffusers()
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = UNet2DConditionModel(**copy.deepcopy(config))
    model = model.to(torch.float32).eval()
    return randomize_parameters_(model, seed)


def sample_of(output, return_dict: bool) -> torch.Tensor:
    """The sample tensor of a forward result, checking the container type for `return_dict`."""
    if return_dict:
        assert not isinstance(output, tuple), f"return_dict=True returned a tuple: {type(output)}"
        return output.sample
    assert isinstance(output, tuple), f"return_dict=False must return a tuple, got {type(output)}"
    return output[0]


@torch.no_grad()
def run_unet(model: nn.Module, inputs: dict, return_dict: bool | None = None) -> torch.Tensor:
    """Run `model(**inputs)` on a deep copy of the inputs (diffusers pops from the T2I residual list)."""
    kwargs = copy.deepcopy(inputs)
    if return_dict is not None:
        kwargs["return_dict"] = return_dict
    rd = kwargs.get("return_dict", True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the legacy T2I path calls diffusers' deprecate()
        out = model(**kwargs)
    return sample_of(out, rd)


@dataclass(frozen=True)
class Parity:
    rel_l2: float
    max_abs: float
    ref_scale: float

    @property
    def ok(self) -> bool:
        return self.rel_l2 <= RTOL_L2 and self.max_abs <= ATOL_SCALE * max(1.0, self.ref_scale)

    def __str__(self) -> str:
        return (f"rel_l2={self.rel_l2:.3e} (tol {RTOL_L2:.0e}), max_abs={self.max_abs:.3e} "
                f"(tol {ATOL_SCALE * max(1.0, self.ref_scale):.3e}), ref max|x|={self.ref_scale:.3e}")


def parity(ours: torch.Tensor, ref: torch.Tensor) -> Parity:
    """Relative L2 error and max-abs error of `ours` against `ref` (tests/closeness.py, float64)."""
    if ours.shape != ref.shape:
        raise AssertionError(f"shape mismatch: ours {tuple(ours.shape)} vs diffusers {tuple(ref.shape)}")
    c = closeness(ours, ref)
    return Parity(c.rel_l2, c.max_abs, ref.detach().double().abs().max().item())


def compare(ours: torch.Tensor, ref: torch.Tensor, context: str = "") -> Parity:
    """Assert fp32 parity: rel-L2 <= 1e-5 and max-abs <= 1e-4 * max(1, max|ref|); returns the numbers."""
    result = parity(ours, ref)
    if not result.ok:
        raise AssertionError(f"output mismatch vs diffusers: {result}" + (f"\n{context}" if context else ""))
    return result


@torch.no_grad()
def record_down_shapes(model: nn.Module, inputs: dict) -> dict:
    """Shapes of diffusers' down_block_res_samples, mid output and per-block outputs, via forward hooks."""
    down, per_block, mid = [], [], []

    def conv_in_hook(_m, _a, out):
        down.append(tuple(out.shape))

    def down_hook(_m, _a, out):
        sample, res = out[0], out[1]
        per_block.append((tuple(sample.shape), [r if r is None else tuple(r.shape) for r in res]))
        down.extend(None if r is None else tuple(r.shape) for r in res)

    def mid_hook(_m, _a, out):
        mid.append(tuple(out.shape))

    handles = [model.conv_in.register_forward_hook(conv_in_hook)]
    handles += [blk.register_forward_hook(down_hook) for blk in model.down_blocks]
    if model.mid_block is not None:
        handles.append(model.mid_block.register_forward_hook(mid_hook))
    try:
        run_unet(model, inputs)
    finally:
        for h in handles:
            h.remove()
    return dict(down=down, per_block=per_block, mid=mid[0] if mid else per_block[-1][0])
