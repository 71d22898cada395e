"""Convolutional building blocks: resnets, up/down-samplers (plain, FIR and K-diffusion), norms.

Parameter names follow diffusers exactly (`norm1`, `conv1`, `time_emb_proj`, `conv_shortcut`,
`downsamplers.0.conv`, ...) so diffusers' state dicts load unchanged. Every forward is shape-static:
nothing branches on tensor values.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

_ACTIVATIONS = {"swish": nn.SiLU, "silu": nn.SiLU, "mish": nn.Mish, "gelu": nn.GELU, "relu": nn.ReLU}


def get_activation(name: str) -> nn.Module:
    try:
        return _ACTIVATIONS[name.lower()]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(_ACTIVATIONS)}") from None


class AdaGroupNorm(nn.Module):
    """GroupNorm whose scale and shift come from the time embedding (K-diffusion blocks)."""

    def __init__(self, embedding_dim: int, out_dim: int, num_groups: int, eps: float = 1e-5):
        super().__init__()
        self.num_groups, self.eps = num_groups, eps
        self.linear = nn.Linear(embedding_dim, out_dim * 2)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.linear(emb)[:, :, None, None].chunk(2, dim=1)
        return F.group_norm(x, self.num_groups, eps=self.eps) * (1 + scale) + shift


class Upsample2D(nn.Module):
    """Nearest 2x upsampling (to `output_size` when given), optionally followed by a 3x3 conv."""

    def __init__(self, channels: int, use_conv: bool = False, out_channels: Optional[int] = None):
        super().__init__()
        self.channels, self.use_conv = channels, use_conv
        self.conv = nn.Conv2d(channels, out_channels or channels, 3, padding=1) if use_conv else None

    def forward(self, x: torch.Tensor, output_size: Optional[tuple] = None) -> torch.Tensor:
        # Same op as diffusers: scale_factor=2 unless the skip connection's size is forwarded.
        if output_size is None:
            x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        else:
            x = F.interpolate(x, size=tuple(output_size), mode="nearest")
        return self.conv(x) if self.use_conv else x


class Downsample2D(nn.Module):
    """Stride-2 3x3 conv, or 2x2 average pooling without a conv."""

    def __init__(self, channels: int, use_conv: bool = False, out_channels: Optional[int] = None, padding: int = 1):
        super().__init__()
        self.channels, self.padding, self.use_conv = channels, padding, use_conv
        if use_conv:
            self.conv = nn.Conv2d(channels, out_channels or channels, 3, stride=2, padding=padding)
        else:
            self.conv = nn.AvgPool2d(kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.use_conv and self.padding == 0:
            x = F.pad(x, (0, 1, 0, 1))
        return self.conv(x)


# -- FIR resampling (score-SDE "skip" blocks) ------------------------------------------------------

def _fir_kernel(kernel=(1, 3, 3, 1), gain: float = 1.0) -> torch.Tensor:
    k = torch.tensor(kernel, dtype=torch.float32)
    k = torch.outer(k, k)
    return k / torch.sum(k) * gain


def upfirdn2d(x: torch.Tensor, kernel: torch.Tensor, up: int = 1, down: int = 1, pad=(0, 0)) -> torch.Tensor:
    """Upsample (zero insertion), FIR-filter and downsample each channel: diffusers' `upfirdn2d_native`."""
    pad0, pad1 = pad
    _, channel, in_h, in_w = x.shape
    kh, kw = kernel.shape
    out = x.reshape(-1, in_h, 1, in_w, 1, 1)
    out = F.pad(out, [0, 0, 0, up - 1, 0, 0, 0, up - 1])
    out = out.view(-1, in_h * up, in_w * up, 1)
    out = F.pad(out, [0, 0, max(pad0, 0), max(pad1, 0), max(pad0, 0), max(pad1, 0)])
    out = out[:, max(-pad0, 0): out.shape[1] - max(-pad1, 0), max(-pad0, 0): out.shape[2] - max(-pad1, 0), :]
    out = out.permute(0, 3, 1, 2).reshape([-1, 1, in_h * up + pad0 + pad1, in_w * up + pad0 + pad1])
    w = torch.flip(kernel, [0, 1]).view(1, 1, kh, kw)
    out = F.conv2d(out, w)
    out = out.reshape(-1, 1, in_h * up + pad0 + pad1 - kh + 1, in_w * up + pad0 + pad1 - kw + 1)
    out = out.permute(0, 2, 3, 1)[:, ::down, ::down, :]
    out_h = (in_h * up + pad0 + pad1 - kh) // down + 1
    out_w = (in_w * up + pad0 + pad1 - kw) // down + 1
    return out.reshape(-1, channel, out_h, out_w)


def fir_upsample(x: torch.Tensor, kernel=(1, 3, 3, 1), factor: int = 2) -> torch.Tensor:
    k = _fir_kernel(kernel, gain=factor**2).to(device=x.device, dtype=x.dtype)
    p = k.shape[0] - factor
    return upfirdn2d(x, k, up=factor, pad=((p + 1) // 2 + factor - 1, p // 2))


def fir_downsample(x: torch.Tensor, kernel=(1, 3, 3, 1), factor: int = 2) -> torch.Tensor:
    k = _fir_kernel(kernel).to(device=x.device, dtype=x.dtype)
    p = k.shape[0] - factor
    return upfirdn2d(x, k, down=factor, pad=((p + 1) // 2, p // 2))


class FirUpsample2D(nn.Module):
    """FIR 2x upsampling without a conv (the only form the UNet builds)."""

    def __init__(self, channels: Optional[int] = None, out_channels: Optional[int] = None):
        super().__init__()
        self.out_channels = out_channels or channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fir_upsample(x)


class FirDownsample2D(nn.Module):
    def __init__(self, channels: Optional[int] = None, out_channels: Optional[int] = None):
        super().__init__()
        self.out_channels = out_channels or channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fir_downsample(x)


class _KResample(nn.Module):
    """K-diffusion's depthwise (1,3,3,1)/8 filter applied per channel with reflect padding."""

    def __init__(self, gain: float):
        super().__init__()
        k1 = torch.tensor([[1 / 8, 3 / 8, 3 / 8, 1 / 8]]) * gain
        self.pad = k1.shape[1] // 2 - 1
        self.register_buffer("kernel", k1.T @ k1, persistent=False)

    def _weight(self, x: torch.Tensor) -> torch.Tensor:
        # Diagonal [C, C, 4, 4] weight; built by multiplication so values equal diffusers' index_put.
        eye = torch.eye(x.shape[1], device=x.device, dtype=x.dtype)
        return eye[:, :, None, None] * self.kernel.to(x)[None, None]


class KDownsample2D(_KResample):
    def __init__(self):
        super().__init__(gain=1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, (self.pad,) * 4, "reflect")
        return F.conv2d(x, self._weight(x), stride=2)


class KUpsample2D(_KResample):
    def __init__(self):
        super().__init__(gain=2.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.pad(x, ((self.pad + 1) // 2,) * 4, "reflect")
        return F.conv_transpose2d(x, self._weight(x), stride=2, padding=self.pad * 2 + 1)


class ResnetBlock2D(nn.Module):
    """GroupNorm-act-conv twice with the time embedding added (or scale-shifted) in between."""

    def __init__(
        self, *, in_channels: int, out_channels: Optional[int] = None, dropout: float = 0.0,
        temb_channels: Optional[int] = 512, groups: int = 32, groups_out: Optional[int] = None, eps: float = 1e-6,
        non_linearity: str = "swish", skip_time_act: bool = False, time_embedding_norm: str = "default",
        kernel: Optional[str] = None, output_scale_factor: float = 1.0, use_in_shortcut: Optional[bool] = None,
        up: bool = False, down: bool = False, conv_shortcut_bias: bool = True,
        conv_2d_out_channels: Optional[int] = None,
    ):
        super().__init__()
        out_channels = out_channels or in_channels
        conv_2d_out_channels = conv_2d_out_channels or out_channels
        self.time_embedding_norm, self.skip_time_act = time_embedding_norm, skip_time_act
        self.output_scale_factor = output_scale_factor
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=eps, affine=True)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.time_emb_proj = None
        if temb_channels is not None:
            proj_dim = 2 * out_channels if time_embedding_norm == "scale_shift" else out_channels
            self.time_emb_proj = nn.Linear(temb_channels, proj_dim)
        self.norm2 = nn.GroupNorm(groups_out or groups, out_channels, eps=eps, affine=True)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, conv_2d_out_channels, 3, padding=1)
        self.nonlinearity = get_activation(non_linearity)
        self.upsample = self.downsample = None
        if up:
            self.upsample = _FirResample(fir_upsample) if kernel == "fir" else Upsample2D(in_channels)
        elif down:
            self.downsample = _FirResample(fir_downsample) if kernel == "fir" else Downsample2D(in_channels)
        if use_in_shortcut is None:
            use_in_shortcut = in_channels != conv_2d_out_channels
        self.conv_shortcut = (
            nn.Conv2d(in_channels, conv_2d_out_channels, 1, bias=conv_shortcut_bias) if use_in_shortcut else None
        )

    def forward(self, input_tensor: torch.Tensor, temb: Optional[torch.Tensor]) -> torch.Tensor:
        h = self.nonlinearity(self.norm1(input_tensor))
        if self.upsample is not None:
            input_tensor, h = self.upsample(input_tensor), self.upsample(h)
        elif self.downsample is not None:
            input_tensor, h = self.downsample(input_tensor), self.downsample(h)
        h = self.conv1(h)
        if self.time_emb_proj is not None and temb is not None:
            if not self.skip_time_act:
                temb = self.nonlinearity(temb)
            temb = self.time_emb_proj(temb)[:, :, None, None]
        if self.time_embedding_norm == "scale_shift":
            time_scale, time_shift = torch.chunk(temb, 2, dim=1)
            h = self.norm2(h) * (1 + time_scale) + time_shift
        else:
            if temb is not None:
                h = h + temb
            h = self.norm2(h)
        h = self.conv2(self.dropout(self.nonlinearity(h)))
        if self.conv_shortcut is not None:
            input_tensor = self.conv_shortcut(input_tensor)
        return (input_tensor + h) / self.output_scale_factor


class _FirResample(nn.Module):
    """Parameter-free wrapper so a FIR resampler is a module (diffusers stores a lambda here)."""

    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)


class ResnetBlockCondNorm2D(nn.Module):
    """The K-diffusion resnet: AdaGroupNorm conditioned on the time embedding, no additive temb."""

    def __init__(
        self, *, in_channels: int, out_channels: Optional[int] = None, dropout: float = 0.0,
        temb_channels: int = 512, groups: int = 32, groups_out: Optional[int] = None, eps: float = 1e-6,
        non_linearity: str = "swish", output_scale_factor: float = 1.0, conv_shortcut_bias: bool = True,
        conv_2d_out_channels: Optional[int] = None,
    ):
        super().__init__()
        out_channels = out_channels or in_channels
        conv_2d_out_channels = conv_2d_out_channels or out_channels
        self.output_scale_factor = output_scale_factor
        self.norm1 = AdaGroupNorm(temb_channels, in_channels, groups, eps=eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = AdaGroupNorm(temb_channels, out_channels, groups_out or groups, eps=eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, conv_2d_out_channels, 3, padding=1)
        self.nonlinearity = get_activation(non_linearity)
        self.conv_shortcut = None
        if in_channels != conv_2d_out_channels:
            self.conv_shortcut = nn.Conv2d(in_channels, conv_2d_out_channels, 1, bias=conv_shortcut_bias)

    def forward(self, input_tensor: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(self.nonlinearity(self.norm1(input_tensor, temb)))
        h = self.conv2(self.dropout(self.nonlinearity(self.norm2(h, temb))))
        if self.conv_shortcut is not None:
            input_tensor = self.conv_shortcut(input_tensor)
        return (input_tensor + h) / self.output_scale_factor
