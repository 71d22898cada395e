"""Attention processors: how an `Attention` layer computes its output.

Same call signature as diffusers' processors: `(attn, hidden_states, encoder_hidden_states=None,
attention_mask=None, temb=None, **kwargs)`. The defaults use `F.scaled_dot_product_attention` with
the mask broadcast over heads (diffusers repeats it per head; the numbers are the same).
"""
from __future__ import annotations

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
        if encoder_hidden_states is None:
            context = hidden_states
        elif attn.norm_cross is not None:
            context = attn.norm_encoder_hidden_states(encoder_hidden_states)
        query, key, value = attn.to_q(hidden_states), attn.to_k(context), attn.to_v(context)
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
        query = _split_heads(attn.to_q(hidden_states), attn.heads)
        key = _split_heads(attn.add_k_proj(encoder_hidden_states), attn.heads)
        value = _split_heads(attn.add_v_proj(encoder_hidden_states), attn.heads)
        if not attn.only_cross_attention:
            key = torch.cat([key, _split_heads(attn.to_k(hidden_states), attn.heads)], dim=2)
            value = torch.cat([value, _split_heads(attn.to_v(hidden_states), attn.heads)], dim=2)
        out = F.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=0.0, is_causal=False)
        out = attn.to_out[1](attn.to_out[0](_merge_heads(out)))
        return out.transpose(-1, -2).reshape(residual.shape) + residual
