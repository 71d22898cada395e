"""FreeU: parity with diffusers on drawn scales and sizes (power-of-two or not) in fp32, bf16 and fp16, bit
equality of the filter and backbone steps, and the scales are tensors: changing them on the model changes an
exported program's output without re-export.

Tolerances: fp32 max-abs <= 1e-5 x max(1, |ref|) (same math, float32 FFT in both). bf16/fp16: bit-equal
outputs. diffusers computes the Fourier filter in float32 for every non-float32 input (bf16 has no FFT,
fp16 would give complex32) and rounds back once, and multiplies the backbone by a Python float, which ATen
does in float32; ours does the same ops in the same order, so there is no rounding difference to allow
for. (The old bf16 bound, relative L2 1e-2, was looser than diffusers' own bf16-vs-fp32 error.)
"""
import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import compiled_unet
from compiled_unet import UNet2DConditionModel, freeu
from tests.cases import BASE, inputs_for, randomize_

diffusers = pytest.importorskip("diffusers")
from diffusers.utils import torch_utils  # noqa: E402

CFG = {**BASE, "block_out_channels": (8, 16, 16),
       "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
       "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D")}


@pytest.fixture(scope="module")
def pair():
    theirs = randomize_(diffusers.UNet2DConditionModel(**CFG)).eval()
    ours = UNet2DConditionModel(**CFG).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


scale = st.floats(0.0, 1.6, allow_nan=False).map(lambda v: round(v, 3))


@settings(max_examples=8)
@given(s1=scale, s2=scale, b1=scale, b2=scale, h=st.integers(3, 12), w=st.integers(3, 12),
       batch=st.integers(1, 2), dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]))
def test_freeu_matches_diffusers(pair, s1, s2, b1, b2, h, w, batch, dtype):
    # diffusers skips FreeU when any scale is 0 (its truthiness check); we apply it whenever enabled.
    if 0.0 in (s1, s2, b1, b2):
        s1, s2, b1, b2 = (v or 0.5 for v in (s1, s2, b1, b2))
    ours, theirs = pair
    ours, theirs = copy.deepcopy(ours).to(dtype), copy.deepcopy(theirs).to(dtype)
    ours.enable_freeu(s1=s1, s2=s2, b1=b1, b2=b2)
    theirs.enable_freeu(s1=s1, s2=s2, b1=b1, b2=b2)
    (sample, t), kwargs = inputs_for("sd", batch=batch, hw=(4 * h, 4 * w) if h * w < 20 else (h, w))
    sample, kwargs["encoder_hidden_states"] = sample.to(dtype), kwargs["encoder_hidden_states"].to(dtype)
    with torch.no_grad():
        ref = theirs(sample, t, **copy.deepcopy(kwargs)).sample
        got = ours(sample, t, **copy.deepcopy(kwargs)).sample
    if dtype == torch.float32:
        assert (got - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())
    else:
        assert got.dtype == dtype and torch.equal(got, ref), (got.double() - ref.double()).abs().max().item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("hw", [(8, 8), (16, 32), (6, 10), (5, 7)])
def test_filter_and_backbone_steps_equal_diffusers(dtype, hw):
    """Our two FreeU steps against diffusers' own `fourier_filter` and `apply_freeu`: bit-equal."""
    x = (torch.randn(2, 6, *hw, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    ours = freeu.fourier_filter(x, torch.tensor(0.37))
    assert ours.dtype == dtype and torch.equal(ours, torch_utils.fourier_filter(x, threshold=1, scale=0.37))
    hidden = x.clone()
    hidden_ref, _ = torch_utils.apply_freeu(0, hidden, x, s1=0.37, b1=1.3)
    got = freeu.scale_backbone(x, torch.tensor(1.3))
    if dtype != torch.float64:
        assert torch.equal(got, hidden_ref)
    else:  # fp64: diffusers multiplies by the double 1.3, our scale buffers hold float32(1.3)
        assert (got - hidden_ref).abs().max() <= x.abs().max() * abs(float(torch.tensor(1.3)) - 1.3) * 1.01


def test_diffusers_runs_the_fp16_filter_in_float32_at_power_of_two_sizes():
    """The oracle's behaviour we copy: no complex32 FFT even where fp16 could take it (power-of-two H, W)."""
    x = torch.randn(1, 4, 16, 16).half()
    assert torch.equal(torch_utils.fourier_filter(x, threshold=1, scale=0.4),
                       torch_utils.fourier_filter(x.float(), threshold=1, scale=0.4).half())


def test_freeu_scales_stay_float32_under_dtype_casts(pair):
    ours = copy.deepcopy(pair[0])
    ours.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    ours.half()
    assert ours.up_blocks[0].freeu.b.dtype == torch.float32 and ours.up_blocks[0].freeu.b.item() == pytest.approx(1.2)


def test_changing_freeu_scales_updates_the_exported_program(pair):
    model = copy.deepcopy(pair[0])
    model.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    (sample, t), kwargs = inputs_for("sd")
    ep = compiled_unet.export(model, sample, t, **kwargs)
    program = ep.module()
    before = program(sample, t, **kwargs, return_dict=False)[0]
    model.enable_freeu(s1=0.5, s2=0.7, b1=1.5, b2=1.1)  # in-place on the buffers the program reads
    after = program(sample, t, **kwargs, return_dict=False)[0]
    with torch.no_grad():
        expected = model(sample, t, **kwargs).sample
    assert (after - before).abs().max() > 1e-3
    assert (after - expected).abs().max().item() <= 1e-6 * max(1.0, expected.abs().max().item())


def test_freeu_needs_two_up_blocks():
    one = UNet2DConditionModel(**{**BASE, "block_out_channels": (8,), "down_block_types": ("DownBlock2D",),
                                  "up_block_types": ("UpBlock2D",), "attention_head_dim": 2})
    with pytest.raises(ValueError, match="enable_freeu needs at least two up blocks"):
        one.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
