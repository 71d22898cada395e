"""The UNet's configuration: diffusers' constructor arguments as one frozen dataclass.

`UNetConfig` holds the arguments exactly as diffusers names and defaults them (so `config.json` files
round-trip), validates them once in `__post_init__`, and `plan()` derives the per-block values the
modules need. This is the one place that owns diffusers' naming quirks (`attention_head_dim` is really
the number of heads for cross-attention blocks) and every default.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Optional, Union

DOWN_BLOCK_TYPES = (
    "DownBlock2D", "ResnetDownsampleBlock2D", "AttnDownBlock2D", "CrossAttnDownBlock2D",
    "SimpleCrossAttnDownBlock2D", "SkipDownBlock2D", "AttnSkipDownBlock2D", "KDownBlock2D",
    "KCrossAttnDownBlock2D",
)
UP_BLOCK_TYPES = (
    "UpBlock2D", "ResnetUpsampleBlock2D", "AttnUpBlock2D", "CrossAttnUpBlock2D",
    "SimpleCrossAttnUpBlock2D", "SkipUpBlock2D", "AttnSkipUpBlock2D", "KUpBlock2D",
    "KCrossAttnUpBlock2D",
)
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2DSimpleCrossAttn", "UNetMidBlock2D", None)
ACTIVATIONS = ("silu", "swish", "mish", "gelu", "relu")
CLASS_EMBED_TYPES = (None, "timestep", "identity", "projection", "simple_projection")
ADDITION_EMBED_TYPES = (None, "text", "text_image", "text_time", "image", "image_hint")
ENCODER_HID_DIM_TYPES = (None, "text_proj", "text_image_proj", "image_proj")
TIME_EMBEDDING_TYPES = ("positional", "fourier")
ATTENTION_TYPES = ("default", "gated", "gated-text-image")
CROSS_ATTENTION_NORMS = (None, "layer_norm", "group_norm")

IntOrTuple = Union[int, tuple]


def _tuple(value):
    """JSON gives lists; the config stores tuples (hashable, immutable), nested ones too."""
    if isinstance(value, list):
        return tuple(_tuple(v) for v in value)
    return value


def _strip_unet_res(block_type: Optional[str]) -> Optional[str]:
    # diffusers accepts the legacy "UNetRes" prefix (e.g. "UNetResDownBlock2D").
    if isinstance(block_type, str) and block_type.startswith("UNetRes"):
        return block_type[7:]
    return block_type


@dataclass(frozen=True)
class UNetConfig:
    """diffusers' `UNet2DConditionModel` constructor arguments, same names and defaults."""

    sample_size: Optional[IntOrTuple] = None
    in_channels: int = 4
    out_channels: int = 4
    center_input_sample: bool = False
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: Optional[str] = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    only_cross_attention: Union[bool, tuple] = False
    block_out_channels: tuple = (320, 640, 1280, 1280)
    layers_per_block: IntOrTuple = 2
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1
    dropout: float = 0.0
    act_fn: str = "silu"
    norm_num_groups: Optional[int] = 32
    norm_eps: float = 1e-5
    cross_attention_dim: IntOrTuple = 1280
    transformer_layers_per_block: IntOrTuple = 1
    reverse_transformer_layers_per_block: Optional[tuple] = None
    encoder_hid_dim: Optional[int] = None
    encoder_hid_dim_type: Optional[str] = None
    attention_head_dim: IntOrTuple = 8
    num_attention_heads: Optional[IntOrTuple] = None
    dual_cross_attention: bool = False
    use_linear_projection: bool = False
    class_embed_type: Optional[str] = None
    addition_embed_type: Optional[str] = None
    addition_time_embed_dim: Optional[int] = None
    num_class_embeds: Optional[int] = None
    upcast_attention: bool = False
    resnet_time_scale_shift: str = "default"
    resnet_skip_time_act: bool = False
    resnet_out_scale_factor: float = 1.0
    time_embedding_type: str = "positional"
    time_embedding_dim: Optional[int] = None
    time_embedding_act_fn: Optional[str] = None
    timestep_post_act: Optional[str] = None
    time_cond_proj_dim: Optional[int] = None
    conv_in_kernel: int = 3
    conv_out_kernel: int = 3
    projection_class_embeddings_input_dim: Optional[int] = None
    attention_type: str = "default"
    class_embeddings_concat: bool = False
    mid_block_only_cross_attention: Optional[bool] = None
    cross_attention_norm: Optional[str] = None
    addition_embed_type_num_heads: int = 64

    def __post_init__(self):
        for f in dataclasses.fields(self):
            object.__setattr__(self, f.name, _tuple(getattr(self, f.name)))
        # diffusers registers this default into the config, so a saved config carries it.
        if self.encoder_hid_dim_type is None and self.encoder_hid_dim is not None:
            object.__setattr__(self, "encoder_hid_dim_type", "text_proj")
        _validate(self)

    # -- dict-like access, as diffusers' FrozenDict config offers (`config["in_channels"]`) ----------
    def __getitem__(self, key: str) -> Any:
        try:
            return getattr(self, key)
        except AttributeError:
            raise KeyError(key) from None

    def __contains__(self, key: str) -> bool:
        return key in self.keys()

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key, default)

    def keys(self):
        return [f.name for f in dataclasses.fields(self)]

    def items(self):
        return [(k, getattr(self, k)) for k in self.keys()]

    def to_dict(self) -> dict:
        """JSON-ready dict in diffusers' layout (tuples become lists)."""
        def plain(v):
            return [plain(x) for x in v] if isinstance(v, (tuple, list)) else v
        return {k: plain(v) for k, v in self.items()}

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, config: dict, **overrides) -> "UNetConfig":
        """Accepts a diffusers config.json dict as is: private keys (`_class_name`, ...) are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        merged = {k: v for k, v in dict(config).items() if not k.startswith("_")}
        merged.update(overrides)
        unknown = sorted(k for k in merged if k not in known)
        if unknown:
            raise TypeError(
                f"UNet2DConditionModel got unknown config arguments {unknown}; expected a subset of {sorted(known)}"
            )
        return cls(**merged)

    def plan(self) -> "BlockPlan":
        return BlockPlan.from_config(self)


def _per_block(name: str, value, n: int, allowed_types=(int,)) -> tuple:
    if isinstance(value, allowed_types) or value is None:
        return (value,) * n
    if len(value) != n:
        raise ValueError(
            f"`{name}` must be one value or one per down block ({n}, for down_block_types); got {len(value)}: {value}"
        )
    return tuple(value)


def _validate(c: UNetConfig) -> None:
    n = len(c.down_block_types)
    if len(c.up_block_types) != n:
        raise ValueError(
            f"Must provide the same number of `down_block_types` as `up_block_types`: "
            f"down_block_types={c.down_block_types}, up_block_types={c.up_block_types}"
        )
    if len(c.block_out_channels) != n:
        raise ValueError(
            f"Must provide the same number of `block_out_channels` as `down_block_types`: "
            f"block_out_channels={c.block_out_channels}, down_block_types={c.down_block_types}"
        )
    for name, types, allowed in (
        ("down_block_types", c.down_block_types, DOWN_BLOCK_TYPES),
        ("up_block_types", c.up_block_types, UP_BLOCK_TYPES),
    ):
        for t in types:
            if _strip_unet_res(t) not in allowed:
                raise ValueError(f"`{name}` has unknown block type {t!r}; expected one of {list(allowed)}")
    if c.mid_block_type not in MID_BLOCK_TYPES:
        raise ValueError(f"unknown `mid_block_type` {c.mid_block_type!r}; expected one of {list(MID_BLOCK_TYPES)}")
    if c.num_attention_heads is not None:
        # Same rule as diffusers: for this model `attention_head_dim` carries the head count.
        raise ValueError(
            "`num_attention_heads` cannot be set for UNet2DConditionModel (diffusers issue #2011: "
            "`attention_head_dim` holds the number of heads here); pass `attention_head_dim` instead"
        )
    _per_block("only_cross_attention", c.only_cross_attention, n, (bool,))
    _per_block("attention_head_dim", c.attention_head_dim, n)
    _per_block("cross_attention_dim", c.cross_attention_dim, n)
    _per_block("layers_per_block", c.layers_per_block, n)
    if not isinstance(c.transformer_layers_per_block, int):
        _per_block("transformer_layers_per_block", c.transformer_layers_per_block, n)
        if c.reverse_transformer_layers_per_block is None and any(
            isinstance(x, tuple) for x in c.transformer_layers_per_block
        ):
            raise ValueError(
                "`reverse_transformer_layers_per_block` is required when `transformer_layers_per_block` has "
                "per-layer tuples (an asymmetrical UNet)"
            )
    if c.reverse_transformer_layers_per_block is not None and len(c.reverse_transformer_layers_per_block) != n:
        raise ValueError(
            f"`reverse_transformer_layers_per_block` must have one entry per up block ({n}); "
            f"got {c.reverse_transformer_layers_per_block}"
        )
    for name, value, allowed in (
        ("act_fn", c.act_fn, ACTIVATIONS),
        ("class_embed_type", c.class_embed_type, CLASS_EMBED_TYPES),
        ("addition_embed_type", c.addition_embed_type, ADDITION_EMBED_TYPES),
        ("time_embedding_type", c.time_embedding_type, TIME_EMBEDDING_TYPES),
        ("attention_type", c.attention_type, ATTENTION_TYPES),
        ("cross_attention_norm", c.cross_attention_norm, CROSS_ATTENTION_NORMS),
        ("resnet_time_scale_shift", c.resnet_time_scale_shift, ("default", "scale_shift")),
        ("time_embedding_act_fn", c.time_embedding_act_fn, (None,) + ACTIVATIONS),
        ("timestep_post_act", c.timestep_post_act, (None,) + ACTIVATIONS),
    ):
        if value not in allowed:
            raise ValueError(f"unknown `{name}` {value!r}; expected one of {list(allowed)}")
    if c.encoder_hid_dim_type == "ip_image_proj":
        raise ValueError(
            "`encoder_hid_dim_type='ip_image_proj'` is set by loading IP-Adapter weights, not at construction; "
            f"expected one of {list(ENCODER_HID_DIM_TYPES)}"
        )
    if c.encoder_hid_dim_type not in ENCODER_HID_DIM_TYPES:
        raise ValueError(
            f"unknown `encoder_hid_dim_type` {c.encoder_hid_dim_type!r}; expected one of {list(ENCODER_HID_DIM_TYPES)}"
        )
    if c.encoder_hid_dim_type is not None and c.encoder_hid_dim is None:
        raise ValueError(f"`encoder_hid_dim` is required when `encoder_hid_dim_type` is {c.encoder_hid_dim_type!r}")
    if c.class_embed_type in ("projection", "simple_projection") and c.projection_class_embeddings_input_dim is None:
        raise ValueError(
            f"`class_embed_type={c.class_embed_type!r}` requires `projection_class_embeddings_input_dim`"
        )
    if c.addition_embed_type == "text_time":
        if c.addition_time_embed_dim is None or c.projection_class_embeddings_input_dim is None:
            raise ValueError(
                "`addition_embed_type='text_time'` requires `addition_time_embed_dim` and "
                "`projection_class_embeddings_input_dim`"
            )
    if c.addition_embed_type in ("image", "image_hint") and c.encoder_hid_dim is None:
        raise ValueError(f"`addition_embed_type={c.addition_embed_type!r}` requires `encoder_hid_dim`")
    if c.time_embedding_type == "fourier":
        dim = c.time_embedding_dim or c.block_out_channels[0] * 2
        if dim % 2:
            raise ValueError(f"`time_embedding_dim` must be even for fourier time embeddings; got {dim}")


@dataclass(frozen=True)
class BlockPlan:
    """Per-block values derived once from the config (what diffusers computes inside __init__)."""

    time_embed_dim: int
    timestep_input_dim: int
    blocks_time_embed_dim: int
    only_cross_attention: tuple
    mid_block_only_cross_attention: bool
    num_attention_heads: tuple
    attention_head_dim: tuple
    cross_attention_dim: tuple
    layers_per_block: tuple
    transformer_layers_per_block: tuple
    reverse_transformer_layers_per_block: tuple
    norm_groups: Optional[int] = field(default=None)

    @classmethod
    def from_config(cls, c: UNetConfig) -> "BlockPlan":
        n = len(c.down_block_types)
        if c.time_embedding_type == "fourier":
            time_embed_dim = c.time_embedding_dim or c.block_out_channels[0] * 2
            timestep_input_dim = time_embed_dim
        else:
            time_embed_dim = c.time_embedding_dim or c.block_out_channels[0] * 4
            timestep_input_dim = c.block_out_channels[0]
        mid_only = c.mid_block_only_cross_attention
        if isinstance(c.only_cross_attention, bool) and mid_only is None:
            mid_only = c.only_cross_attention
        # diffusers: `num_attention_heads = num_attention_heads or attention_head_dim`.
        heads = _per_block("attention_head_dim", c.attention_head_dim, n)
        tlpb = _per_block("transformer_layers_per_block", c.transformer_layers_per_block, n)
        reverse = c.reverse_transformer_layers_per_block or tuple(reversed(tlpb))
        return cls(
            time_embed_dim=time_embed_dim,
            timestep_input_dim=timestep_input_dim,
            blocks_time_embed_dim=time_embed_dim * 2 if c.class_embeddings_concat else time_embed_dim,
            only_cross_attention=_per_block("only_cross_attention", c.only_cross_attention, n, (bool,)),
            mid_block_only_cross_attention=bool(mid_only) if mid_only is not None else False,
            num_attention_heads=heads,
            attention_head_dim=heads,
            cross_attention_dim=_per_block("cross_attention_dim", c.cross_attention_dim, n),
            layers_per_block=_per_block("layers_per_block", c.layers_per_block, n),
            transformer_layers_per_block=tlpb,
            reverse_transformer_layers_per_block=tuple(reverse),
            norm_groups=c.norm_num_groups,
        )
