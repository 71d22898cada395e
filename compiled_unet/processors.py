"""Attention processors: how an `Attention` layer computes its output.

Same call signature as diffusers' processors: `(attn, hidden_states, encoder_hidden_states=None,
attention_mask=None, temb=None, **kwargs)`, so diffusers' own processors and user-written ones can be set
on our layers, and ours on theirs. Every processor here projects through `project_qkv` /
`project_added_kv`, which use one matmul when the layer's projections are fused
(`Attention.fuse_projections`).

- `AttnProcessor2_0`, `AttnAddedKVProcessor2_0` (defaults): `F.scaled_dot_product_attention` with the
  mask broadcast over heads (diffusers repeats it per head; the numbers are the same).
- `AttnProcessor`, `AttnAddedKVProcessor`: diffusers' explicit math (baddbmm -> softmax -> bmm, with the
  layer's upcast rules through `attn.get_attention_scores`).
- `SlicedAttnProcessor(n)`, `SlicedAttnAddedKVProcessor(n)`: the same math over `n` rows of
  (batch x heads) at a time, so only one slice of attention scores is alive at once. The number of
  slices depends only on shapes, so the loop unrolls into a fixed graph; slices are written into one
  zeros buffer, as diffusers does (same numbers, same exported ops).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


def _split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    # x: [B, N, heads * d] -> [B, heads, N, d]
    b, n, inner = x.shape
    return x.view(b, n, heads, inner // heads).transpose(1, 2)


def _merge_heads(x: torch.Tensor) -> torch.Tensor:
    # x: [B, heads, N, d] -> [B, N, heads * d]
    b, heads, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, heads * d)


def _linear_many(x: torch.Tensor, *layers: torch.nn.Linear) -> tuple:
    """`tuple(layer(x) for layer in layers)` as ONE matmul over the concatenated weights.

    The weights are concatenated on every call from the layers' own parameters, so the parameters
    stay the single source of truth: `state_dict()` keys and values are the same fused or not, and
    loading new weights (or LoRA) never leaves a stale fused copy behind. In an exported graph the
    concatenation is an op on constants that constant folding (freezing) removes. Layers that are not
    plain `torch.nn.Linear` (e.g. wrapped by an adapter) are applied one by one.
    """
    if any(type(layer) is not torch.nn.Linear for layer in layers):
        return tuple(layer(x) for layer in layers)
    weight = torch.cat([layer.weight for layer in layers], dim=0)
    biases = [layer.bias for layer in layers]
    bias = None if any(b is None for b in biases) else torch.cat(biases, dim=0)
    if bias is None and any(b is not None for b in biases):
        return tuple(layer(x) for layer in layers)
    return F.linear(x, weight, bias).split([layer.out_features for layer in layers], dim=-1)


def project_qkv(attn, hidden_states: torch.Tensor, encoder_hidden_states: Optional[torch.Tensor] = None):
    """(query, key, value) through attn.to_q/to_k/to_v, one matmul per input when `attn.fused_projections`.

    Works on diffusers' `Attention` too (its fused flag is honoured through its own to_q/to_k/to_v).
    """
    fused = getattr(attn, "fused_projections", False)
    if encoder_hidden_states is None:
        if fused:
            return _linear_many(hidden_states, attn.to_q, attn.to_k, attn.to_v)
        return attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    if fused:
        return (attn.to_q(hidden_states), *_linear_many(encoder_hidden_states, attn.to_k, attn.to_v))
    return attn.to_q(hidden_states), attn.to_k(encoder_hidden_states), attn.to_v(encoder_hidden_states)


def project_added_kv(attn, encoder_hidden_states: torch.Tensor):
    """(key, value) of the encoder tokens through attn.add_k_proj/add_v_proj (one matmul when fused)."""
    if getattr(attn, "fused_projections", False):
        return _linear_many(encoder_hidden_states, attn.add_k_proj, attn.add_v_proj)
    return attn.add_k_proj(encoder_hidden_states), attn.add_v_proj(encoder_hidden_states)


def _bmm_attention(attn, query, key, value, attention_mask, slice_size: Optional[int]) -> torch.Tensor:
    """diffusers' explicit attention over [B*heads, N, d] tensors, `slice_size` rows at a time (None: all).

    Slices are written into one preallocated output, as diffusers does: the exported graph has the same
    ops as diffusers' (so `passes.merge_sliced_attention` handles both), and no second copy of the
    output exists (a `cat` would need one).
    """
    rows = query.shape[0]
    if slice_size is None or slice_size >= rows:
        return torch.bmm(attn.get_attention_scores(query, key, attention_mask), value)
    out = torch.zeros((rows, query.shape[1], value.shape[-1]), device=query.device, dtype=query.dtype)
    for start in range(0, rows, slice_size):  # static: the row count is a shape
        end = start + slice_size
        mask = None if attention_mask is None else attention_mask[start:end]
        # One expression: this slice's probabilities are freed before the next slice's are computed.
        out[start:end] = torch.bmm(attn.get_attention_scores(query[start:end], key[start:end], mask), value[start:end])
    return out


class _ExplicitAttn:
    """Self/cross attention with diffusers' explicit math (AttnProcessor / SlicedAttnProcessor)."""

    slice_size: Optional[int] = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        residual = hidden_states
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        batch, seq = (hidden_states if encoder_hidden_states is None else encoder_hidden_states).shape[:2]
        attention_mask = attn.prepare_attention_mask(attention_mask, seq, batch)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is not None and attn.norm_cross is not None:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        query, key, value = project_qkv(attn, hidden_states, encoder_hidden_states)
        out = _bmm_attention(attn, attn.head_to_batch_dim(query), attn.head_to_batch_dim(key),
                             attn.head_to_batch_dim(value), attention_mask, self.slice_size)
        out = attn.to_out[1](attn.to_out[0](attn.batch_to_head_dim(out)))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


def _check_slice_size(slice_size) -> int:
    if not isinstance(slice_size, int) or isinstance(slice_size, bool) or slice_size < 1:
        raise ValueError(f"slice_size must be a positive int, got {slice_size!r}")
    return slice_size


class AttnProcessor(_ExplicitAttn):
    """diffusers' `AttnProcessor`: explicit baddbmm/softmax/bmm attention."""


class SlicedAttnProcessor(_ExplicitAttn):
    """diffusers' `SlicedAttnProcessor`: explicit attention, `slice_size` rows of (batch x heads) at a time."""

    def __init__(self, slice_size: int):
        self.slice_size = _check_slice_size(slice_size)


class _ExplicitAddedKVAttn:
    """Added-KV attention with diffusers' explicit math (AttnAddedKVProcessor / SlicedAttnAddedKVProcessor)."""

    slice_size: Optional[int] = None

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        residual = hidden_states
        hidden_states = hidden_states.view(hidden_states.shape[0], hidden_states.shape[1], -1).transpose(1, 2)
        batch, seq = hidden_states.shape[:2]
        attention_mask = attn.prepare_attention_mask(attention_mask, seq, batch)
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross is not None:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query, key, value = _added_kv_projections(attn, hidden_states, encoder_hidden_states)
        to_batch = attn.head_to_batch_dim
        key = torch.cat([to_batch(k) for k in key], dim=1)
        value = torch.cat([to_batch(v) for v in value], dim=1)
        out = _bmm_attention(attn, to_batch(query), key, value, attention_mask, self.slice_size)
        out = attn.to_out[1](attn.to_out[0](attn.batch_to_head_dim(out)))
        return out.transpose(-1, -2).reshape(residual.shape) + residual


class AttnAddedKVProcessor(_ExplicitAddedKVAttn):
    """diffusers' `AttnAddedKVProcessor`: keys/values = [projected encoder tokens, pixel tokens], explicit math."""


class SlicedAttnAddedKVProcessor(_ExplicitAddedKVAttn):
    """diffusers' `SlicedAttnAddedKVProcessor`: added-KV attention, `slice_size` rows of (batch x heads) at a time."""

    def __init__(self, slice_size: int):
        self.slice_size = _check_slice_size(slice_size)


def _added_kv_projections(attn, hidden_states, encoder_hidden_states):
    """query, [keys], [values]: encoder keys/values first, then pixel ones unless the layer is cross-only."""
    enc_key, enc_value = project_added_kv(attn, encoder_hidden_states)
    if attn.only_cross_attention:
        return attn.to_q(hidden_states), [enc_key], [enc_value]
    query, key, value = project_qkv(attn, hidden_states)
    return query, [enc_key, key], [enc_value, value]


class AttnProcessor2_0:
    """Scaled dot-product attention (self or cross), diffusers' default processor."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        residual = hidden_states
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        mask = attn.broadcast_attention_mask(attention_mask, context.shape[1], context.shape[1])
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        if encoder_hidden_states is not None and attn.norm_cross is not None:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        query, key, value = project_qkv(attn, hidden_states, encoder_hidden_states)
        out = F.scaled_dot_product_attention(
            _split_heads(query, attn.heads), _split_heads(key, attn.heads), _split_heads(value, attn.heads),
            attn_mask=mask, dropout_p=0.0, is_causal=False,
        )
        out = attn.to_out[1](attn.to_out[0](_merge_heads(out).to(query.dtype)))
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


class AttnAddedKVProcessor2_0:
    """Attention whose keys/values are [projected encoder tokens, pixel tokens] (UnCLIP-style blocks)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        residual = hidden_states
        b, c = hidden_states.shape[:2]
        hidden_states = hidden_states.view(b, c, -1).transpose(1, 2)
        n = hidden_states.shape[1]
        if encoder_hidden_states is None:
            encoder_hidden_states = hidden_states
        elif attn.norm_cross is not None:
            encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
        n_keys = encoder_hidden_states.shape[1] + (0 if attn.only_cross_attention else n)
        mask = attn.broadcast_attention_mask(attention_mask, n, n_keys)
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        query, key, value = _added_kv_projections(attn, hidden_states, encoder_hidden_states)
        key = torch.cat([_split_heads(k, attn.heads) for k in key], dim=2)
        value = torch.cat([_split_heads(v, attn.heads) for v in value], dim=2)
        out = F.scaled_dot_product_attention(_split_heads(query, attn.heads), key, value, attn_mask=mask,
                                             dropout_p=0.0, is_causal=False)
        out = attn.to_out[1](attn.to_out[0](_merge_heads(out)))
        return out.transpose(-1, -2).reshape(residual.shape) + residual
