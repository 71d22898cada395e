"""Down, mid and up blocks in Flax, mirroring `compiled_unet/blocks.py` (same `BlockArgs`, same math).

Ported families: DownBlock2D/UpBlock2D, CrossAttn*, Attn*, ResnetDownsample/ResnetUpsample, SimpleCrossAttn*,
and the three mid blocks. Names inside a block are diffusers' (`resnets_0`, `attentions_0`,
`downsamplers_0`, `upsamplers_0`); K-diffusion and score-SDE skip blocks are refused in `model.py`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from ..blocks import BlockArgs
from .layers import (Attention, Downsample2D, Dtype, ResnetBlock2D, Transformer2DModel, Upsample2D)

CROSS_ATTN = ("CrossAttnDownBlock2D", "CrossAttnUpBlock2D", "UNetMidBlock2DCrossAttn")
SPATIAL_ATTN = ("AttnDownBlock2D", "AttnUpBlock2D")
ADDED_KV = ("SimpleCrossAttnDownBlock2D", "SimpleCrossAttnUpBlock2D", "UNetMidBlock2DSimpleCrossAttn")
RESNET_RESAMPLE = ("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D", "ResnetUpsampleBlock2D",
                   "SimpleCrossAttnUpBlock2D", "UNetMidBlock2DSimpleCrossAttn")
SUPPORTED_DOWN = ("DownBlock2D", "CrossAttnDownBlock2D", "AttnDownBlock2D", "ResnetDownsampleBlock2D",
                  "SimpleCrossAttnDownBlock2D")
SUPPORTED_UP = ("UpBlock2D", "CrossAttnUpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D", "SimpleCrossAttnUpBlock2D")
SUPPORTED_MID = ("UNetMidBlock2D", "UNetMidBlock2DCrossAttn", "UNetMidBlock2DSimpleCrossAttn", None)


@dataclass(frozen=True)
class Options:
    """Model-wide Flax choices passed to every block."""

    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    memory_efficient: bool = False
    split_head_dim: bool = False
    gelu_approximate: bool = False
    transformer_norm_eps: float = 1e-6

    @property
    def kw(self) -> dict:
        return dict(dtype=self.dtype, param_dtype=self.param_dtype)


@dataclass(frozen=True)
class Ctx:
    """What attention layers see besides hidden states (our torch `Conditioning`)."""

    encoder_hidden_states: object = None
    attention_mask: object = None
    encoder_attention_mask: object = None


def _resnet(a: BlockArgs, o: Options, cin: int, cout: int, name: str, groups: Optional[int] = None,
            output_scale_factor: float = 1.0, resample: bool = False, **kw) -> ResnetBlock2D:
    if resample:  # ResnetDownsample/Upsample families: diffusers passes these two only there
        kw.update(skip_time_act=a.resnet_skip_time_act)
        output_scale_factor = a.resnet_out_scale_factor
    return ResnetBlock2D(cin, cout, a.temb_channels, groups if groups is not None else a.resnet_groups, a.resnet_eps,
                         a.resnet_act_fn, dropout=a.dropout, time_embedding_norm=a.resnet_time_scale_shift,
                         output_scale_factor=output_scale_factor, name=name, **kw, **o.kw)


def _transformer(a: BlockArgs, o: Options, channels: int, layers: int, name: str,
                 only_cross_attention: Optional[bool] = None) -> Transformer2DModel:
    only = a.only_cross_attention if only_cross_attention is None else only_cross_attention
    return Transformer2DModel(
        a.num_attention_heads, channels // a.num_attention_heads, channels, layers, a.resnet_groups,
        a.cross_attention_dim, a.use_linear_projection, only, a.dropout, o.gelu_approximate, o.memory_efficient,
        o.split_head_dim, norm_eps=o.transformer_norm_eps, name=name, **o.kw)


def _spatial_attention(a: BlockArgs, o: Options, channels: int, name: str) -> Attention:
    head_dim = a.attention_head_dim if a.attention_head_dim is not None else channels
    return Attention(channels, channels // head_dim, head_dim, bias=True, norm_num_groups=a.resnet_groups,
                     eps=a.resnet_eps, residual_connection=True, memory_efficient=o.memory_efficient,
                     split_head_dim=o.split_head_dim, name=name, **o.kw)


def _added_kv_attention(a: BlockArgs, o: Options, channels: int, name: str) -> Attention:
    return Attention(channels, channels // a.attention_head_dim, a.attention_head_dim, cross_attention_dim=channels,
                     bias=True, norm_num_groups=a.resnet_groups, added_kv_proj_dim=a.cross_attention_dim,
                     only_cross_attention=a.only_cross_attention, cross_attention_norm=a.cross_attention_norm,
                     memory_efficient=o.memory_efficient, split_head_dim=o.split_head_dim, name=name, **o.kw)


def _layers(value, n: int) -> list:
    return [value] * n if isinstance(value, int) else list(value)


def _attention(kind: str, a: BlockArgs, o: Options, i: int, channels: int, layers: list):
    name = f"attentions_{i}"
    if kind in CROSS_ATTN:
        return _transformer(a, o, channels, layers[i], name)
    if kind in SPATIAL_ATTN:
        return _spatial_attention(a, o, channels, name)
    if kind in ADDED_KV:
        return _added_kv_attention(a, o, channels, name)
    return None


def _attn_call(kind: str, attn, x, ctx: Ctx, deterministic: bool):
    if kind in CROSS_ATTN:
        return attn(x, ctx.encoder_hidden_states, ctx.attention_mask, ctx.encoder_attention_mask, deterministic)
    if kind in ADDED_KV:
        mask = ctx.attention_mask
        if mask is None:
            mask = None if ctx.encoder_hidden_states is None else ctx.encoder_attention_mask
        return attn(x, ctx.encoder_hidden_states, mask, deterministic)
    return attn(x, None, None, deterministic)  # spatial self-attention


class DownBlock(nn.Module):
    kind: str
    args: BlockArgs
    opts: Options

    @nn.compact
    def __call__(self, x, temb, ctx: Ctx, additional_residual=None, deterministic: bool = True):
        a, o = self.args, self.opts
        layers = _layers(a.transformer_layers_per_block, a.num_layers)
        resample = self.kind in RESNET_RESAMPLE
        outputs = ()
        for i in range(a.num_layers):
            cin = a.in_channels if i == 0 else a.out_channels
            x = _resnet(a, o, cin, a.out_channels, f"resnets_{i}", resample=resample)(x, temb, deterministic)
            attn = _attention(self.kind, a, o, i, a.out_channels, layers)
            if attn is not None:
                x = _attn_call(self.kind, attn, x, ctx, deterministic)
            if i == a.num_layers - 1 and additional_residual is not None:
                x = x + additional_residual
            outputs += (x,)
        if a.add_sample:
            if resample:
                x = _resnet(a, o, a.out_channels, a.out_channels, "downsamplers_0", resample=True,
                            down=True)(x, temb, deterministic)
            else:
                x = Downsample2D(a.out_channels, True, a.downsample_padding, name="downsamplers_0", **o.kw)(x)
            outputs += (x,)
        return x, outputs


class MidBlock(nn.Module):
    kind: str
    args: BlockArgs
    opts: Options

    @nn.compact
    def __call__(self, x, temb, ctx: Ctx, deterministic: bool = True):
        a, o = self.args, self.opts
        groups = a.resnet_groups if a.resnet_groups is not None else min(a.in_channels // 4, 32)
        c = a.in_channels
        kw = dict(groups=groups, output_scale_factor=a.output_scale_factor)
        if self.kind == "UNetMidBlock2DSimpleCrossAttn":
            kw["skip_time_act"] = a.resnet_skip_time_act
        x = _resnet(a, o, c, c, "resnets_0", **kw)(x, temb, deterministic)
        if self.kind == "UNetMidBlock2D":
            return x
        from dataclasses import replace
        a = replace(a, resnet_groups=groups, only_cross_attention=(
            False if self.kind == "UNetMidBlock2DCrossAttn" else a.only_cross_attention))
        layers = _layers(a.transformer_layers_per_block, 1)
        attn = _attention(self.kind, a, o, 0, c, layers)
        x = _attn_call(self.kind, attn, x, ctx, deterministic)
        return _resnet(a, o, c, c, "resnets_1", **kw)(x, temb, deterministic)


class UpBlock(nn.Module):
    kind: str
    args: BlockArgs
    opts: Options

    @nn.compact
    def __call__(self, x, res_samples: tuple, temb, ctx: Ctx, upsample_size=None, deterministic: bool = True):
        a, o = self.args, self.opts
        layers = _layers(a.transformer_layers_per_block, a.num_layers)
        resample = self.kind in RESNET_RESAMPLE
        for i in range(a.num_layers):
            skip, res_samples = res_samples[-1], res_samples[:-1]
            x = jnp.concatenate([x, skip], axis=-1)
            x = _resnet(a, o, x.shape[-1], a.out_channels, f"resnets_{i}", resample=resample)(x, temb, deterministic)
            attn = _attention(self.kind, a, o, i, a.out_channels, layers)
            if attn is not None:
                x = _attn_call(self.kind, attn, x, ctx, deterministic)
        if a.add_sample:
            if resample:
                x = _resnet(a, o, a.out_channels, a.out_channels, "upsamplers_0", resample=True,
                            up=True)(x, temb, deterministic)
            else:
                x = Upsample2D(a.out_channels, True, name="upsamplers_0", **o.kw)(x, upsample_size)
        return x
