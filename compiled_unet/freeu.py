"""FreeU (arXiv 2309.11497) with its scales as tensors, so changing them never changes the graph.

diffusers writes FreeU with in-place slice assignment and a Python-float mask; here the backbone
scale is one channel-scale multiply and the skip filter multiplies the spectrum by
`where(low_freq_rect, s, 1)`. The numbers are the same, bit for bit in fp32, bf16 and fp16: x * b in
ATen's op-math dtype for the first half of the channels, x * 1 (exact) for the rest, and the same float32
FFT and mask values in the Fourier domain (tests/test_freeu.py).
"""
from __future__ import annotations

import torch
from torch import nn


class FreeUScales(nn.Module):
    """One stage's scales: `b` for the backbone, `s` for the skip features. Always float32.

    The buffers are non-persistent (no state_dict keys, like diffusers' attributes) and stay float32
    when the model is cast to fp16/bf16, as diffusers keeps Python floats.
    """

    def __init__(self, b: float, s: float):
        super().__init__()
        self.register_buffer("b", torch.tensor(float(b), dtype=torch.float32), persistent=False)
        self.register_buffer("s", torch.tensor(float(s), dtype=torch.float32), persistent=False)

    def set(self, b: float, s: float) -> None:
        with torch.no_grad():
            self.b.fill_(float(b))
            self.s.fill_(float(s))

    def _apply(self, fn, recurse=True):
        # A dtype cast (model.half()) must not round the scales; device moves still apply. So keep the
        # float32 values and take only the device from what `fn` made of them.
        saved = dict(self._buffers)
        super()._apply(fn, recurse)
        for name, old in saved.items():
            self._buffers[name] = old.to(device=self._buffers[name].device, dtype=torch.float32)
        return self

    def forward(self, hidden_states: torch.Tensor, res_hidden_states: torch.Tensor):
        return scale_backbone(hidden_states, self.b), fourier_filter(res_hidden_states, self.s)


def scale_backbone(x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Multiply the first half of the channels by b. x: [B, C, H, W]."""
    half = x.shape[1] // 2
    ones = torch.ones(x.shape[1] - half, dtype=torch.float32, device=x.device)
    channel_scale = torch.cat([b.to(x.device).expand(half), ones]).view(1, -1, 1, 1)
    # diffusers multiplies by a Python float, which ATen computes in the op-math dtype (float32 for
    # bf16/fp16/fp32, float64 for fp64) and rounds once to x's dtype: bit-equal for bf16/fp16/fp32.
    opmath = torch.promote_types(x.dtype, torch.float32)
    return (x.to(opmath) * channel_scale.to(opmath)).to(x.dtype)


def low_frequency_rect(height: int, width: int, threshold: int = 1, device=None) -> torch.Tensor:
    """Boolean [H, W] mask of the centered low-frequency square (Python slice semantics as diffusers)."""
    rect = torch.zeros(height, width, dtype=torch.bool, device=device)
    crow, ccol = height // 2, width // 2
    rect[crow - threshold: crow + threshold, ccol - threshold: ccol + threshold] = True
    return rect


def fourier_filter(x: torch.Tensor, s: torch.Tensor, threshold: int = 1) -> torch.Tensor:
    """Scale the low frequencies of x's spatial spectrum by s, in float32 whatever x's dtype, rounded back
    once: diffusers' `fourier_filter` upcasts every non-float32 input (bf16 has no FFT; fp16 would give
    complex32) and every non-power-of-two size, and casts back, so ours is bit-equal to it in every dtype."""
    h, w = x.shape[-2:]
    x_freq = torch.fft.fftshift(torch.fft.fftn(x.float(), dim=(-2, -1)), dim=(-2, -1))
    mask = torch.where(low_frequency_rect(h, w, threshold, x.device), s.to(x.device), torch.ones((), device=x.device))
    x_freq = torch.fft.ifftshift(x_freq * mask, dim=(-2, -1))
    return torch.fft.ifftn(x_freq, dim=(-2, -1)).real.to(x.dtype)
