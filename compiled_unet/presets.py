"""Named UNet structures (random weights; nothing is downloaded) and their example inputs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Preset:
    config: dict
    latent_size: int  # default H = W of the latent
    seq_len: int = 77


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
                   latent_size=128),
}


def preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}") from None


def example_inputs_for_config(config, batch: int, height: int, width: int, seq_len: int = 77, *,
                              dtype=torch.float32, device="cpu", seed: int = 0, **optional) -> dict[str, Any]:
    """Example inputs (a dict of forward arguments) for a UNet with `config` (UNetConfig, diffusers' config or
    a dict): the one example-input factory (presets, buckets, CLI, benchmarks use it).

    Covers sample, timestep, encoder_hidden_states (or the image embeddings of image-projection UNets) and the
    added conditions of text_time (SDXL), text_image, image and image_hint UNets; any other optional input is
    passed in `optional` (e.g. timestep_cond=torch.randn(...))."""
    get = config.get if isinstance(config, dict) else lambda k, d=None: getattr(config, k, d)
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    cross = get("cross_attention_dim", 1280)
    cross = cross[0] if isinstance(cross, (tuple, list)) else cross
    hint = get("addition_embed_type") == "image_hint"
    inputs = dict(sample=rnd(batch, get("in_channels", 4) - (4 if hint else 0), height, width),
                  timestep=torch.full((batch,), 500.0, device=device))
    hid_type, hid_dim = get("encoder_hid_dim_type"), get("encoder_hid_dim")
    if hid_dim is not None and hid_type is None:
        hid_type = "text_proj"  # diffusers' default when only encoder_hid_dim is set
    added = {}
    if hid_type == "image_proj":
        added["image_embeds"] = rnd(batch, hid_dim)
    else:
        inputs["encoder_hidden_states"] = rnd(batch, seq_len, hid_dim if hid_type in ("text_proj", "text_image_proj") else cross)
        if hid_type == "text_image_proj":
            added["image_embeds"] = rnd(batch, cross)
    kind = get("addition_embed_type")
    if kind == "text_time":
        n_time = get("projection_class_embeddings_input_dim") // get("addition_time_embed_dim")
        text_dim = get("projection_class_embeddings_input_dim") - 6 * get("addition_time_embed_dim")
        if n_time >= 6:
            added.update(text_embeds=rnd(batch, text_dim), time_ids=rnd(batch, 6))
    elif kind == "text_image":
        added.update(image_embeds=rnd(batch, cross))
    elif kind in ("image", "image_hint"):
        added.setdefault("image_embeds", rnd(batch, hid_dim))
        if hint:
            added["hint"] = rnd(batch, 3, height * 8, width * 8)
    if get("time_cond_proj_dim") is not None:
        inputs["timestep_cond"] = rnd(batch, get("time_cond_proj_dim"))
    if added:
        inputs["added_cond_kwargs"] = added
    inputs.update(optional)
    return inputs


def example_inputs(name: str, batch: int = 1, latent_size: int | None = None, dtype=torch.float32, seed: int = 0):
    """(sample, timestep, kwargs) for a preset, seeded."""
    p = preset(name)
    size = latent_size or p.latent_size
    inputs = example_inputs_for_config(p.config, batch, size, size, p.seq_len, dtype=dtype, seed=seed)
    return inputs.pop("sample"), inputs.pop("timestep"), inputs


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
