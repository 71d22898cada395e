"""FreeU fold: Fourier filter -> real matmuls (no fft/complex/upcast), backbone scale -> conv weights."""
import pytest
import torch
import torch.nn as nn
from diffusers.utils.torch_utils import fourier_filter
from hypothesis import given, strategies as st

from compiled_unet import passes
from compiled_unet.freeu import low_frequency_rect
from compiled_unet.passes.freeu_fourier import _check, _operator

FOURIER = [passes.remove_asserts, passes.remove_noops, passes.freeu_fourier]


class DiffusersFilter(nn.Module):
    """diffusers' fourier_filter: torch.ones mask, in-place slice fill, complex FFTs."""

    def __init__(self, s):
        super().__init__()
        self.s = s

    def forward(self, x):
        return torch.relu(fourier_filter(x, threshold=1, scale=self.s))


class OurFilter(nn.Module):
    """Our model's form: x.float(), where(rect, s, 1) with s a 0-d buffer (or an input), cast back."""

    def __init__(self, s, H, W, threshold=1, offset=1.0):
        super().__init__()
        self.offset = offset
        self.register_buffer("s", torch.tensor(s))
        rows = (torch.arange(H) >= H // 2 - threshold) & (torch.arange(H) < H // 2 + threshold)
        cols = (torch.arange(W) >= W // 2 - threshold) & (torch.arange(W) < W // 2 + threshold)
        self.register_buffer("rect", rows[:, None] & cols[None, :], persistent=False)

    def forward(self, x, s=None):
        s = self.s if s is None else s
        f = torch.fft.fftshift(torch.fft.fftn(x.float(), dim=(-2, -1)), dim=(-2, -1))
        f = f * torch.where(self.rect, s, 1.0)
        y = torch.fft.ifftn(torch.fft.ifftshift(f, dim=(-2, -1)), dim=(-2, -1)).real
        return y.to(x.dtype) + self.offset


@pytest.mark.parametrize("H,W", [(4, 4), (8, 8), (5, 6), (16, 8)])
@pytest.mark.parametrize("form", ["diffusers", "ours"])
def test_fourier_filter_becomes_real_matmuls(g, form, H, W):
    x = torch.randn(2, 3, H, W)
    m = DiffusersFilter(0.6) if form == "diffusers" else OurFilter(0.6, H, W)
    ep = g.export(m, x)
    ep2, rep = g.optimize(ep, *FOURIER)
    assert rep["freeu_fourier"] == 1
    assert g.complex_or_fft(ep2) == []
    assert g.count(ep2, "matmul") == 4 and g.count(ep2, "to.dtype", "_to_copy") == 0
    g.check_close(g.run(ep2, x), m(x))


def test_scale_as_input_or_buffer_keeps_a_tensor_scale(g):
    H = W = 8
    x, s = torch.randn(1, 2, H, W), torch.tensor(0.3)
    m = OurFilter(0.6, H, W)
    ep2, rep = g.optimize(g.export(m, x, s), *FOURIER)       # s is a graph input
    assert rep["freeu_fourier"] == 1 and g.complex_or_fft(ep2) == []
    g.check_close(g.run(ep2, x, s), m(x, s))
    g.check_close(g.run(ep2, x, torch.tensor(1.7)), m(x, torch.tensor(1.7)))
    # s as a buffer that stays a runtime tensor: the program still reads it
    ep3, rep3 = g.optimize(g.export(m, x), *FOURIER, config=passes.OptimizeConfig(fold_buffers=False))
    assert rep3["freeu_fourier"] == 1 and g.complex_or_fft(ep3) == []
    assert "s" in ep3.state_dict
    g.check_close(g.run(ep3, x), m(x))


def _exact_filter(x: torch.Tensor, s: float) -> torch.Tensor:
    """The filter of x's values in float64 (diffusers' own function would compute fp64 input in float32)."""
    h, w = x.shape[-2:]
    f = torch.fft.fftshift(torch.fft.fftn(x.double(), dim=(-2, -1)), dim=(-2, -1))
    f = f * torch.where(low_frequency_rect(h, w), s, 1.0)
    return torch.fft.ifftn(torch.fft.ifftshift(f, dim=(-2, -1)), dim=(-2, -1)).real


def _within_rounding(y: torch.Tensor, exact: torch.Tensor, slack: float) -> bool:
    """|y - exact| <= half an ulp of y's dtype at |exact|, plus `slack` x max|exact| (float32 arithmetic)."""
    _, e = torch.frexp(exact.abs().clamp_min(torch.finfo(y.dtype).tiny))
    half_ulp = torch.ldexp(torch.full_like(exact, torch.finfo(y.dtype).eps / 4), e)
    return bool(((y.double() - exact).abs() <= half_ulp + slack * exact.abs().max()).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("H,W", [(8, 8), (16, 16), (12, 20), (7, 9)])
@pytest.mark.parametrize("form", ["diffusers", "ours"])
def test_half_precision_filter_runs_in_float32(g, form, H, W, dtype):
    """diffusers upcasts bf16/fp16 skips to float32 for the FFT and rounds the result once; the folded
    filter keeps that: float32 matmuls between the upcast and the final cast. Tolerance: every element
    within half an ulp (of bf16/fp16) of the exact filter, plus 64 float32 epsilons x max|exact| for the
    float32 arithmetic -- the bound diffusers' own result meets (asserted too). A filter computed in
    bf16/fp16 misses it by hundreds of ulps."""
    x = (torch.randn(2, 16, H, W, generator=torch.Generator().manual_seed(0)) * 2).to(dtype)
    m = DiffusersFilter(0.6) if form == "diffusers" else OurFilter(0.6, H, W, offset=0.0)
    ep2, rep = g.optimize(g.export(m, x), *FOURIER)
    assert rep["freeu_fourier"] == 1 and g.complex_or_fft(ep2) == []
    matmuls = [n for n in ep2.graph.nodes if n.op == "call_function" and "matmul" in str(n.target)]
    assert len(matmuls) == 4 and all(n.meta["val"].dtype == torch.float32 for n in matmuls)
    got = g.run(ep2, x)
    exact = _exact_filter(x, 0.6)
    exact = exact.relu() if form == "diffusers" else exact  # DiffusersFilter ends in a relu (exact)
    slack = 64 * torch.finfo(torch.float32).eps
    assert got.dtype == dtype and _within_rounding(got, exact, slack)
    assert _within_rounding(m(x), exact, slack)  # eager: diffusers' filter / ours, FFT in float32


class NotRect(nn.Module):
    def forward(self, x):
        mask = torch.ones(x.shape[-2:])
        mask[0, 1] = 0.5
        mask[1, 0] = 0.5                     # two cells on a diagonal: not a rectangle
        f = torch.fft.fftshift(torch.fft.fftn(x, dim=(-2, -1)), dim=(-2, -1)) * mask
        return torch.fft.ifftn(torch.fft.ifftshift(f, dim=(-2, -1)), dim=(-2, -1)).real


class FullFFT(nn.Module):
    def forward(self, x):                    # FFT over all dims: not FreeU's filter
        f = torch.fft.fftshift(torch.fft.fftn(x), dim=(-2, -1)) * 0.5
        return torch.fft.ifftn(torch.fft.ifftshift(f, dim=(-2, -1))).real


@pytest.mark.parametrize("module", [NotRect(), FullFFT()])
def test_fourier_negative(g, module):
    x = torch.randn(1, 2, 4, 4)
    ep2, rep = g.optimize(g.export(module, x), *FOURIER)
    assert rep["freeu_fourier"] == 0 and g.count(ep2, "fft") > 0
    g.check_close(g.run(ep2, x), module(x))


@given(n=st.integers(1, 12), lo=st.integers(0, 11), width=st.integers(1, 12))
def test_operator_matches_fft(n, lo, width):
    """The derived complex operator reproduces fftshift/mask/ifftshift along one axis (float64)."""
    r = torch.zeros(n, dtype=torch.float64)
    r[min(lo, n - 1): min(n, lo + width)] = 1
    ones = torch.ones(1, dtype=torch.float64)
    assert _check(_operator(r), _operator(ones), 0.37, r, ones)


class Backbone(nn.Module):
    """A resnet tail (conv2 + shortcut conv) then diffusers' in-place `x[:, :k] *= b`, then a consumer."""

    def __init__(self, C=8, extra_user=False, shared_conv=False):
        super().__init__()
        self.conv2 = nn.Conv2d(C, C, 3, padding=1)
        self.shortcut = nn.Conv2d(C, C, 1)
        self.out = nn.Conv2d(C, 4, 1)
        self.extra_user, self.shared_conv = extra_user, shared_conv

    def forward(self, x):
        a = self.conv2(x)
        h = (self.shortcut(x) + a) / 1.0
        early = h.sum() if self.extra_user else 0   # a reader of h before the in-place write
        k = h.shape[1] // 2
        h[:, :k] = h[:, :k] * 1.3
        out = self.out(h) + early
        return out + a.mean() if self.shared_conv else out


def test_backbone_scale_folds_into_convs(g):
    x = torch.randn(2, 8, 6, 6)
    m = Backbone()
    ep2, rep = g.optimize(g.export(m, x))
    assert rep["freeu_backbone"] == 1 and rep["fold_channel_scale"] == 1
    assert g.count(ep2, "copy_", "mul") == 0
    assert "shortcut.weight_scaled" in ep2.constants and "conv2.bias_scaled" in ep2.constants
    g.check_close(g.run(ep2, x), m(x))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_backbone_scale_is_bit_exact(g, dtype):
    """diffusers' `h[:, :k] * b` (b a Python float) computes in float32 and rounds once; the functional
    multiply does the same, so the program equals eager bit for bit. Folding b into bf16/fp16 conv weights
    would round differently, so it is not done."""
    x = torch.randn(2, 8, 6, 6).to(dtype)
    m = Backbone().to(dtype)
    ep2, rep = g.optimize(g.export(m, x))
    assert rep["freeu_backbone"] == 1 and rep["fold_channel_scale"] == 0 and g.count(ep2, "copy_") == 0
    with torch.no_grad():
        assert torch.equal(g.run(ep2, x), m(x))


def test_backbone_scale_kept_as_one_multiply_when_conv_has_other_users(g):
    x = torch.randn(2, 8, 6, 6)
    m = Backbone(shared_conv=True)
    ep2, rep = g.optimize(g.export(m, x))
    assert rep["freeu_backbone"] == 1 and rep["fold_channel_scale"] == 0
    assert g.count(ep2, "copy_") == 0 and g.count(ep2, "aten.mul.Tensor") == 1
    g.check_close(g.run(ep2, x), m(x))


def test_backbone_write_with_an_earlier_reader_is_left_alone(g):
    x = torch.randn(2, 8, 6, 6)
    m = Backbone(extra_user=True)
    ep2, rep = g.optimize(g.export(m, x), passes.remove_asserts, passes.remove_noops, passes.freeu_backbone)
    assert rep["freeu_backbone"] == 0 and g.count(ep2, "copy_") == 1
    g.check_close(g.run(ep2, x), m(x))


class OurBackbone(nn.Module):
    """Our model's form: h * scale_vec with the first half of the channels scaled by a buffer b."""

    def __init__(self, C=8):
        super().__init__()
        self.up = nn.Conv2d(C, C, 3, padding=1)
        self.register_buffer("b", torch.tensor(1.4))

    def forward(self, x):
        h = self.up(x)
        C = h.shape[1]
        scale_vec = torch.cat([self.b.expand(C // 2), torch.ones(C - C // 2)]).view(C, 1, 1)
        return torch.relu(h * scale_vec)


def test_our_backbone_scale_folds_into_conv(g):
    x = torch.randn(1, 8, 5, 5)
    m = OurBackbone()
    ep2, rep = g.optimize(g.export(m, x))
    assert rep["fold_channel_scale"] == 1 and g.count(ep2, "aten.mul") == 0
    g.check_close(g.run(ep2, x), m(x))
    # b as a runtime buffer: one channel-scale multiply stays and still reads b
    ep3, rep3 = g.optimize(g.export(m, x), config=passes.OptimizeConfig(fold_buffers=False))
    assert rep3["fold_channel_scale"] == 0 and g.count(ep3, "aten.mul.Tensor") == 1
    g.check_close(g.run(ep3, x), m(x))
