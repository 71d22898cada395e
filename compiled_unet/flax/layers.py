"""Flax building blocks mirroring `compiled_unet/layers.py` and `attention.py` op for op (NHWC inside).

Parameter names follow diffusers 0.39's Flax model: a PyTorch key `a.b.0.c.weight` lives at
`a/b_0/c/{kernel|scale|embedding|weight}` (see `convert.py`). Norms are written out (two-pass variance,
as PyTorch computes it) instead of `flax.linen.GroupNorm`, whose one-pass variance differs in the last bits.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any


def activation(name: str):
    """PyTorch's activations by diffusers' names; "gelu" is the exact (erf) GELU, as `torch.nn.GELU()`."""
    name = name.lower()
    if name in ("silu", "swish"):
        return jax.nn.silu
    if name == "mish":
        return lambda x: x * jnp.tanh(jax.nn.softplus(x))
    if name == "gelu":
        return lambda x: jax.nn.gelu(x, approximate=False)
    if name == "relu":
        return jax.nn.relu
    raise ValueError(f"unknown activation {name!r}; expected one of ['gelu', 'mish', 'relu', 'silu', 'swish']")


def _normalize(x, axes, eps):
    # Statistics in float32 (PyTorch's CPU/GPU norms accumulate in float32 for half inputs).
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=axes, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=axes, keepdims=True)
    return (xf - mean) * jax.lax.rsqrt(var + eps)


class GroupNorm(nn.Module):
    """`torch.nn.GroupNorm` on channels-last input [B, ..., C]."""

    num_groups: int
    eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        if c % self.num_groups:
            raise ValueError(f"GroupNorm: {c} channels do not split into {self.num_groups} groups")
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        shape = x.shape
        g = x.reshape(shape[0], -1, self.num_groups, c // self.num_groups)  # [B, HW, G, C/G]
        y = _normalize(g, (1, 3), self.eps).reshape(shape)
        return (y * scale + bias).astype(self.dtype)


class LayerNorm(nn.Module):
    """`torch.nn.LayerNorm` over the last axis (elementwise affine)."""

    eps: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), self.param_dtype)
        return (_normalize(x, (-1,), self.eps) * scale + bias).astype(self.dtype)


def dense(features: int, name: str, use_bias: bool = True, *, dtype, param_dtype) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
                    precision=jax.lax.Precision.HIGHEST)


def conv(features: int, kernel: int, name: str, stride: int = 1, padding: int = 0, use_bias: bool = True, *,
         dtype, param_dtype) -> nn.Conv:
    return nn.Conv(features, (kernel, kernel), strides=(stride, stride), padding=((padding, padding),) * 2,
                   use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, name=name,
                   precision=jax.lax.Precision.HIGHEST)


def nearest_resize(x, size: tuple):
    """`F.interpolate(mode="nearest", size=size)` on [B, H, W, C]: source index floor(dst * in / out)."""
    h_in, w_in = x.shape[1], x.shape[2]
    h_out, w_out = size
    # PyTorch computes the scale in float32 (`area_pixel_compute_scale<float>`).
    hi = np.minimum(np.floor(np.arange(h_out, dtype=np.float32) * np.float32(h_in / h_out)), h_in - 1).astype(np.int32)
    wi = np.minimum(np.floor(np.arange(w_out, dtype=np.float32) * np.float32(w_in / w_out)), w_in - 1).astype(np.int32)
    return jnp.take(jnp.take(x, hi, axis=1), wi, axis=2)


def upsample_nearest_2x(x):
    return jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)


def avg_pool_2x(x):
    b, h, w, c = x.shape
    x = x[:, : h - h % 2, : w - w % 2]  # AvgPool2d(2, 2) floors odd sizes
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4)).astype(x.dtype)


class Upsample2D(nn.Module):
    channels: int
    use_conv: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, output_size: Optional[tuple] = None):
        x = upsample_nearest_2x(x) if output_size is None else nearest_resize(x, tuple(output_size))
        if self.use_conv:
            x = conv(self.channels, 3, "conv", padding=1, dtype=self.dtype, param_dtype=self.param_dtype)(x)
        return x


class Downsample2D(nn.Module):
    channels: int
    use_conv: bool = False
    padding: int = 1
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        if not self.use_conv:
            return avg_pool_2x(x)
        if self.padding == 0:
            x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return conv(self.channels, 3, "conv", stride=2, padding=self.padding, dtype=self.dtype,
                    param_dtype=self.param_dtype)(x)


class ResnetBlock2D(nn.Module):
    """GroupNorm-act-conv twice with the time embedding added (or scale-shifted) in between."""

    in_channels: int
    out_channels: int
    temb_channels: Optional[int]
    groups: int
    eps: float
    non_linearity: str = "silu"
    groups_out: Optional[int] = None
    dropout: float = 0.0
    skip_time_act: bool = False
    time_embedding_norm: str = "default"
    output_scale_factor: float = 1.0
    up: bool = False
    down: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, temb, deterministic: bool = True):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        act = activation(self.non_linearity)
        h = act(GroupNorm(self.groups, self.eps, name="norm1", **kw)(x))
        if self.up:
            x, h = upsample_nearest_2x(x), upsample_nearest_2x(h)
        elif self.down:
            x, h = avg_pool_2x(x), avg_pool_2x(h)
        h = conv(self.out_channels, 3, "conv1", padding=1, **kw)(h)
        if self.temb_channels is not None and temb is not None:
            if not self.skip_time_act:
                temb = act(temb)
            proj = 2 * self.out_channels if self.time_embedding_norm == "scale_shift" else self.out_channels
            temb = dense(proj, "time_emb_proj", **kw)(temb)[:, None, None, :]
        norm2 = GroupNorm(self.groups_out or self.groups, self.eps, name="norm2", **kw)
        if self.time_embedding_norm == "scale_shift":
            scale, shift = jnp.split(temb, 2, axis=-1)
            h = norm2(h) * (1 + scale) + shift
        else:
            if temb is not None:
                h = h + temb
            h = norm2(h)
        h = nn.Dropout(self.dropout)(act(h), deterministic=deterministic)
        h = conv(self.out_channels, 3, "conv2", padding=1, **kw)(h)
        if self.in_channels != self.out_channels:
            x = conv(self.out_channels, 1, "conv_shortcut", **kw)(x)
        return (x + h) / self.output_scale_factor


# -- attention ---------------------------------------------------------------------------------------

# Queries per chunk with use_memory_efficient_attention (at most; a divisor of the query count).
QUERY_CHUNK = 1024


def _query_chunk(n: int) -> int:
    """Largest divisor of n that is <= QUERY_CHUNK (static; so chunks tile the queries exactly)."""
    for size in range(min(n, QUERY_CHUNK), 0, -1):
        if n % size == 0:
            return size
    return n


def attention_core(q, k, v, heads: int, scale: float, bias=None, *, memory_efficient: bool = False,
                   split_head_dim: bool = False):
    """softmax(q k^T * scale + bias) v for [B, N, heads*d] inputs; bias [B, 1|N, M] or None.

    `split_head_dim` (heads as their own axis) and `memory_efficient` (queries in chunks, each chunk's
    softmax over all keys, so every row is computed exactly as unchunked) only change layout and peak
    memory, never the math. Scores and softmax run in float32 and are cast back (as PyTorch's SDPA
    accumulates half inputs in float32).
    """
    b, n, inner = q.shape
    m = k.shape[1]
    d = inner // heads
    out_dtype = q.dtype
    if split_head_dim:
        qh, kh, vh = (t.reshape(b, -1, heads, d) for t in (q, k, v))  # [B, N, heads, d]
        spec_s, spec_o = "bqhd,bkhd->bhqk", "bhqk,bkhd->bqhd"
    else:
        qh, kh, vh = (t.reshape(b, -1, heads, d).transpose(0, 2, 1, 3) for t in (q, k, v))  # [B, heads, N, d]
        spec_s, spec_o = "bhqd,bhkd->bhqk", "bhqk,bhkd->bhqd"
    bias4 = None if bias is None else bias[:, None].astype(jnp.float32)  # [B, 1, 1|N, M]
    hp = jax.lax.Precision.HIGHEST

    def rows(q_rows, bias_rows):
        s = jnp.einsum(spec_s, q_rows, kh, precision=hp, preferred_element_type=jnp.float32) * scale
        if bias_rows is not None:
            s = s + bias_rows
        p = jax.nn.softmax(s, axis=-1).astype(vh.dtype)
        return jnp.einsum(spec_o, p, vh, precision=hp, preferred_element_type=jnp.float32).astype(out_dtype)

    q_axis = 1 if split_head_dim else 2
    chunk = _query_chunk(n) if memory_efficient else n
    if chunk == n:
        o = rows(qh, bias4)
    else:
        nc = n // chunk
        q_chunks = jnp.moveaxis(qh.reshape(qh.shape[:q_axis] + (nc, chunk) + qh.shape[q_axis + 1:]), q_axis, 0)
        if bias4 is not None and bias4.shape[2] == n:
            b_chunks = jnp.moveaxis(bias4.reshape(b, 1, nc, chunk, m), 2, 0)
            o = jax.lax.map(lambda args: rows(*args), (q_chunks, b_chunks))
        else:
            o = jax.lax.map(lambda qc: rows(qc, bias4), q_chunks)
        o = jnp.moveaxis(o, 0, q_axis)
        o = o.reshape(o.shape[:q_axis] + (n,) + o.shape[q_axis + 2:])
    if not split_head_dim:
        o = o.transpose(0, 2, 1, 3)
    return o.reshape(b, n, inner)


def broadcast_mask(bias, target_length: int, key_length: int):
    """Our PyTorch `Attention.broadcast_attention_mask`: pad a short mask by `target_length` zeros."""
    if bias is None:
        return None
    given = bias.shape[-1]
    if given != target_length:
        bias = jnp.pad(bias, ((0, 0), (0, 0), (0, target_length)))
    if bias.shape[-1] != key_length:
        raise ValueError(
            f"attention mask of length {given} does not fit an attention layer over {key_length} keys: "
            f"`attention_mask` applies to self-attention over pixels and to added-KV layers; "
            f"use `encoder_attention_mask` to mask encoder_hidden_states tokens")
    return bias


class Attention(nn.Module):
    """diffusers' `Attention` for the options the UNet uses (plain, spatial and added-KV forms)."""

    query_dim: int
    heads: int
    dim_head: int
    cross_attention_dim: Optional[int] = None
    bias: bool = False
    dropout: float = 0.0
    norm_num_groups: Optional[int] = None  # spatial/added-KV attention: GroupNorm on the tokens
    eps: float = 1e-5
    residual_connection: bool = False
    rescale_output_factor: float = 1.0
    added_kv_proj_dim: Optional[int] = None
    only_cross_attention: bool = False
    cross_attention_norm: Optional[str] = None
    memory_efficient: bool = False
    split_head_dim: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def _attend(self, q, k, v, bias):
        return attention_core(q, k, v, self.heads, self.dim_head**-0.5, bias,
                              memory_efficient=self.memory_efficient, split_head_dim=self.split_head_dim)

    def _norm_cross(self, ehs):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if self.cross_attention_norm == "layer_norm":
            return LayerNorm(1e-5, name="norm_cross", **kw)(ehs)
        if self.cross_attention_norm == "group_norm":
            return GroupNorm(32, 1e-5, name="norm_cross", **kw)(ehs)
        return ehs

    @nn.compact
    def __call__(self, hidden_states, encoder_hidden_states=None, attention_mask=None, deterministic: bool = True):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        inner = self.heads * self.dim_head
        if self.added_kv_proj_dim is not None:
            return self._added_kv(hidden_states, encoder_hidden_states, attention_mask, kw, inner, deterministic)
        residual = hidden_states
        spatial = hidden_states.ndim == 4
        if spatial:
            b, h, w, c = hidden_states.shape
            hidden_states = hidden_states.reshape(b, h * w, c)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        bias = broadcast_mask(attention_mask, context.shape[1], context.shape[1])
        if self.norm_num_groups is not None:
            hidden_states = GroupNorm(self.norm_num_groups, self.eps, name="group_norm", **kw)(hidden_states)
        if encoder_hidden_states is not None:
            encoder_hidden_states = self._norm_cross(encoder_hidden_states)
            context = encoder_hidden_states
        else:
            context = hidden_states
        q = dense(inner, "to_q", self.bias, **kw)(hidden_states)
        k = dense(inner, "to_k", self.bias, **kw)(context)
        v = dense(inner, "to_v", self.bias, **kw)(context)
        out = dense(self.query_dim, "to_out_0", **kw)(self._attend(q, k, v, bias))
        out = nn.Dropout(self.dropout)(out, deterministic=deterministic)
        if spatial:
            out = out.reshape(residual.shape)
        if self.residual_connection:
            out = out + residual
        return out / self.rescale_output_factor

    def _added_kv(self, hidden_states, ehs, attention_mask, kw, inner, deterministic):
        # UnCLIP-style: keys/values = [projected encoder tokens, pixel tokens]; input [B, H, W, C].
        residual = hidden_states
        b, h, w, c = hidden_states.shape
        x = hidden_states.reshape(b, h * w, c)
        n = x.shape[1]
        ehs = x if ehs is None else self._norm_cross(ehs)
        n_keys = ehs.shape[1] + (0 if self.only_cross_attention else n)
        bias = broadcast_mask(attention_mask, n, n_keys)
        x = GroupNorm(self.norm_num_groups, self.eps, name="group_norm", **kw)(x)
        q = dense(inner, "to_q", self.bias, **kw)(x)
        ek = dense(inner, "add_k_proj", **kw)(ehs)
        ev = dense(inner, "add_v_proj", **kw)(ehs)
        if self.only_cross_attention:
            k, v = ek, ev
        else:
            k = jnp.concatenate([ek, dense(inner, "to_k", self.bias, **kw)(x)], axis=1)
            v = jnp.concatenate([ev, dense(inner, "to_v", self.bias, **kw)(x)], axis=1)
        out = dense(self.query_dim, "to_out_0", **kw)(self._attend(q, k, v, bias))
        out = nn.Dropout(self.dropout)(out, deterministic=deterministic)
        return out.reshape(residual.shape) + residual


class GEGLU(nn.Module):
    """proj -> split -> x * GELU(gate); exact GELU unless `approximate` (diffusers' Flax used tanh)."""

    features: int
    approximate: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = dense(self.features * 2, "proj", dtype=self.dtype, param_dtype=self.param_dtype)(x)
        x, gate = jnp.split(x, 2, axis=-1)
        return x * jax.nn.gelu(gate, approximate=self.approximate)


class FeedForward(nn.Module):
    """GEGLU feed-forward: net_0 (GEGLU) -> dropout -> net_2, as diffusers names them."""

    dim: int
    dropout: float = 0.0
    gelu_approximate: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, deterministic: bool = True):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = GEGLU(self.dim * 4, self.gelu_approximate, name="net_0", **kw)(x)
        x = nn.Dropout(self.dropout)(x, deterministic=deterministic)
        return dense(self.dim, "net_2", **kw)(x)


class BasicTransformerBlock(nn.Module):
    dim: int
    heads: int
    dim_head: int
    cross_attention_dim: Optional[int] = None
    only_cross_attention: bool = False
    dropout: float = 0.0
    gelu_approximate: bool = False
    memory_efficient: bool = False
    split_head_dim: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, encoder_hidden_states, attention_mask=None, encoder_attention_mask=None,
                 deterministic: bool = True):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        att = dict(heads=self.heads, dim_head=self.dim_head, dropout=self.dropout,
                   memory_efficient=self.memory_efficient, split_head_dim=self.split_head_dim, **kw)
        attn1 = Attention(self.dim, cross_attention_dim=self.cross_attention_dim if self.only_cross_attention else None,
                          name="attn1", **att)
        x = x + attn1(LayerNorm(1e-5, name="norm1", **kw)(x),
                      encoder_hidden_states if self.only_cross_attention else None, attention_mask, deterministic)
        if self.cross_attention_dim is not None:
            attn2 = Attention(self.dim, cross_attention_dim=self.cross_attention_dim, name="attn2", **att)
            x = x + attn2(LayerNorm(1e-5, name="norm2", **kw)(x), encoder_hidden_states, encoder_attention_mask,
                          deterministic)
        ff = FeedForward(self.dim, self.dropout, self.gelu_approximate, name="ff", **kw)
        return x + ff(LayerNorm(1e-5, name="norm3", **kw)(x), deterministic)


class Transformer2DModel(nn.Module):
    """GroupNorm -> proj_in -> transformer blocks over H*W tokens -> proj_out -> + residual."""

    heads: int
    dim_head: int
    in_channels: int
    num_layers: int = 1
    norm_num_groups: int = 32
    cross_attention_dim: Optional[int] = None
    use_linear_projection: bool = False
    only_cross_attention: bool = False
    dropout: float = 0.0
    gelu_approximate: bool = False
    memory_efficient: bool = False
    split_head_dim: bool = False
    # PyTorch's Transformer2DModel normalizes with eps 1e-6; diffusers' Flax model used 1e-5.
    norm_eps: float = 1e-6
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, encoder_hidden_states, attention_mask=None, encoder_attention_mask=None,
                 deterministic: bool = True):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        inner = self.heads * self.dim_head
        b, h, w, c = x.shape
        residual = x
        x = GroupNorm(self.norm_num_groups, self.norm_eps, name="norm", **kw)(x)
        if self.use_linear_projection:
            x = dense(inner, "proj_in", **kw)(x.reshape(b, h * w, c))
        else:
            x = conv(inner, 1, "proj_in", **kw)(x).reshape(b, h * w, inner)
        for i in range(self.num_layers):
            block = BasicTransformerBlock(
                inner, self.heads, self.dim_head, self.cross_attention_dim, self.only_cross_attention, self.dropout,
                self.gelu_approximate, self.memory_efficient, self.split_head_dim, name=f"transformer_blocks_{i}", **kw)
            x = block(x, encoder_hidden_states, attention_mask, encoder_attention_mask, deterministic)
        if self.use_linear_projection:
            x = dense(c, "proj_out", **kw)(x).reshape(b, h, w, c)
        else:
            x = conv(c, 1, "proj_out", **kw)(x.reshape(b, h, w, inner))
        return x + residual
