"""Time, class, text/image and GLIGEN embeddings (diffusers' names and numerics)."""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch
from torch import nn

from .layers import get_activation


def get_timestep_embedding(timesteps: torch.Tensor, embedding_dim: int, flip_sin_to_cos: bool = False,
                           downscale_freq_shift: float = 1, scale: float = 1, max_period: int = 10000) -> torch.Tensor:
    """Sinusoidal embedding of a 1-D tensor of timesteps: [N] -> [N, embedding_dim]."""
    half_dim = embedding_dim // 2
    exponent = -math.log(max_period) * torch.arange(0, half_dim, dtype=torch.float32, device=timesteps.device)
    exponent = exponent / (half_dim - downscale_freq_shift)
    emb = timesteps[:, None].float() * torch.exp(exponent)[None, :]
    emb = scale * emb
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=-1)
    if flip_sin_to_cos:
        emb = torch.cat([emb[:, half_dim:], emb[:, :half_dim]], dim=-1)
    if embedding_dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1, 0, 0))
    return emb


class Timesteps(nn.Module):
    def __init__(self, num_channels: int, flip_sin_to_cos: bool, downscale_freq_shift: float, scale: int = 1):
        super().__init__()
        self.num_channels, self.flip_sin_to_cos = num_channels, flip_sin_to_cos
        self.downscale_freq_shift, self.scale = downscale_freq_shift, scale

    def forward(self, timesteps: torch.Tensor) -> torch.Tensor:
        return get_timestep_embedding(timesteps, self.num_channels, self.flip_sin_to_cos,
                                      self.downscale_freq_shift, self.scale)


class GaussianFourierProjection(nn.Module):
    """Random Fourier features of the (noise-level) timestep; `weight` is a frozen parameter."""

    def __init__(self, embedding_size: int = 256, scale: float = 1.0, log: bool = False, flip_sin_to_cos: bool = False):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(embedding_size) * scale, requires_grad=False)
        self.log, self.flip_sin_to_cos = log, flip_sin_to_cos

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.log:
            x = torch.log(x)
        x_proj = x[:, None] * self.weight[None, :] * 2 * np.pi
        if self.flip_sin_to_cos:
            return torch.cat([torch.cos(x_proj), torch.sin(x_proj)], dim=-1)
        return torch.cat([torch.sin(x_proj), torch.cos(x_proj)], dim=-1)


class TimestepEmbedding(nn.Module):
    """linear_1 -> act -> linear_2 (-> post_act), with an optional LCM guidance `cond_proj`."""

    def __init__(self, in_channels: int, time_embed_dim: int, act_fn: str = "silu", out_dim: Optional[int] = None,
                 post_act_fn: Optional[str] = None, cond_proj_dim: Optional[int] = None):
        super().__init__()
        self.linear_1 = nn.Linear(in_channels, time_embed_dim)
        self.cond_proj = nn.Linear(cond_proj_dim, in_channels, bias=False) if cond_proj_dim is not None else None
        self.act = get_activation(act_fn)
        self.linear_2 = nn.Linear(time_embed_dim, out_dim or time_embed_dim)
        self.post_act = get_activation(post_act_fn) if post_act_fn is not None else None

    def forward(self, sample: torch.Tensor, condition: Optional[torch.Tensor] = None) -> torch.Tensor:
        if condition is not None:
            sample = sample + self.cond_proj(condition)
        sample = self.linear_2(self.act(self.linear_1(sample)))
        return self.post_act(sample) if self.post_act is not None else sample


class AttentionPooling(nn.Module):
    """CLIP-style attention pooling to one token (mean token + positional embedding as the query)."""

    def __init__(self, num_heads: int, embed_dim: int):
        super().__init__()
        self.positional_embedding = nn.Parameter(torch.randn(1, embed_dim) / embed_dim**0.5)
        self.k_proj = nn.Linear(embed_dim, embed_dim)
        self.q_proj = nn.Linear(embed_dim, embed_dim)
        self.v_proj = nn.Linear(embed_dim, embed_dim)
        self.num_heads, self.dim_per_head = num_heads, embed_dim // num_heads

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bs = x.shape[0]

        def shape(t):  # [B, N, width] -> [B*heads, dim_per_head, N]
            t = t.view(bs, -1, self.num_heads, self.dim_per_head).transpose(1, 2)
            return t.reshape(bs * self.num_heads, -1, self.dim_per_head).transpose(1, 2)

        class_token = x.mean(dim=1, keepdim=True) + self.positional_embedding.to(x.dtype)
        x = torch.cat([class_token, x], dim=1)
        q, k, v = shape(self.q_proj(class_token)), shape(self.k_proj(x)), shape(self.v_proj(x))
        scale = 1 / math.sqrt(math.sqrt(self.dim_per_head))
        weight = torch.einsum("bct,bcs->bts", q * scale, k * scale)
        weight = torch.softmax(weight.float(), dim=-1).type(weight.dtype)
        a = torch.einsum("bts,bcs->bct", weight, v)
        return a.reshape(bs, -1, 1).transpose(1, 2)[:, 0, :]


class TextTimeEmbedding(nn.Module):
    def __init__(self, encoder_dim: int, time_embed_dim: int, num_heads: int = 64):
        super().__init__()
        self.norm1 = nn.LayerNorm(encoder_dim)
        self.pool = AttentionPooling(num_heads, encoder_dim)
        self.proj = nn.Linear(encoder_dim, time_embed_dim)
        self.norm2 = nn.LayerNorm(time_embed_dim)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.norm2(self.proj(self.pool(self.norm1(hidden_states))))


class TextImageProjection(nn.Module):
    def __init__(self, text_embed_dim: int, image_embed_dim: int, cross_attention_dim: int, num_image_text_embeds: int = 10):
        super().__init__()
        self.num_image_text_embeds = num_image_text_embeds
        self.image_embeds = nn.Linear(image_embed_dim, num_image_text_embeds * cross_attention_dim)
        self.text_proj = nn.Linear(text_embed_dim, cross_attention_dim)

    def forward(self, text_embeds: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        image_text = self.image_embeds(image_embeds).reshape(text_embeds.shape[0], self.num_image_text_embeds, -1)
        return torch.cat([image_text, self.text_proj(text_embeds)], dim=1)


class ImageProjection(nn.Module):
    def __init__(self, image_embed_dim: int, cross_attention_dim: int, num_image_text_embeds: int = 32):
        super().__init__()
        self.num_image_text_embeds = num_image_text_embeds
        self.image_embeds = nn.Linear(image_embed_dim, num_image_text_embeds * cross_attention_dim)
        self.norm = nn.LayerNorm(cross_attention_dim)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        x = self.image_embeds(image_embeds.to(self.image_embeds.weight.dtype))
        return self.norm(x.reshape(image_embeds.shape[0], self.num_image_text_embeds, -1))


class TextImageTimeEmbedding(nn.Module):
    def __init__(self, text_embed_dim: int, image_embed_dim: int, time_embed_dim: int):
        super().__init__()
        self.text_proj = nn.Linear(text_embed_dim, time_embed_dim)
        self.text_norm = nn.LayerNorm(time_embed_dim)
        self.image_proj = nn.Linear(image_embed_dim, time_embed_dim)

    def forward(self, text_embeds: torch.Tensor, image_embeds: torch.Tensor) -> torch.Tensor:
        return self.image_proj(image_embeds) + self.text_norm(self.text_proj(text_embeds))


class ImageTimeEmbedding(nn.Module):
    def __init__(self, image_embed_dim: int, time_embed_dim: int):
        super().__init__()
        self.image_proj = nn.Linear(image_embed_dim, time_embed_dim)
        self.image_norm = nn.LayerNorm(time_embed_dim)

    def forward(self, image_embeds: torch.Tensor) -> torch.Tensor:
        return self.image_norm(self.image_proj(image_embeds))


class ImageHintTimeEmbedding(nn.Module):
    """Kandinsky 2.2 ControlNet: image embedding plus a conv encoder of the hint (3 -> 4 channels, /8)."""

    def __init__(self, image_embed_dim: int, time_embed_dim: int):
        super().__init__()
        self.image_proj = nn.Linear(image_embed_dim, time_embed_dim)
        self.image_norm = nn.LayerNorm(time_embed_dim)
        chans = [(3, 16, 1), (16, 16, 1), (16, 32, 2), (32, 32, 1), (32, 96, 2), (96, 96, 1), (96, 256, 2)]
        layers = []
        for cin, cout, stride in chans:
            layers += [nn.Conv2d(cin, cout, 3, padding=1, stride=stride), nn.SiLU()]
        layers.append(nn.Conv2d(256, 4, 3, padding=1))
        self.input_hint_block = nn.Sequential(*layers)

    def forward(self, image_embeds: torch.Tensor, hint: torch.Tensor):
        return self.image_norm(self.image_proj(image_embeds)), self.input_hint_block(hint)


def get_fourier_embeds_from_boundingbox(embed_dim: int, box: torch.Tensor) -> torch.Tensor:
    """[B, N, 4] boxes -> [B, N, embed_dim * 2 * 4] sin/cos features."""
    batch_size, num_boxes = box.shape[:2]
    emb = 100 ** (torch.arange(embed_dim) / embed_dim)
    emb = emb[None, None, None].to(device=box.device, dtype=box.dtype) * box.unsqueeze(-1)
    emb = torch.stack((emb.sin(), emb.cos()), dim=-1)
    return emb.permute(0, 1, 3, 4, 2).reshape(batch_size, num_boxes, embed_dim * 2 * 4)


def _mlp(in_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, 512), nn.SiLU(), nn.Linear(512, 512), nn.SiLU(), nn.Linear(512, out_dim))


class GLIGENTextBoundingboxProjection(nn.Module):
    """GLIGEN grounding tokens from phrase (and image) embeddings plus box positions."""

    def __init__(self, positive_len: int, out_dim, feature_type: str = "text-only", fourier_freqs: int = 8):
        super().__init__()
        self.positive_len, self.fourier_embedder_dim = positive_len, fourier_freqs
        self.position_dim = fourier_freqs * 2 * 4
        out_dim = out_dim[0] if isinstance(out_dim, tuple) else out_dim
        self.feature_type = feature_type
        if feature_type == "text-only":
            self.linears = _mlp(positive_len + self.position_dim, out_dim)
            self.null_positive_feature = nn.Parameter(torch.zeros([positive_len]))
        else:
            self.linears_text = _mlp(positive_len + self.position_dim, out_dim)
            self.linears_image = _mlp(positive_len + self.position_dim, out_dim)
            self.null_text_feature = nn.Parameter(torch.zeros([positive_len]))
            self.null_image_feature = nn.Parameter(torch.zeros([positive_len]))
        self.null_position_feature = nn.Parameter(torch.zeros([self.position_dim]))

    def forward(self, boxes, masks, positive_embeddings=None, phrases_masks=None, image_masks=None,
                phrases_embeddings=None, image_embeddings=None) -> torch.Tensor:
        masks = masks.unsqueeze(-1)
        xyxy = get_fourier_embeds_from_boundingbox(self.fourier_embedder_dim, boxes)
        xyxy = xyxy * masks + (1 - masks) * self.null_position_feature.view(1, 1, -1)
        if positive_embeddings is not None:
            null = self.null_positive_feature.view(1, 1, -1)
            positive_embeddings = positive_embeddings * masks + (1 - masks) * null
            return self.linears(torch.cat([positive_embeddings, xyxy], dim=-1))
        phrases_masks, image_masks = phrases_masks.unsqueeze(-1), image_masks.unsqueeze(-1)
        phrases = phrases_embeddings * phrases_masks + (1 - phrases_masks) * self.null_text_feature.view(1, 1, -1)
        images = image_embeddings * image_masks + (1 - image_masks) * self.null_image_feature.view(1, 1, -1)
        objs_text = self.linears_text(torch.cat([phrases, xyxy], dim=-1))
        objs_image = self.linears_image(torch.cat([images, xyxy], dim=-1))
        return torch.cat([objs_text, objs_image], dim=1)
