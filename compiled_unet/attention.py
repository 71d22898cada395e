"""Attention and transformer modules with diffusers' parameter names and numerics.

`Attention` exposes the attributes and helpers that diffusers' attention processors use (`heads`,
`to_q`, `prepare_attention_mask`, `get_attention_scores`, ...), so a processor written for diffusers
runs on it unchanged. The processor is chosen when it is set, never inspected per call.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .processors import (AttnAddedKVProcessor2_0, AttnProcessor2_0, SlicedAttnAddedKVProcessor,
                         SlicedAttnProcessor, project_added_kv, project_qkv)


class Attention(nn.Module):
    """Multi-head attention: diffusers' `Attention` for the options the UNet uses."""

    def __init__(
        self, query_dim: int, cross_attention_dim: Optional[int] = None, heads: int = 8, dim_head: int = 64,
        dropout: float = 0.0, bias: bool = False, upcast_attention: bool = False, upcast_softmax: bool = False,
        cross_attention_norm: Optional[str] = None, cross_attention_norm_num_groups: int = 32,
        added_kv_proj_dim: Optional[int] = None, norm_num_groups: Optional[int] = None, out_bias: bool = True,
        only_cross_attention: bool = False, eps: float = 1e-5, rescale_output_factor: float = 1.0,
        residual_connection: bool = False, processor=None,
    ):
        super().__init__()
        self.inner_dim = dim_head * heads
        self.inner_kv_dim = self.inner_dim
        self.query_dim = query_dim
        self.use_bias = bias
        self.is_cross_attention = cross_attention_dim is not None
        self.cross_attention_dim = cross_attention_dim if cross_attention_dim is not None else query_dim
        self.upcast_attention, self.upcast_softmax = upcast_attention, upcast_softmax
        self.rescale_output_factor = rescale_output_factor
        self.residual_connection = residual_connection
        self.dropout = dropout
        self.out_dim = query_dim
        self.scale_qk = True
        self.scale = dim_head**-0.5
        self.heads = heads
        self.sliceable_head_dim = heads
        self.added_kv_proj_dim = added_kv_proj_dim
        self.only_cross_attention = only_cross_attention
        self.is_causal = False
        self.fused_projections = False
        if added_kv_proj_dim is None and only_cross_attention:
            raise ValueError("`only_cross_attention=True` requires `added_kv_proj_dim` (an added-KV attention layer)")
        self.group_norm = (
            nn.GroupNorm(norm_num_groups, query_dim, eps=eps, affine=True) if norm_num_groups is not None else None
        )
        self.spatial_norm = None
        self.norm_q = self.norm_k = None
        if cross_attention_norm is None:
            self.norm_cross = None
        elif cross_attention_norm == "layer_norm":
            self.norm_cross = nn.LayerNorm(self.cross_attention_dim)
        elif cross_attention_norm == "group_norm":
            channels = added_kv_proj_dim if added_kv_proj_dim is not None else self.cross_attention_dim
            self.norm_cross = nn.GroupNorm(cross_attention_norm_num_groups, channels, eps=1e-5, affine=True)
        else:
            raise ValueError(f"unknown cross_attention_norm {cross_attention_norm!r}; expected None, 'layer_norm' or 'group_norm'")
        self.to_q = nn.Linear(query_dim, self.inner_dim, bias=bias)
        if not only_cross_attention:
            self.to_k = nn.Linear(self.cross_attention_dim, self.inner_kv_dim, bias=bias)
            self.to_v = nn.Linear(self.cross_attention_dim, self.inner_kv_dim, bias=bias)
        else:
            self.to_k = self.to_v = None
        self.add_q_proj = None
        if added_kv_proj_dim is not None:
            self.add_k_proj = nn.Linear(added_kv_proj_dim, self.inner_kv_dim, bias=True)
            self.add_v_proj = nn.Linear(added_kv_proj_dim, self.inner_kv_dim, bias=True)
        else:
            self.add_k_proj = self.add_v_proj = None
        self.to_out = nn.ModuleList([nn.Linear(self.inner_dim, query_dim, bias=out_bias), nn.Dropout(dropout)])
        if processor is None:
            processor = AttnAddedKVProcessor2_0() if added_kv_proj_dim is not None else AttnProcessor2_0()
        self.set_processor(processor)

    # -- processors -----------------------------------------------------------------------------
    def set_processor(self, processor) -> None:
        if isinstance(getattr(self, "processor", None), nn.Module) and not isinstance(processor, nn.Module):
            self._modules.pop("processor")
        self.processor = processor

    def get_processor(self):
        return self.processor

    def set_attention_slice(self, slice_size: Optional[int]) -> None:
        """Sliced attention over `slice_size` rows of (batch x heads); None: back to the default processor."""
        if slice_size is not None and slice_size > self.sliceable_head_dim:
            raise ValueError(f"slice_size {slice_size} has to be smaller or equal to {self.sliceable_head_dim}.")
        if slice_size is None:
            processor = AttnAddedKVProcessor2_0() if self.added_kv_proj_dim is not None else AttnProcessor2_0()
        elif self.added_kv_proj_dim is not None:
            processor = SlicedAttnAddedKVProcessor(slice_size)
        else:
            processor = SlicedAttnProcessor(slice_size)
        self.set_processor(processor)

    # -- QKV fusion: a flag read by the processors, parameters untouched ----------------------------
    def fuse_projections(self) -> None:
        """Project Q,K,V (self-attention), K,V (cross-attention) and added K,V each with one matmul."""
        self.fused_projections = True

    def unfuse_projections(self) -> None:
        self.fused_projections = False

    def project_qkv(self, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None):
        """(query, key, value) through to_q/to_k/to_v; keys/values from `encoder_hidden_states` when given."""
        return project_qkv(self, hidden_states, encoder_hidden_states)

    def project_added_kv(self, encoder_hidden_states: torch.Tensor):
        """(key, value) of the encoder tokens through add_k_proj/add_v_proj."""
        return project_added_kv(self, encoder_hidden_states)

    def forward(self, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs) -> torch.Tensor:
        return self.processor(
            self, hidden_states, encoder_hidden_states=encoder_hidden_states, attention_mask=attention_mask, **kwargs
        )

    # -- helpers used by processors (same semantics as diffusers') ---------------------------------
    def batch_to_head_dim(self, tensor: torch.Tensor) -> torch.Tensor:
        b, n, d = tensor.shape
        tensor = tensor.reshape(b // self.heads, self.heads, n, d)
        return tensor.permute(0, 2, 1, 3).reshape(b // self.heads, n, d * self.heads)

    def head_to_batch_dim(self, tensor: torch.Tensor, out_dim: int = 3) -> torch.Tensor:
        if tensor.ndim == 3:
            b, n, d = tensor.shape
            extra = 1
        else:
            b, extra, n, d = tensor.shape
        tensor = tensor.reshape(b, n * extra, self.heads, d // self.heads).permute(0, 2, 1, 3)
        if out_dim == 3:
            tensor = tensor.reshape(b * self.heads, n * extra, d // self.heads)
        return tensor

    def get_attention_scores(self, query, key, attention_mask=None) -> torch.Tensor:
        dtype = query.dtype
        if self.upcast_attention:
            query, key = query.float(), key.float()
        if attention_mask is None:
            # beta=0 ignores the (uninitialized) input, exactly as diffusers computes it.
            scores = torch.baddbmm(
                torch.empty(query.shape[0], query.shape[1], key.shape[1], dtype=query.dtype, device=query.device),
                query, key.transpose(-1, -2), beta=0, alpha=self.scale,
            )
        else:
            scores = torch.baddbmm(attention_mask, query, key.transpose(-1, -2), beta=1, alpha=self.scale)
        if self.upcast_softmax:
            scores = scores.float()
        return scores.softmax(dim=-1).to(dtype)

    def prepare_attention_mask(self, attention_mask, target_length: int, batch_size: int, out_dim: int = 3):
        """diffusers' per-head mask: pad to the key length, then repeat once per head."""
        if attention_mask is None:
            return None
        if attention_mask.shape[-1] != target_length:
            attention_mask = F.pad(attention_mask, (0, target_length), value=0.0)
        if out_dim == 3:
            if attention_mask.shape[0] < batch_size * self.heads:
                attention_mask = attention_mask.repeat_interleave(self.heads, dim=0)
        elif out_dim == 4:
            attention_mask = attention_mask.unsqueeze(1).repeat_interleave(self.heads, dim=1)
        return attention_mask

    def broadcast_attention_mask(self, attention_mask, target_length: int, key_length: int):
        """The same bias as `prepare_attention_mask`, as one (B, 1, Lq|1, Lk) tensor shared by all heads.

        Identical numbers without a per-head copy. diffusers pads a mask shorter than the target by
        `target_length` zeros; where that does not match the keys, diffusers fails inside SDPA, we say why.
        """
        if attention_mask is None:
            return None
        given_length = attention_mask.shape[-1]
        if given_length != target_length:
            attention_mask = F.pad(attention_mask, (0, target_length), value=0.0)
        if attention_mask.shape[-1] != key_length:
            raise ValueError(
                f"attention mask of length {given_length} does not fit an attention layer over {key_length} keys: "
                f"`attention_mask` applies to self-attention over pixels and to added-KV layers; "
                f"use `encoder_attention_mask` to mask encoder_hidden_states tokens"
            )
        return attention_mask.unsqueeze(1)

    def norm_encoder_hidden_states(self, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        if isinstance(self.norm_cross, nn.LayerNorm):
            return self.norm_cross(encoder_hidden_states)
        return self.norm_cross(encoder_hidden_states.transpose(1, 2)).transpose(1, 2)


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int, bias: bool = True):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """GEGLU feed-forward: net = [GEGLU, Dropout, Linear] (diffusers' key layout)."""

    def __init__(self, dim: int, dropout: float = 0.0, mult: int = 4):
        super().__init__()
        inner = int(dim * mult)
        self.net = nn.ModuleList([GEGLU(dim, inner), nn.Dropout(dropout), nn.Linear(inner, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for module in self.net:
            x = module(x)
        return x


class GatedSelfAttentionDense(nn.Module):
    """GLIGEN's gated fuser: attends over [visual tokens, grounding objects]."""

    def __init__(self, query_dim: int, context_dim: int, n_heads: int, d_head: int):
        super().__init__()
        self.linear = nn.Linear(context_dim, query_dim)
        self.attn = Attention(query_dim=query_dim, heads=n_heads, dim_head=d_head)
        self.ff = FeedForward(query_dim)
        self.norm1 = nn.LayerNorm(query_dim)
        self.norm2 = nn.LayerNorm(query_dim)
        self.alpha_attn = nn.Parameter(torch.tensor(0.0))
        self.alpha_dense = nn.Parameter(torch.tensor(0.0))
        self.enabled = True

    def forward(self, x: torch.Tensor, objs: torch.Tensor) -> torch.Tensor:
        if not self.enabled:
            return x
        n_visual = x.shape[1]
        objs = self.linear(objs)
        x = x + self.alpha_attn.tanh() * self.attn(self.norm1(torch.cat([x, objs], dim=1)))[:, :n_visual, :]
        return x + self.alpha_dense.tanh() * self.ff(self.norm2(x))


def _processor_kwargs(cross_attention_kwargs: Optional[dict]) -> dict:
    # "scale" (LoRA) and "gligen" are consumed by the model; the rest goes to the processors.
    if not cross_attention_kwargs:
        return {}
    return {k: v for k, v in cross_attention_kwargs.items() if k not in ("scale", "gligen")}


class BasicTransformerBlock(nn.Module):
    """LayerNorm -> self-attention -> (GLIGEN fuser) -> LayerNorm -> cross-attention -> LayerNorm -> FF."""

    def __init__(
        self, dim: int, num_attention_heads: int, attention_head_dim: int, dropout: float = 0.0,
        cross_attention_dim: Optional[int] = None, only_cross_attention: bool = False,
        upcast_attention: bool = False, attention_type: str = "default",
    ):
        super().__init__()
        self.only_cross_attention = only_cross_attention
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=True, eps=1e-5)
        self.attn1 = Attention(
            query_dim=dim, heads=num_attention_heads, dim_head=attention_head_dim, dropout=dropout,
            cross_attention_dim=cross_attention_dim if only_cross_attention else None, upcast_attention=upcast_attention,
        )
        self.norm2 = self.attn2 = None
        if cross_attention_dim is not None:
            self.norm2 = nn.LayerNorm(dim, 1e-5, True)
            self.attn2 = Attention(
                query_dim=dim, cross_attention_dim=cross_attention_dim, heads=num_attention_heads,
                dim_head=attention_head_dim, dropout=dropout, upcast_attention=upcast_attention,
            )
        self.norm3 = nn.LayerNorm(dim, 1e-5, True)
        self.ff = FeedForward(dim, dropout=dropout)
        if attention_type in ("gated", "gated-text-image"):
            self.fuser = GatedSelfAttentionDense(dim, cross_attention_dim, num_attention_heads, attention_head_dim)

    def forward(
        self, hidden_states: torch.Tensor, attention_mask=None, encoder_hidden_states=None,
        encoder_attention_mask=None, cross_attention_kwargs: Optional[dict] = None,
    ) -> torch.Tensor:
        kwargs = _processor_kwargs(cross_attention_kwargs)
        gligen = (cross_attention_kwargs or {}).get("gligen")
        hidden_states = hidden_states + self.attn1(
            self.norm1(hidden_states),
            encoder_hidden_states=encoder_hidden_states if self.only_cross_attention else None,
            attention_mask=attention_mask, **kwargs,
        )
        if gligen is not None:
            hidden_states = self.fuser(hidden_states, gligen["objs"])
        if self.attn2 is not None:
            hidden_states = hidden_states + self.attn2(
                self.norm2(hidden_states), encoder_hidden_states=encoder_hidden_states,
                attention_mask=encoder_attention_mask, **kwargs,
            )
        return hidden_states + self.ff(self.norm3(hidden_states))


class Transformer2DModel(nn.Module):
    """GroupNorm -> proj_in -> transformer blocks over H*W tokens -> proj_out -> + residual."""

    def __init__(
        self, num_attention_heads: int, attention_head_dim: int, in_channels: int, num_layers: int = 1,
        dropout: float = 0.0, norm_num_groups: int = 32, cross_attention_dim: Optional[int] = None,
        use_linear_projection: bool = False, only_cross_attention: bool = False, upcast_attention: bool = False,
        attention_type: str = "default",
    ):
        super().__init__()
        inner_dim = num_attention_heads * attention_head_dim
        self.in_channels, self.use_linear_projection = in_channels, use_linear_projection
        self.norm = nn.GroupNorm(norm_num_groups, in_channels, eps=1e-6, affine=True)
        linear = use_linear_projection
        self.proj_in = nn.Linear(in_channels, inner_dim) if linear else nn.Conv2d(in_channels, inner_dim, 1)
        self.transformer_blocks = nn.ModuleList([
            BasicTransformerBlock(
                inner_dim, num_attention_heads, attention_head_dim, dropout=dropout,
                cross_attention_dim=cross_attention_dim, only_cross_attention=only_cross_attention,
                upcast_attention=upcast_attention, attention_type=attention_type,
            )
            for _ in range(num_layers)
        ])
        self.proj_out = nn.Linear(inner_dim, in_channels) if linear else nn.Conv2d(inner_dim, in_channels, 1)

    def forward(
        self, hidden_states: torch.Tensor, encoder_hidden_states=None, attention_mask=None,
        encoder_attention_mask=None, cross_attention_kwargs: Optional[dict] = None,
    ) -> torch.Tensor:
        # hidden_states: [B, C, H, W] -> tokens [B, H*W, inner]
        b, _, h, w = hidden_states.shape
        residual = hidden_states
        x = self.norm(hidden_states)
        if not self.use_linear_projection:
            x = self.proj_in(x)
            inner = x.shape[1]
            x = x.permute(0, 2, 3, 1).reshape(b, h * w, inner)
        else:
            inner = x.shape[1]
            x = self.proj_in(x.permute(0, 2, 3, 1).reshape(b, h * w, inner))
            inner = x.shape[-1]
        for block in self.transformer_blocks:
            x = block(x, attention_mask, encoder_hidden_states, encoder_attention_mask, cross_attention_kwargs)
        if not self.use_linear_projection:
            x = self.proj_out(x.reshape(b, h, w, inner).permute(0, 3, 1, 2).contiguous())
        else:
            x = self.proj_out(x).reshape(b, h, w, -1).permute(0, 3, 1, 2).contiguous()
        return x + residual


class DualTransformer2DModel(nn.Module):
    """Two transformers over two slices of the conditioning (77 text + 257 image tokens), mixed 50/50."""

    def __init__(self, num_attention_heads, attention_head_dim, in_channels, num_layers=1, dropout=0.0,
                 norm_num_groups=32, cross_attention_dim=None):
        super().__init__()
        self.transformers = nn.ModuleList([
            Transformer2DModel(num_attention_heads, attention_head_dim, in_channels, num_layers, dropout,
                               norm_num_groups, cross_attention_dim)
            for _ in range(2)
        ])
        self.mix_ratio = 0.5
        self.condition_lengths = [77, 257]
        self.transformer_index_for_condition = [1, 0]

    def forward(self, hidden_states, encoder_hidden_states, attention_mask=None, encoder_attention_mask=None,
                cross_attention_kwargs=None) -> torch.Tensor:
        # diffusers passes neither mask to the inner transformers (and fails when given
        # `encoder_attention_mask`); we slice the encoder mask with its tokens, so masking works here too.
        encoded, start = [], 0
        for i in range(2):
            length = self.condition_lengths[i]
            condition = encoder_hidden_states[:, start: start + length]
            mask = None if encoder_attention_mask is None else encoder_attention_mask[..., start: start + length]
            out = self.transformers[self.transformer_index_for_condition[i]](
                hidden_states, encoder_hidden_states=condition, encoder_attention_mask=mask,
                cross_attention_kwargs=cross_attention_kwargs,
            )
            encoded.append(out - hidden_states)
            start += length
        mixed = encoded[0] * self.mix_ratio + encoded[1] * (1 - self.mix_ratio)
        return mixed + hidden_states


class KAttentionBlock(nn.Module):
    """K-diffusion attention: AdaGroupNorm-conditioned self- and cross-attention on a 4D map."""

    def __init__(self, dim, num_attention_heads, attention_head_dim, dropout=0.0, cross_attention_dim=None,
                 attention_bias=False, upcast_attention=False, temb_channels=768, add_self_attention=False,
                 cross_attention_norm=None, group_size=32):
        super().__init__()
        from .layers import AdaGroupNorm

        self.add_self_attention = add_self_attention
        if add_self_attention:
            self.norm1 = AdaGroupNorm(temb_channels, dim, max(1, dim // group_size))
            self.attn1 = Attention(query_dim=dim, heads=num_attention_heads, dim_head=attention_head_dim,
                                   dropout=dropout, bias=attention_bias)
        self.norm2 = AdaGroupNorm(temb_channels, dim, max(1, dim // group_size))
        self.attn2 = Attention(query_dim=dim, cross_attention_dim=cross_attention_dim, heads=num_attention_heads,
                               dim_head=attention_head_dim, dropout=dropout, bias=attention_bias,
                               upcast_attention=upcast_attention, cross_attention_norm=cross_attention_norm)

    @staticmethod
    def _to_3d(x, h, w):
        return x.permute(0, 2, 3, 1).reshape(x.shape[0], h * w, -1)

    @staticmethod
    def _to_4d(x, h, w):
        return x.permute(0, 2, 1).reshape(x.shape[0], -1, h, w)

    def forward(self, hidden_states, encoder_hidden_states=None, emb=None, attention_mask=None,
                cross_attention_kwargs=None, encoder_attention_mask=None):
        kwargs = _processor_kwargs(cross_attention_kwargs)
        h, w = hidden_states.shape[2:]
        if self.add_self_attention:
            x = self._to_3d(self.norm1(hidden_states, emb), h, w)
            out = self.attn1(x, encoder_hidden_states=None, attention_mask=attention_mask, **kwargs)
            hidden_states = self._to_4d(out, h, w) + hidden_states
        x = self._to_3d(self.norm2(hidden_states, emb), h, w)
        mask = attention_mask if encoder_hidden_states is None else encoder_attention_mask
        out = self.attn2(x, encoder_hidden_states=encoder_hidden_states, attention_mask=mask, **kwargs)
        return self._to_4d(out, h, w) + hidden_states
