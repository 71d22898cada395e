"""Down, mid and up blocks: every block type diffusers builds for UNet2DConditionModel.

Each block takes the same modules (and so the same state_dict keys) as diffusers'. Forwards are
written once per block family; nothing branches on tensor values. Down blocks return
`(hidden_states, res_samples)`, skip blocks also thread a `skip_sample`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .attention import Attention, DualTransformer2DModel, KAttentionBlock, Transformer2DModel
from .freeu import FreeUScales
from .layers import (Downsample2D, FirDownsample2D, FirUpsample2D, KDownsample2D, KUpsample2D, ResnetBlock2D,
                     ResnetBlockCondNorm2D, Upsample2D)


@dataclass(frozen=True)
class BlockArgs:
    """Everything a block constructor may need; built once per block by the UNet."""

    num_layers: int
    in_channels: int
    out_channels: int
    temb_channels: int
    resnet_eps: float
    resnet_act_fn: str
    resnet_groups: Optional[int]
    prev_output_channel: int = 0
    add_sample: bool = True  # add_downsample / add_upsample
    resolution_idx: Optional[int] = None
    transformer_layers_per_block: object = 1
    num_attention_heads: int = 1
    attention_head_dim: int = 1
    cross_attention_dim: Optional[int] = None
    downsample_padding: int = 1
    dual_cross_attention: bool = False
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    upcast_attention: bool = False
    resnet_time_scale_shift: str = "default"
    attention_type: str = "default"
    resnet_skip_time_act: bool = False
    resnet_out_scale_factor: float = 1.0
    cross_attention_norm: Optional[str] = None
    dropout: float = 0.0
    output_scale_factor: float = 1.0  # mid blocks: mid_block_scale_factor


def shared_block_args(c, p) -> dict:
    """The BlockArgs fields every block of a UNet shares, from its UNetConfig `c` and plan `p` (`c.plan()`);
    the PyTorch UNet and the Flax one (compiled_unet/flax) both build their blocks from these."""
    return dict(temb_channels=p.blocks_time_embed_dim, resnet_eps=c.norm_eps, resnet_act_fn=c.act_fn,
                resnet_groups=c.norm_num_groups, downsample_padding=c.downsample_padding,
                dual_cross_attention=c.dual_cross_attention, use_linear_projection=c.use_linear_projection,
                upcast_attention=c.upcast_attention, resnet_time_scale_shift=c.resnet_time_scale_shift,
                attention_type=c.attention_type, resnet_skip_time_act=c.resnet_skip_time_act,
                resnet_out_scale_factor=c.resnet_out_scale_factor,
                cross_attention_norm=c.cross_attention_norm, dropout=c.dropout)


def _resnet(a: BlockArgs, cin: int, cout: int, **kw) -> ResnetBlock2D:
    kw.setdefault("groups", a.resnet_groups)
    kw.setdefault("output_scale_factor", 1.0)
    return ResnetBlock2D(in_channels=cin, out_channels=cout, temb_channels=a.temb_channels, eps=a.resnet_eps,
                         dropout=a.dropout, time_embedding_norm=a.resnet_time_scale_shift,
                         non_linearity=a.resnet_act_fn, **kw)


def _transformer(a: BlockArgs, channels: int, layers) -> nn.Module:
    if a.dual_cross_attention:
        return DualTransformer2DModel(a.num_attention_heads, channels // a.num_attention_heads, channels, 1,
                                      norm_num_groups=a.resnet_groups, cross_attention_dim=a.cross_attention_dim)
    return Transformer2DModel(
        a.num_attention_heads, channels // a.num_attention_heads, in_channels=channels, num_layers=layers,
        norm_num_groups=a.resnet_groups, cross_attention_dim=a.cross_attention_dim,
        use_linear_projection=a.use_linear_projection, only_cross_attention=a.only_cross_attention,
        upcast_attention=a.upcast_attention, attention_type=a.attention_type,
    )


def _attentions_first(block: nn.Module) -> None:
    """Register `attentions` before `resnets`, as diffusers does, so state_dict key order matches too."""
    if "attentions" in block._modules:
        block._modules = {"attentions": block._modules["attentions"],
                          **{k: v for k, v in block._modules.items() if k != "attentions"}}


def _transformers(a: BlockArgs) -> nn.ModuleList:
    """One Transformer2DModel per layer of a cross-attention down/up block."""
    layers = _per_layer(a.transformer_layers_per_block, a.num_layers)
    return nn.ModuleList([_transformer(a, a.out_channels, layers[i]) for i in range(a.num_layers)])


def _per_layer(value, n: int) -> list:
    return [value] * n if isinstance(value, int) else list(value)


def _spatial_attention(a: BlockArgs, channels: int, groups: Optional[int], output_scale_factor: float = 1.0,
                       from_deprecated_attn_block: bool = True) -> Attention:
    head_dim = a.attention_head_dim if a.attention_head_dim is not None else channels
    return Attention(channels, heads=channels // head_dim, dim_head=head_dim,
                     rescale_output_factor=output_scale_factor, eps=a.resnet_eps, norm_num_groups=groups,
                     residual_connection=True, bias=True, upcast_softmax=True)


def _added_kv_attention(a: BlockArgs, channels: int, only_cross_attention: bool) -> Attention:
    return Attention(query_dim=channels, cross_attention_dim=channels, heads=channels // a.attention_head_dim,
                     dim_head=a.attention_head_dim, added_kv_proj_dim=a.cross_attention_dim,
                     norm_num_groups=a.resnet_groups, bias=True, upcast_softmax=True,
                     only_cross_attention=only_cross_attention, cross_attention_norm=a.cross_attention_norm)


def _attn_call(attn, hidden_states, temb, ctx) -> torch.Tensor:
    """Call one attention-like module with the conditioning it understands."""
    if isinstance(attn, (Transformer2DModel, DualTransformer2DModel)):
        return attn(hidden_states, encoder_hidden_states=ctx.encoder_hidden_states, attention_mask=ctx.attention_mask,
                    encoder_attention_mask=ctx.encoder_attention_mask,
                    cross_attention_kwargs=ctx.cross_attention_kwargs)
    if isinstance(attn, KAttentionBlock):
        return attn(hidden_states, encoder_hidden_states=ctx.encoder_hidden_states, emb=temb,
                    attention_mask=ctx.attention_mask, cross_attention_kwargs=ctx.cross_attention_kwargs,
                    encoder_attention_mask=ctx.encoder_attention_mask)
    if attn.added_kv_proj_dim is not None:  # SimpleCrossAttn blocks
        mask = ctx.attention_mask
        if mask is None:
            mask = None if ctx.encoder_hidden_states is None else ctx.encoder_attention_mask
        return attn(hidden_states, encoder_hidden_states=ctx.encoder_hidden_states, attention_mask=mask,
                    **ctx.processor_kwargs)
    return attn(hidden_states, **ctx.processor_kwargs)  # spatial self-attention (Attn blocks)


@dataclass
class Conditioning:
    """What attention layers see besides hidden states; one object passed through all blocks."""

    encoder_hidden_states: Optional[torch.Tensor] = None
    attention_mask: Optional[torch.Tensor] = None
    encoder_attention_mask: Optional[torch.Tensor] = None
    cross_attention_kwargs: Optional[dict] = None

    @property
    def processor_kwargs(self) -> dict:
        kw = self.cross_attention_kwargs or {}
        return {k: v for k, v in kw.items() if k not in ("scale", "gligen")}


NO_CONDITIONING = Conditioning()


# -- down blocks ---------------------------------------------------------------------------------

class _DownBlock(nn.Module):
    """resnet (+ attention) per layer, then an optional downsampler; every layer output is a skip."""

    has_cross_attention = False
    skip_none_without_downsampler = False  # K cross-attention blocks emit None skips (diffusers)

    def forward(self, hidden_states, temb, ctx: Conditioning = NO_CONDITIONING, additional_residuals=None):
        output_states = ()
        attentions = getattr(self, "attentions", None) or [None] * len(self.resnets)
        for i, (resnet, attn) in enumerate(zip(self.resnets, attentions)):
            hidden_states = resnet(hidden_states, temb)
            if attn is not None:
                hidden_states = _attn_call(attn, hidden_states, temb, ctx)
            if i == len(self.resnets) - 1 and additional_residuals is not None:
                hidden_states = hidden_states + additional_residuals
            if self.skip_none_without_downsampler and self.downsamplers is None:
                output_states += (None,)
            else:
                output_states += (hidden_states,)
        if self.downsamplers is not None:
            for down in self.downsamplers:
                hidden_states = down(hidden_states, temb) if isinstance(down, ResnetBlock2D) else down(hidden_states)
            if self.emit_downsampled:
                output_states += (hidden_states,)
        return hidden_states, output_states

    emit_downsampled = True


class DownBlock2D(_DownBlock):
    def __init__(self, a: BlockArgs):
        super().__init__()
        self.resnets = nn.ModuleList(
            [_resnet(a, a.in_channels if i == 0 else a.out_channels, a.out_channels) for i in range(a.num_layers)]
        )
        self.downsamplers = nn.ModuleList(
            [Downsample2D(a.out_channels, use_conv=True, out_channels=a.out_channels, padding=a.downsample_padding)]
        ) if a.add_sample else None


class CrossAttnDownBlock2D(DownBlock2D):
    has_cross_attention = True

    def __init__(self, a: BlockArgs):
        super().__init__(a)
        self.attentions = _transformers(a)
        _attentions_first(self)


class AttnDownBlock2D(_DownBlock):
    def __init__(self, a: BlockArgs):
        super().__init__()
        self.resnets = nn.ModuleList(
            [_resnet(a, a.in_channels if i == 0 else a.out_channels, a.out_channels) for i in range(a.num_layers)]
        )
        self.attentions = nn.ModuleList(
            [_spatial_attention(a, a.out_channels, a.resnet_groups) for _ in range(a.num_layers)]
        )
        _attentions_first(self)
        self.downsamplers = nn.ModuleList(
            [Downsample2D(a.out_channels, use_conv=True, out_channels=a.out_channels, padding=a.downsample_padding)]
        ) if a.add_sample else None


class ResnetDownsampleBlock2D(_DownBlock):
    def __init__(self, a: BlockArgs):
        super().__init__()
        kw = dict(skip_time_act=a.resnet_skip_time_act, output_scale_factor=a.resnet_out_scale_factor)
        self.resnets = nn.ModuleList(
            [_resnet(a, a.in_channels if i == 0 else a.out_channels, a.out_channels, **kw) for i in range(a.num_layers)]
        )
        self.downsamplers = nn.ModuleList(
            [_resnet(a, a.out_channels, a.out_channels, down=True, **kw)]
        ) if a.add_sample else None


class SimpleCrossAttnDownBlock2D(ResnetDownsampleBlock2D):
    has_cross_attention = True

    def __init__(self, a: BlockArgs):
        super().__init__(a)
        self.attentions = nn.ModuleList(
            [_added_kv_attention(a, a.out_channels, a.only_cross_attention) for _ in range(a.num_layers)]
        )
        _attentions_first(self)


class KDownBlock2D(_DownBlock):
    emit_downsampled = False

    def __init__(self, a: BlockArgs, group_size: int = 32):
        super().__init__()
        self.resnets = nn.ModuleList()
        for i in range(a.num_layers):
            cin = a.in_channels if i == 0 else a.out_channels
            self.resnets.append(ResnetBlockCondNorm2D(
                in_channels=cin, out_channels=a.out_channels, dropout=a.dropout, temb_channels=a.temb_channels,
                groups=cin // group_size, groups_out=a.out_channels // group_size, eps=a.resnet_eps,
                non_linearity=a.resnet_act_fn, conv_shortcut_bias=False))
        self.downsamplers = nn.ModuleList([KDownsample2D()]) if a.add_sample else None


class KCrossAttnDownBlock2D(KDownBlock2D):
    has_cross_attention = True
    skip_none_without_downsampler = True

    def __init__(self, a: BlockArgs, group_size: int = 32):
        super().__init__(a, group_size)
        self.attentions = nn.ModuleList([
            KAttentionBlock(a.out_channels, a.out_channels // a.attention_head_dim, a.attention_head_dim,
                            cross_attention_dim=a.cross_attention_dim, temb_channels=a.temb_channels,
                            attention_bias=True, add_self_attention=not a.add_sample,
                            cross_attention_norm="layer_norm", group_size=group_size)
            for _ in range(a.num_layers)
        ])


class SkipDownBlock2D(nn.Module):
    """Score-SDE block: resnets, then a FIR-downsampling resnet plus the FIR-downsampled input image.

    diffusers' UNet2DConditionModel cannot run these (its loop unpacks two values); we thread
    `skip_sample` as diffusers' UNet2DModel does.
    """

    has_cross_attention = False
    output_scale_factor = math.sqrt(2.0)

    def __init__(self, a: BlockArgs, with_attention: bool = False):
        super().__init__()
        self.resnets = nn.ModuleList()
        if with_attention:
            self.attentions = nn.ModuleList()
        for i in range(a.num_layers):
            cin = a.in_channels if i == 0 else a.out_channels
            self.resnets.append(_resnet(a, cin, a.out_channels, groups=min(cin // 4, 32),
                                        groups_out=min(a.out_channels // 4, 32),
                                        output_scale_factor=self.output_scale_factor))
            if with_attention:
                self.attentions.append(_spatial_attention(a, a.out_channels, 32, self.output_scale_factor))
        if a.add_sample:
            self.resnet_down = _resnet(a, a.out_channels, a.out_channels, groups=min(a.out_channels // 4, 32),
                                       output_scale_factor=self.output_scale_factor, use_in_shortcut=True,
                                       down=True, kernel="fir")
            self.downsamplers = nn.ModuleList([FirDownsample2D(a.out_channels, out_channels=a.out_channels)])
            self.skip_conv = nn.Conv2d(3, a.out_channels, kernel_size=(1, 1), stride=(1, 1))
        else:
            self.resnet_down = self.downsamplers = self.skip_conv = None
        _attentions_first(self)

    def forward(self, hidden_states, temb, skip_sample):
        output_states = ()
        attentions = getattr(self, "attentions", None) or [None] * len(self.resnets)
        for resnet, attn in zip(self.resnets, attentions):
            hidden_states = resnet(hidden_states, temb)
            if attn is not None:
                hidden_states = attn(hidden_states)
            output_states += (hidden_states,)
        if self.downsamplers is not None:
            hidden_states = self.resnet_down(hidden_states, temb)
            for down in self.downsamplers:
                skip_sample = down(skip_sample)
            hidden_states = self.skip_conv(skip_sample) + hidden_states
            output_states += (hidden_states,)
        return hidden_states, output_states, skip_sample


class AttnSkipDownBlock2D(SkipDownBlock2D):
    def __init__(self, a: BlockArgs):
        super().__init__(a, with_attention=True)


# -- mid blocks ----------------------------------------------------------------------------------

class UNetMidBlock2D(nn.Module):
    """The UNet builds it with num_layers=0: a single resnet."""

    has_cross_attention = False

    def __init__(self, a: BlockArgs):
        super().__init__()
        groups = a.resnet_groups if a.resnet_groups is not None else min(a.in_channels // 4, 32)
        self.attentions = nn.ModuleList([])
        self.resnets = nn.ModuleList(
            [_resnet(a, a.in_channels, a.in_channels, groups=groups, output_scale_factor=a.output_scale_factor)]
        )

    def forward(self, hidden_states, temb, ctx: Conditioning = NO_CONDITIONING):
        return self.resnets[0](hidden_states, temb)


class UNetMidBlock2DCrossAttn(nn.Module):
    has_cross_attention = True

    def __init__(self, a: BlockArgs, num_layers: int = 1):
        super().__init__()
        groups = a.resnet_groups if a.resnet_groups is not None else min(a.in_channels // 4, 32)
        a = _replace(a, resnet_groups=groups)
        layers = _per_layer(a.transformer_layers_per_block, num_layers)
        res = dict(output_scale_factor=a.output_scale_factor)
        self.resnets = nn.ModuleList([_resnet(a, a.in_channels, a.in_channels, **res)])
        self.attentions = nn.ModuleList()
        for i in range(num_layers):
            self.attentions.append(_transformer(_replace(a, only_cross_attention=False), a.in_channels, layers[i]))
            self.resnets.append(_resnet(a, a.in_channels, a.in_channels, **res))
        _attentions_first(self)

    def forward(self, hidden_states, temb, ctx: Conditioning = NO_CONDITIONING):
        hidden_states = self.resnets[0](hidden_states, temb)
        for attn, resnet in zip(self.attentions, self.resnets[1:]):
            hidden_states = resnet(_attn_call(attn, hidden_states, temb, ctx), temb)
        return hidden_states


class UNetMidBlock2DSimpleCrossAttn(nn.Module):
    has_cross_attention = True

    def __init__(self, a: BlockArgs, num_layers: int = 1):
        super().__init__()
        groups = a.resnet_groups if a.resnet_groups is not None else min(a.in_channels // 4, 32)
        a = _replace(a, resnet_groups=groups)
        res = dict(output_scale_factor=a.output_scale_factor, skip_time_act=a.resnet_skip_time_act)
        self.resnets = nn.ModuleList([_resnet(a, a.in_channels, a.in_channels, **res)])
        self.attentions = nn.ModuleList()
        for _ in range(num_layers):
            self.attentions.append(_added_kv_attention(a, a.in_channels, a.only_cross_attention))
            self.resnets.append(_resnet(a, a.in_channels, a.in_channels, **res))
        _attentions_first(self)

    forward = UNetMidBlock2DCrossAttn.forward


def _replace(a: BlockArgs, **changes) -> BlockArgs:
    import dataclasses
    return dataclasses.replace(a, **changes)


# -- up blocks -----------------------------------------------------------------------------------

class _UpBlock(nn.Module):
    """Per layer: concat the next skip, resnet (+ attention); then an optional upsampler.

    FreeU (UpBlock2D and CrossAttnUpBlock2D at resolution 0 and 1) rescales the backbone and
    Fourier-filters the skip before each concat, when enabled.
    """

    has_cross_attention = False
    supports_freeu = False

    def forward(self, hidden_states, res_hidden_states_tuple, temb, ctx: Conditioning = NO_CONDITIONING,
                upsample_size=None):
        freeu = getattr(self, "freeu", None)
        attentions = getattr(self, "attentions", None) or [None] * len(self.resnets)
        for resnet, attn in zip(self.resnets, attentions):
            res_hidden_states = res_hidden_states_tuple[-1]
            res_hidden_states_tuple = res_hidden_states_tuple[:-1]
            if freeu is not None:
                hidden_states, res_hidden_states = freeu(hidden_states, res_hidden_states)
            hidden_states = resnet(torch.cat([hidden_states, res_hidden_states], dim=1), temb)
            if attn is not None:
                hidden_states = _attn_call(attn, hidden_states, temb, ctx)
        if self.upsamplers is not None:
            for up in self.upsamplers:
                hidden_states = up(hidden_states, temb) if isinstance(up, ResnetBlock2D) else up(hidden_states, upsample_size)
        return hidden_states

    def set_freeu(self, b: Optional[float], s: Optional[float]) -> None:
        if b is None:
            self.freeu = None
        elif getattr(self, "freeu", None) is None:
            self.freeu = FreeUScales(b, s).to(self.resnets[0].conv1.weight.device)
        else:
            self.freeu.set(b, s)


def _up_resnet_channels(a: BlockArgs, i: int) -> int:
    res_skip = a.in_channels if i == a.num_layers - 1 else a.out_channels
    resnet_in = a.prev_output_channel if i == 0 else a.out_channels
    return resnet_in + res_skip


class UpBlock2D(_UpBlock):
    supports_freeu = True

    def __init__(self, a: BlockArgs):
        super().__init__()
        self.resolution_idx = a.resolution_idx
        self.freeu = None
        self.resnets = nn.ModuleList([_resnet(a, _up_resnet_channels(a, i), a.out_channels) for i in range(a.num_layers)])
        self.upsamplers = nn.ModuleList(
            [Upsample2D(a.out_channels, use_conv=True, out_channels=a.out_channels)]
        ) if a.add_sample else None


class CrossAttnUpBlock2D(UpBlock2D):
    has_cross_attention = True

    def __init__(self, a: BlockArgs):
        super().__init__(a)
        self.attentions = _transformers(a)
        _attentions_first(self)


class AttnUpBlock2D(_UpBlock):
    def __init__(self, a: BlockArgs):
        super().__init__()
        self.resolution_idx = a.resolution_idx
        self.resnets = nn.ModuleList([_resnet(a, _up_resnet_channels(a, i), a.out_channels) for i in range(a.num_layers)])
        self.attentions = nn.ModuleList(
            [_spatial_attention(a, a.out_channels, a.resnet_groups) for _ in range(a.num_layers)]
        )
        _attentions_first(self)
        self.upsamplers = nn.ModuleList(
            [Upsample2D(a.out_channels, use_conv=True, out_channels=a.out_channels)]
        ) if a.add_sample else None


class ResnetUpsampleBlock2D(_UpBlock):
    def __init__(self, a: BlockArgs):
        super().__init__()
        self.resolution_idx = a.resolution_idx
        kw = dict(skip_time_act=a.resnet_skip_time_act, output_scale_factor=a.resnet_out_scale_factor)
        self.resnets = nn.ModuleList(
            [_resnet(a, _up_resnet_channels(a, i), a.out_channels, **kw) for i in range(a.num_layers)]
        )
        self.upsamplers = nn.ModuleList(
            [_resnet(a, a.out_channels, a.out_channels, up=True, **kw)]
        ) if a.add_sample else None


class SimpleCrossAttnUpBlock2D(ResnetUpsampleBlock2D):
    has_cross_attention = True

    def __init__(self, a: BlockArgs):
        super().__init__(a)
        self.attentions = nn.ModuleList(
            [_added_kv_attention(a, a.out_channels, a.only_cross_attention) for _ in range(a.num_layers)]
        )
        _attentions_first(self)


class KUpBlock2D(nn.Module):
    """K-diffusion up block: concatenates only the last skip, then resnets (num_layers - 1 of them)."""

    has_cross_attention = False

    def __init__(self, a: BlockArgs, group_size: int = 32):
        super().__init__()
        self.resolution_idx = a.resolution_idx
        k_in, k_out = 2 * a.out_channels, a.in_channels
        n = a.num_layers - 1
        self.resnets = nn.ModuleList()
        for i in range(n):
            cin = k_in if i == 0 else a.out_channels
            self.resnets.append(ResnetBlockCondNorm2D(
                in_channels=cin, out_channels=k_out if i == n - 1 else a.out_channels, temb_channels=a.temb_channels,
                eps=a.resnet_eps, groups=cin // group_size, groups_out=a.out_channels // group_size,
                dropout=a.dropout, non_linearity=a.resnet_act_fn, conv_shortcut_bias=False))
        self.upsamplers = nn.ModuleList([KUpsample2D()]) if a.add_sample else None

    def forward(self, hidden_states, res_hidden_states_tuple, temb, ctx: Conditioning = NO_CONDITIONING,
                upsample_size=None):
        last = res_hidden_states_tuple[-1]
        if last is not None:
            hidden_states = torch.cat([hidden_states, last], dim=1)
        attentions = getattr(self, "attentions", None) or [None] * len(self.resnets)
        for resnet, attn in zip(self.resnets, attentions):
            hidden_states = resnet(hidden_states, temb)
            if attn is not None:
                hidden_states = _attn_call(attn, hidden_states, temb, ctx)
        if self.upsamplers is not None:
            for up in self.upsamplers:
                hidden_states = up(hidden_states)
        return hidden_states


class KCrossAttnUpBlock2D(KUpBlock2D):
    has_cross_attention = True

    def __init__(self, a: BlockArgs, group_size: int = 32):
        nn.Module.__init__(self)
        self.resolution_idx = a.resolution_idx
        is_first_block = a.in_channels == a.out_channels == a.temb_channels
        is_middle_block = a.in_channels != a.out_channels
        k_in = a.out_channels if is_first_block else 2 * a.out_channels
        k_out = a.in_channels
        n = a.num_layers - 1
        self.resnets, self.attentions = nn.ModuleList(), nn.ModuleList()
        for i in range(n):
            cin = k_in if i == 0 else a.out_channels
            last = i == n - 1
            self.resnets.append(ResnetBlockCondNorm2D(
                in_channels=cin, out_channels=a.out_channels,
                conv_2d_out_channels=k_out if (is_middle_block and last) else None, temb_channels=a.temb_channels,
                eps=a.resnet_eps, groups=cin // group_size, groups_out=a.out_channels // group_size,
                dropout=a.dropout, non_linearity=a.resnet_act_fn, conv_shortcut_bias=False))
            dim = k_out if last else a.out_channels
            self.attentions.append(KAttentionBlock(
                dim, dim // a.attention_head_dim, a.attention_head_dim, cross_attention_dim=a.cross_attention_dim,
                temb_channels=a.temb_channels, attention_bias=True, add_self_attention=is_first_block,
                cross_attention_norm="layer_norm", upcast_attention=a.upcast_attention))
        self.upsamplers = nn.ModuleList([KUpsample2D()]) if a.add_sample else None


class SkipUpBlock2D(nn.Module):
    """Score-SDE up block: resnets, then a FIR-upsampled RGB skip plus a FIR-upsampling resnet."""

    has_cross_attention = False
    output_scale_factor = math.sqrt(2.0)

    def __init__(self, a: BlockArgs, with_attention: bool = False):
        super().__init__()
        self.resolution_idx = a.resolution_idx
        osf = self.output_scale_factor
        self.resnets = nn.ModuleList()
        for i in range(a.num_layers):
            cin = _up_resnet_channels(a, i)
            res_skip = a.in_channels if i == a.num_layers - 1 else a.out_channels
            resnet_in = a.prev_output_channel if i == 0 else a.out_channels
            # diffusers' AttnSkipUpBlock2D computes `min(resnet_in + res_skip // 4, 32)` (operator
            # precedence); kept, since the group count changes the numbers.
            groups = min(resnet_in + res_skip // 4, 32) if with_attention else min(cin // 4, 32)
            self.resnets.append(_resnet(a, cin, a.out_channels, groups=groups,
                                        groups_out=min(a.out_channels // 4, 32), output_scale_factor=osf))
        if with_attention:
            self.attentions = nn.ModuleList([_spatial_attention(a, a.out_channels, 32, osf)])
        self.upsampler = FirUpsample2D(a.in_channels, out_channels=a.out_channels)
        if a.add_sample:
            g = min(a.out_channels // 4, 32)
            self.resnet_up = _resnet(a, a.out_channels, a.out_channels, groups=g, groups_out=g,
                                     output_scale_factor=osf, use_in_shortcut=True, up=True, kernel="fir")
            self.skip_conv = nn.Conv2d(a.out_channels, 3, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1))
            self.skip_norm = nn.GroupNorm(g, a.out_channels, eps=a.resnet_eps, affine=True)
            self.act = nn.SiLU()
        else:
            self.resnet_up = self.skip_conv = self.skip_norm = self.act = None
        _attentions_first(self)

    def forward(self, hidden_states, res_hidden_states_tuple, temb, skip_sample=None):
        for resnet in self.resnets:
            res_hidden_states = res_hidden_states_tuple[-1]
            res_hidden_states_tuple = res_hidden_states_tuple[:-1]
            hidden_states = resnet(torch.cat([hidden_states, res_hidden_states], dim=1), temb)
        if hasattr(self, "attentions"):
            hidden_states = self.attentions[0](hidden_states)
        skip_sample = self.upsampler(skip_sample) if skip_sample is not None else 0
        if self.resnet_up is not None:
            skip_sample = skip_sample + self.skip_conv(self.act(self.skip_norm(hidden_states)))
            hidden_states = self.resnet_up(hidden_states, temb)
        return hidden_states, skip_sample


class AttnSkipUpBlock2D(SkipUpBlock2D):
    def __init__(self, a: BlockArgs):
        super().__init__(a, with_attention=True)


DOWN_BLOCKS = {cls.__name__: cls for cls in (
    DownBlock2D, ResnetDownsampleBlock2D, AttnDownBlock2D, CrossAttnDownBlock2D, SimpleCrossAttnDownBlock2D,
    SkipDownBlock2D, AttnSkipDownBlock2D, KDownBlock2D, KCrossAttnDownBlock2D)}
UP_BLOCKS = {cls.__name__: cls for cls in (
    UpBlock2D, ResnetUpsampleBlock2D, AttnUpBlock2D, CrossAttnUpBlock2D, SimpleCrossAttnUpBlock2D,
    SkipUpBlock2D, AttnSkipUpBlock2D, KUpBlock2D, KCrossAttnUpBlock2D)}
MID_BLOCKS = {cls.__name__: cls for cls in (UNetMidBlock2D, UNetMidBlock2DCrossAttn, UNetMidBlock2DSimpleCrossAttn)}
