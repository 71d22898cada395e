"""Time, class, text/image embeddings in Flax, mirroring `compiled_unet/embeddings.py` op for op."""
from __future__ import annotations

import math
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from .layers import Dtype, LayerNorm, activation, conv, dense


def timestep_embedding(timesteps, embedding_dim: int, flip_sin_to_cos: bool = False,
                       downscale_freq_shift: float = 1, scale: float = 1, max_period: int = 10000):
    """[N] -> [N, embedding_dim] sinusoids, in the same order of float32 operations as PyTorch's."""
    half = embedding_dim // 2
    exponent = np.float32(-math.log(max_period)) * jnp.arange(0, half, dtype=jnp.float32)
    exponent = exponent / np.float32(half - downscale_freq_shift)
    emb = timesteps[:, None].astype(jnp.float32) * jnp.exp(exponent)[None, :]
    emb = scale * emb
    emb = jnp.concatenate([jnp.sin(emb), jnp.cos(emb)], axis=-1)
    if flip_sin_to_cos:
        emb = jnp.concatenate([emb[:, half:], emb[:, :half]], axis=-1)
    if embedding_dim % 2 == 1:
        emb = jnp.pad(emb, ((0, 0), (0, 1)))
    return emb


class GaussianFourierProjection(nn.Module):
    """Random Fourier features; `weight` is a parameter (frozen in PyTorch: requires_grad=False)."""

    embedding_size: int
    flip_sin_to_cos: bool = False
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        w = self.param("weight", nn.initializers.normal(1.0), (self.embedding_size,), self.param_dtype)
        x_proj = x[:, None] * w[None, :] * 2 * np.pi
        if self.flip_sin_to_cos:
            return jnp.concatenate([jnp.cos(x_proj), jnp.sin(x_proj)], axis=-1)
        return jnp.concatenate([jnp.sin(x_proj), jnp.cos(x_proj)], axis=-1)


class TimestepEmbedding(nn.Module):
    """linear_1 -> act -> linear_2 (-> post_act), with the optional LCM guidance `cond_proj`."""

    time_embed_dim: int
    act_fn: str = "silu"
    out_dim: Optional[int] = None
    post_act_fn: Optional[str] = None
    cond_proj_dim: Optional[int] = None
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, sample, condition=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        if condition is not None:
            sample = sample + dense(sample.shape[-1], "cond_proj", use_bias=False, **kw)(condition)
        sample = dense(self.time_embed_dim, "linear_1", **kw)(sample)
        sample = dense(self.out_dim or self.time_embed_dim, "linear_2", **kw)(activation(self.act_fn)(sample))
        return activation(self.post_act_fn)(sample) if self.post_act_fn is not None else sample


class AttentionPooling(nn.Module):
    num_heads: int
    embed_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        bs, width = x.shape[0], self.embed_dim
        d = width // self.num_heads
        pos = self.param("positional_embedding", nn.initializers.normal(width**-0.5), (1, width), self.param_dtype)
        class_token = x.mean(axis=1, keepdims=True) + pos.astype(x.dtype)
        x = jnp.concatenate([class_token, x], axis=1)

        def heads(t):  # [B, N, width] -> [B, heads, N, d]
            return t.reshape(bs, -1, self.num_heads, d).transpose(0, 2, 1, 3)

        q = heads(dense(width, "q_proj", **kw)(class_token))
        k = heads(dense(width, "k_proj", **kw)(x))
        v = heads(dense(width, "v_proj", **kw)(x))
        scale = 1 / math.sqrt(math.sqrt(d))
        hp = jax.lax.Precision.HIGHEST
        weight = jnp.einsum("bhtc,bhsc->bhts", q * scale, k * scale, precision=hp)
        weight = jax.nn.softmax(weight.astype(jnp.float32), axis=-1).astype(weight.dtype)
        a = jnp.einsum("bhts,bhsc->bhtc", weight, v, precision=hp)  # [B, heads, 1, d]
        return a.reshape(bs, width)


class TextTimeEmbedding(nn.Module):
    encoder_dim: int
    time_embed_dim: int
    num_heads: int = 64
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, hidden_states):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = LayerNorm(name="norm1", **kw)(hidden_states)
        x = AttentionPooling(self.num_heads, self.encoder_dim, name="pool", **kw)(x)
        return LayerNorm(name="norm2", **kw)(dense(self.time_embed_dim, "proj", **kw)(x))


class TextImageProjection(nn.Module):
    cross_attention_dim: int
    num_image_text_embeds: int = 10
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, text_embeds, image_embeds):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        image_text = dense(self.num_image_text_embeds * self.cross_attention_dim, "image_embeds", **kw)(image_embeds)
        image_text = image_text.reshape(text_embeds.shape[0], self.num_image_text_embeds, -1)
        return jnp.concatenate([image_text, dense(self.cross_attention_dim, "text_proj", **kw)(text_embeds)], axis=1)


class ImageProjection(nn.Module):
    cross_attention_dim: int
    num_image_text_embeds: int = 32
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, image_embeds):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        x = dense(self.num_image_text_embeds * self.cross_attention_dim, "image_embeds", **kw)(image_embeds)
        return LayerNorm(name="norm", **kw)(x.reshape(image_embeds.shape[0], self.num_image_text_embeds, -1))


class TextImageTimeEmbedding(nn.Module):
    time_embed_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, text_embeds, image_embeds):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        text = LayerNorm(name="text_norm", **kw)(dense(self.time_embed_dim, "text_proj", **kw)(text_embeds))
        return dense(self.time_embed_dim, "image_proj", **kw)(image_embeds) + text


class ImageTimeEmbedding(nn.Module):
    time_embed_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, image_embeds):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        return LayerNorm(name="image_norm", **kw)(dense(self.time_embed_dim, "image_proj", **kw)(image_embeds))


_HINT_CONVS = ((16, 1), (16, 1), (32, 2), (32, 1), (96, 2), (96, 1), (256, 2))


class ImageHintTimeEmbedding(nn.Module):
    """Kandinsky 2.2 ControlNet: image embedding plus a conv encoder of the hint ([B, H, W, 3] -> /8, 4 ch)."""

    time_embed_dim: int
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, image_embeds, hint):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        emb = LayerNorm(name="image_norm", **kw)(dense(self.time_embed_dim, "image_proj", **kw)(image_embeds))
        h = hint
        for i, (cout, stride) in enumerate(_HINT_CONVS):  # Sequential indices 0, 2, ..., 12 (SiLUs between)
            h = jax.nn.silu(conv(cout, 3, f"input_hint_block_{2 * i}", stride=stride, padding=1, **kw)(h))
        return emb, conv(4, 3, "input_hint_block_14", padding=1, **kw)(h)


class Embed(nn.Module):
    """`torch.nn.Embedding`: parameter `embedding` [num, dim] (diffusers' Flax name)."""

    num_embeddings: int
    features: int
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, ids):
        table = self.param("embedding", nn.initializers.normal(1.0), (self.num_embeddings, self.features),
                           self.param_dtype)
        return jnp.take(table, ids.astype(jnp.int32), axis=0)
