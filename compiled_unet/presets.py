"""Named UNet structures (random weights; nothing is downloaded) and their example inputs."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Preset:
    config: dict
    latent_size: int  # default H = W of the latent
    seq_len: int = 77
    added_cond: dict = field(default_factory=dict)  # name -> per-sample shape


PRESETS = {
    "tiny": Preset(dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
                        attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), sample_size=16), latent_size=16, seq_len=8),
    "sd15": Preset(dict(cross_attention_dim=768, attention_head_dim=8, sample_size=64), latent_size=64),
    "sd21": Preset(dict(cross_attention_dim=1024, attention_head_dim=(5, 10, 20, 20), use_linear_projection=True,
                        sample_size=96), latent_size=96),
    "sdxl": Preset(dict(block_out_channels=(320, 640, 1280), down_block_types=("DownBlock2D", "CrossAttnDownBlock2D",
                        "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                        attention_head_dim=(5, 10, 20), transformer_layers_per_block=(1, 2, 10), cross_attention_dim=2048,
                        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
                        projection_class_embeddings_input_dim=2816, sample_size=128),
                   latent_size=128, added_cond={"text_embeds": (1280,), "time_ids": (6,)}),
}


def preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}") from None


def example_inputs(name: str, batch: int = 1, latent_size: int | None = None, dtype=torch.float32, seed: int = 0):
    """(sample, timestep, kwargs) for a preset, seeded."""
    p = preset(name)
    size = latent_size or p.latent_size
    g = torch.Generator().manual_seed(seed)
    c = p.config
    sample = torch.randn(batch, c.get("in_channels", 4), size, size, generator=g).to(dtype)
    timestep = torch.full((batch,), 500.0)
    ehs = torch.randn(batch, p.seq_len, c["cross_attention_dim"], generator=g).to(dtype)
    kwargs = {"encoder_hidden_states": ehs}
    if p.added_cond:
        kwargs["added_cond_kwargs"] = {k: torch.randn(batch, *s, generator=g).to(dtype) for k, s in p.added_cond.items()}
    return sample, timestep, kwargs


def build_random(name: str, seed: int = 0, dtype=torch.float32):
    """A preset UNet with seeded random weights (conv_out etc. not left at zero)."""
    from .unet import UNet2DConditionModel

    torch.manual_seed(seed)
    model = UNet2DConditionModel(**preset(name).config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g) * (1.0 / p[0].numel()) ** 0.5)
            elif "norm" not in pname:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    return model.to(dtype).eval()
