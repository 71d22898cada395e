"""Named tiny configurations and their inputs, shared by the export, error and block tests.

The hypothesis strategies (tests/strategies.py) draw across the whole surface; these are the
hand-picked families that every test file can name.
"""
from __future__ import annotations

import torch

BASE = dict(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, cross_attention_dim=8,
            attention_head_dim=2, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))

CONFIGS = {
    "sd": {},
    "sdxl": dict(addition_embed_type="text_time", addition_time_embed_dim=4,
                 projection_class_embeddings_input_dim=8 + 6 * 4, transformer_layers_per_block=(1, 2),
                 use_linear_projection=True),
    "unclip": dict(down_block_types=("SimpleCrossAttnDownBlock2D", "ResnetDownsampleBlock2D"),
                   up_block_types=("ResnetUpsampleBlock2D", "SimpleCrossAttnUpBlock2D"),
                   mid_block_type="UNetMidBlock2DSimpleCrossAttn", resnet_skip_time_act=True,
                   resnet_time_scale_shift="scale_shift", class_embed_type="timestep"),
    "attn_blocks": dict(down_block_types=("AttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "AttnUpBlock2D"),
                        mid_block_type="UNetMidBlock2D", num_class_embeds=3, class_embeddings_concat=True,
                        time_embedding_act_fn="mish", timestep_post_act="gelu", time_cond_proj_dim=5),
    "fourier": dict(time_embedding_type="fourier", flip_sin_to_cos=False, center_input_sample=True, act_fn="gelu",
                    norm_num_groups=2, upcast_attention=True, conv_in_kernel=1, conv_out_kernel=5),
    "gligen": dict(attention_type="gated"),
    "image_hint": dict(in_channels=8, addition_embed_type="image_hint", encoder_hid_dim=6),
}


def randomize_(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Overwrite every parameter with seeded random values (diffusers zero-inits some layers)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.ndim == 1 and name.endswith("weight"):
                p.copy_(1 + 0.2 * (torch.rand(p.shape, generator=g) - 0.5))
            else:
                fan_in = p[0].numel() if p.ndim > 1 else 1
                p.copy_(torch.randn(p.shape, generator=g) * (0.5 / fan_in**0.5 if p.ndim > 1 else 0.1))
    return model


def inputs_for(name: str, batch: int = 2, hw=(8, 8), seq: int = 5, seed: int = 1) -> tuple[tuple, dict]:
    """(args, kwargs) for forward: args = (sample, timestep)."""
    cfg = {**BASE, **CONFIGS[name]}
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    in_ch = cfg.get("in_channels", 4) - (4 if cfg.get("addition_embed_type") == "image_hint" else 0)
    sample = rnd(batch, in_ch, *hw)
    ehs_dim = cfg.get("encoder_hid_dim") or cfg["cross_attention_dim"]
    kwargs = dict(encoder_hidden_states=rnd(batch, seq, ehs_dim))
    timestep = torch.tensor([10.0, 500.0][:batch] + [7.0] * max(0, batch - 2))
    if name == "sdxl":
        kwargs["added_cond_kwargs"] = {"text_embeds": rnd(batch, 8), "time_ids": rnd(batch, 6)}
    if name == "unclip":
        kwargs["class_labels"] = torch.arange(batch) * 3
    if name == "attn_blocks":
        kwargs["class_labels"] = torch.arange(batch) % 3
        kwargs["timestep_cond"] = rnd(batch, 5)
    if name == "gligen":
        kwargs["cross_attention_kwargs"] = {"gligen": {
            "boxes": torch.rand(batch, 3, 4, generator=g), "positive_embeddings": rnd(batch, 3, 8),
            "masks": (torch.arange(3)[None] <= torch.arange(batch)[:, None]).float()}}
    if name == "image_hint":
        kwargs["added_cond_kwargs"] = {"image_embeds": rnd(batch, 6), "hint": rnd(batch, 3, hw[0] * 8, hw[1] * 8)}
    return (sample, timestep), kwargs


def build(name: str, seed: int = 0):
    from compiled_unet import UNet2DConditionModel
    return randomize_(UNet2DConditionModel(**{**BASE, **CONFIGS[name]}), seed).eval()


class ConvLinear(torch.nn.Module):
    """Not a UNet: one conv and one linear, for backend tests that need a compile in seconds (freezing,
    packing, package caching)."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(8, 16, 3, padding=1)
        self.linear = torch.nn.Linear(16, 16)

    def forward(self, x):
        return (self.linear(self.conv(x).permute(0, 2, 3, 1)),)  # a tuple, as the UNet programs return
