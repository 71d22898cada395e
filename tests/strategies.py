"""Hypothesis strategies: small, valid `UNet2DConditionModel` configs and forward inputs (diffusers 0.42.1).

Two public entry points:

- `unet_configs(families=..., max_blocks=3, **fixed)` draws constructor kwargs dicts. Configs come from
  "family" profiles (SD-like, SDXL-like, UnCLIP-like, Kandinsky-like, attention-only, K-diffusion,
  GLIGEN, a free mix of the standard blocks, plus the construct-only Skip and dual-attention families);
  each profile narrows the pools one shared builder draws from, so every draw satisfies the rules below.
  `fixed` pins a kwarg to a value wherever the builder would draw it (e.g. `attention_type="gated"`).
- `input_specs(config)` draws an `InputSpec` (shapes, seeds and switches; prints compactly in a
  falsifying example); `build_inputs(config, spec)` turns it into the forward kwargs dict.
  `unet_inputs(config)` composes the two.

Rules learnt from diffusers 0.42.1 (`unet_2d_condition.py`, `unet_2d_blocks.py`, `attention_processor.py`)
and probed by running it; the families below never draw a combination diffusers rejects:

- `num_attention_heads` must stay None: diffusers raises if it is set ("naming issue #2011").
- `encoder_hid_dim_type="ip_image_proj"` raises at construction (only `load_ip_adapter` builds it).
- `norm_num_groups=None` only works when every block builds its own GroupNorm groups (K and Skip blocks);
  the standard blocks would call `GroupNorm(None, C)`.
- `cross_attention_dim` must be an int with `encoder_hid_dim*`, `addition_embed_type` "text"/"text_image"
  and GLIGEN (those modules take it as a single width). As a per-block tuple, every block that consumes
  `encoder_hidden_states` must use the same width (one tensor feeds them all); others may differ.
- `class_embeddings_concat=True` doubles the blocks' temb width, so it needs a class embedding and no
  addition embedding (the addition is summed onto the concatenated embedding and would not broadcast).
- Sizes not divisible by 2**num_upsamplers only work when every up block that upsamples is `UpBlock2D` or
  `CrossAttnUpBlock2D`: the other up blocks ignore the forwarded `upsample_size`.
- `attention_mask` (the (B, L) text mask) is applied to the *self*-attention of `Transformer2DModel`s and
  K attention blocks, where its length cannot match; diffusers only runs with it when every attention that
  sees it is a cross attention: `CrossAttn*Block2D` with `only_cross_attention`, `SimpleCrossAttn*` without
  it, no `UNetMidBlock2DCrossAttn` (its transformer never gets `only_cross_attention`), no K attention.
- `SimpleCrossAttn*` with `only_cross_attention=True` cannot take any mask: the processor pads the mask by
  the number of image tokens, which it only concatenates to the keys without `only_cross_attention`.
- T2I-Adapter residuals cannot reach `SimpleCrossAttnDownBlock2D` / `KCrossAttnDownBlock2D` (no
  `additional_residuals` argument), so we draw at most as many as there are blocks before the first one.
- ControlNet residuals cannot be added to the `None` skip entries of a final `KCrossAttnDownBlock2D`.
- `cross_attention_norm="group_norm"` uses 32 groups over `cross_attention_dim`, so it needs 32 | D;
  `"layer_norm"` builds `LayerNorm(block channels)` but normalises `encoder_hidden_states`, so every
  SimpleCrossAttn block must have exactly `cross_attention_dim` channels.
- SimpleCrossAttn (added-KV) attention reshapes heads * head_dim back to the channel count, so its
  `attention_head_dim` (a head *width* there) must divide the channels; elsewhere any width <= channels works.
- With masks, SimpleCrossAttn pads the mask by the image-token count only when the lengths differ; when
  kv_len == h * w at some level the mask stays short and diffusers raises (such draws drop the masks).
- torch's group_norm refuses groups holding a single value (batch 1, one channel per group, 1x1 map, or
  one 32-wide token under cross-attention group_norm); such inputs are not drawn.
- K blocks use 32-channel groups (channels must be multiples of 32), and their up path only lines up for
  some channel/temb patterns (`_k_structure_ok` replays diffusers' channel bookkeeping).

Known diffusers limitations (the construct-only families; their forward raises inside diffusers):
- `dual_cross_attention=True`: `CrossAttnDownBlock2D` always passes `encoder_attention_mask=` to
  `DualTransformer2DModel.forward`, which has no such parameter, so diffusers 0.42 raises TypeError on
  *every* forward, with or without a mask.
- `SkipDownBlock2D` / `AttnSkipDownBlock2D` return a 3-tuple and need a `skip_sample`; the
  UNet2DConditionModel forward passes neither, so any model with them raises.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from hypothesis import assume
from hypothesis import strategies as st

# ---------------------------------------------------------------------------------------------------------
# Block catalogue

STANDARD_DOWN = ("DownBlock2D", "ResnetDownsampleBlock2D", "AttnDownBlock2D", "CrossAttnDownBlock2D",
                 "SimpleCrossAttnDownBlock2D")
STANDARD_UP = ("UpBlock2D", "ResnetUpsampleBlock2D", "AttnUpBlock2D", "CrossAttnUpBlock2D",
               "SimpleCrossAttnUpBlock2D")
K_DOWN = ("KDownBlock2D", "KCrossAttnDownBlock2D")
K_UP = ("KUpBlock2D", "KCrossAttnUpBlock2D")
SKIP_DOWN = ("SkipDownBlock2D", "AttnSkipDownBlock2D")
SKIP_UP = ("SkipUpBlock2D", "AttnSkipUpBlock2D")
MID_TYPES = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2DSimpleCrossAttn", "UNetMidBlock2D", None)

TWIN = {
    "DownBlock2D": "UpBlock2D", "ResnetDownsampleBlock2D": "ResnetUpsampleBlock2D",
    "AttnDownBlock2D": "AttnUpBlock2D", "CrossAttnDownBlock2D": "CrossAttnUpBlock2D",
    "SimpleCrossAttnDownBlock2D": "SimpleCrossAttnUpBlock2D", "KDownBlock2D": "KUpBlock2D",
    "KCrossAttnDownBlock2D": "KCrossAttnUpBlock2D", "SkipDownBlock2D": "SkipUpBlock2D",
    "AttnSkipDownBlock2D": "AttnSkipUpBlock2D",
}
# Blocks (and mid blocks) that attend to encoder_hidden_states.
CROSS_CONSUMERS = frozenset({
    "CrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D", "KCrossAttnDownBlock2D",
    "CrossAttnUpBlock2D", "SimpleCrossAttnUpBlock2D", "KCrossAttnUpBlock2D",
    "UNetMidBlock2DCrossAttn", "UNetMidBlock2DSimpleCrossAttn",
})
# Up blocks that honour the `upsample_size` diffusers forwards for non-divisible sizes.
UPSAMPLE_SIZE_AWARE = frozenset({"UpBlock2D", "CrossAttnUpBlock2D"})
# Down blocks whose downsampler is a stride-2 conv (padding = downsample_padding); the rest average-pool.
CONV_DOWNSAMPLERS = frozenset({"DownBlock2D", "CrossAttnDownBlock2D", "AttnDownBlock2D"})

ACTIVATIONS = ("silu", "swish", "mish", "gelu", "relu")
IMAGE_PROJ_TOKENS = 32       # diffusers ImageProjection(num_image_text_embeds=32)
TEXT_IMAGE_PROJ_TOKENS = 10  # diffusers TextImageProjection(num_image_text_embeds=10)

# diffusers' constructor defaults (tests/test_parity.py checks this table against inspect.signature).
DEFAULTS = dict(
    sample_size=None, in_channels=4, out_channels=4, center_input_sample=False, flip_sin_to_cos=True,
    freq_shift=0, mid_block_type="UNetMidBlock2DCrossAttn", only_cross_attention=False, layers_per_block=2,
    downsample_padding=1, mid_block_scale_factor=1, dropout=0.0, act_fn="silu", norm_num_groups=32,
    norm_eps=1e-5, cross_attention_dim=1280, transformer_layers_per_block=1,
    reverse_transformer_layers_per_block=None, encoder_hid_dim=None, encoder_hid_dim_type=None,
    attention_head_dim=8, num_attention_heads=None, dual_cross_attention=False, use_linear_projection=False,
    class_embed_type=None, addition_embed_type=None, addition_time_embed_dim=None, num_class_embeds=None,
    upcast_attention=False, resnet_time_scale_shift="default", resnet_skip_time_act=False,
    resnet_out_scale_factor=1.0, time_embedding_type="positional", time_embedding_dim=None,
    time_embedding_act_fn=None, timestep_post_act=None, time_cond_proj_dim=None, conv_in_kernel=3,
    conv_out_kernel=3, projection_class_embeddings_input_dim=None, attention_type="default",
    class_embeddings_concat=False, mid_block_only_cross_attention=None, cross_attention_norm=None,
    addition_embed_type_num_heads=64,
)
# Keys the builder always writes (structure); every other key equal to its default may be left out.
_STRUCTURAL = ("down_block_types", "up_block_types", "block_out_channels")


# ---------------------------------------------------------------------------------------------------------
# Family profiles


@dataclass(frozen=True)
class Profile:
    """Pools one family draws from. Everything not listed here is drawn from the shared defaults."""

    name: str
    down: tuple
    up: tuple
    mids: tuple
    min_blocks: int = 1
    mirror: str = "either"          # "always" | "never" | "either": up blocks = twins of reversed down
    groups: tuple = (1, 2, 4)       # norm_num_groups pool (None only for K / Skip)
    channels: tuple | None = None   # channel pool; default: multiples of the group count in [4, 16]
    class_types: tuple = (None,)
    additions: tuple = ((None, None),)  # (encoder_hid_dim_type, addition_embed_type) pairs
    attention_types: tuple = ("default",)
    cross_norms: tuple = (None,)
    scale_shifts: tuple = ("default", "scale_shift")
    tuple_cross_dim: bool = True    # may draw a per-block cross_attention_dim tuple
    nested_transformer_layers: bool = True
    time_types: tuple = ("positional", "fourier")
    dual_cross_attention: bool = False
    runnable: bool = True           # False: diffusers' own forward raises; construct/state_dict parity only


_ALL_CLASS = (None, "num_class_embeds", "timestep", "identity", "projection", "simple_projection")
_ALL_ADDITIONS = tuple(
    (enc, add)
    for enc in (None, "implicit_text_proj", "text_proj", "text_image_proj", "image_proj")
    for add in (None, "text", "text_image", "text_time", "image", "image_hint")
)

PROFILES = {
    "sd": Profile(
        "sd", down=("CrossAttnDownBlock2D", "DownBlock2D"), up=("CrossAttnUpBlock2D", "UpBlock2D"),
        mids=("UNetMidBlock2DCrossAttn", "UNetMidBlock2D", None), mirror="either",
        class_types=(None, "num_class_embeds", "timestep"),
        additions=((None, None), ("text_proj", None), ("implicit_text_proj", None)),
    ),
    "sdxl": Profile(
        "sdxl", down=("DownBlock2D", "CrossAttnDownBlock2D"), up=("CrossAttnUpBlock2D", "UpBlock2D"),
        mids=("UNetMidBlock2DCrossAttn",), min_blocks=2, mirror="always",
        class_types=(None, "projection"), additions=((None, "text_time"),), time_types=("positional",),
    ),
    "unclip": Profile(
        "unclip", down=("SimpleCrossAttnDownBlock2D", "ResnetDownsampleBlock2D"),
        up=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
        mids=("UNetMidBlock2DSimpleCrossAttn", "UNetMidBlock2D", None), mirror="either",
        class_types=(None, "identity", "projection", "simple_projection"),
        additions=((None, None), ("text_proj", None), ("text_proj", "text"), (None, "text")),
        cross_norms=(None, "layer_norm", "group_norm"), scale_shifts=("scale_shift", "default"),
    ),
    "kandinsky": Profile(
        "kandinsky", down=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D", "CrossAttnUpBlock2D"),
        mids=("UNetMidBlock2DSimpleCrossAttn", "UNetMidBlock2DCrossAttn"), mirror="either",
        additions=(("text_image_proj", "text_image"), ("image_proj", "image"), ("image_proj", "image_hint"),
                   ("text_image_proj", None), ("image_proj", None), ("implicit_text_proj", "image"),
                   (None, "text_image")),
        scale_shifts=("scale_shift", "default"), tuple_cross_dim=False,
    ),
    "attn": Profile(
        "attn", down=("AttnDownBlock2D", "DownBlock2D", "ResnetDownsampleBlock2D"),
        up=("AttnUpBlock2D", "UpBlock2D", "ResnetUpsampleBlock2D"), mids=("UNetMidBlock2D", None),
        class_types=(None, "num_class_embeds", "timestep", "identity"),
    ),
    "mixed": Profile(
        "mixed", down=STANDARD_DOWN, up=STANDARD_UP, mids=MID_TYPES, mirror="never",
        class_types=_ALL_CLASS, additions=_ALL_ADDITIONS, cross_norms=(None, "layer_norm", "group_norm"),
    ),
    "k": Profile(
        "k", down=K_DOWN, up=K_UP, mids=MID_TYPES, min_blocks=2, groups=(None,), channels=(32, 64),
        class_types=(None, "num_class_embeds", "simple_projection"),
        additions=((None, None), ("text_proj", None)), scale_shifts=("default", "scale_shift"),
    ),
    "gligen": Profile(
        "gligen", down=("CrossAttnDownBlock2D", "DownBlock2D"), up=("CrossAttnUpBlock2D", "UpBlock2D"),
        mids=("UNetMidBlock2DCrossAttn", "UNetMidBlock2D"), mirror="always",
        attention_types=("gated", "gated-text-image"), tuple_cross_dim=False,
    ),
    # construct-only families (see module docstring)
    "skip": Profile(
        "skip", down=SKIP_DOWN, up=SKIP_UP,
        mids=("UNetMidBlock2D", None), groups=(None, 8), channels=(32,), runnable=False,
    ),
    "dual": Profile(
        "dual", down=("CrossAttnDownBlock2D", "DownBlock2D"), up=("CrossAttnUpBlock2D", "UpBlock2D"),
        mids=("UNetMidBlock2DCrossAttn",), dual_cross_attention=True, tuple_cross_dim=False,
        nested_transformer_layers=False, runnable=False,
    ),
}
RUNNABLE_FAMILIES = tuple(k for k, p in PROFILES.items() if p.runnable)
CONSTRUCT_ONLY_FAMILIES = tuple(k for k, p in PROFILES.items() if not p.runnable)


# ---------------------------------------------------------------------------------------------------------
# Config builder


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _pick(draw, fixed, key, strategy):
    return fixed[key] if key in fixed else draw(strategy)


def _per_block(draw, n, values):
    return tuple(draw(st.sampled_from(values)) for _ in range(n))


def _int_or_tuple(draw, n, values):
    """An int, or (as diffusers also accepts) one value per block."""
    if draw(st.booleans()):
        return draw(st.sampled_from(values))
    return _per_block(draw, n, values)


def _as_tuple(value, n):
    return tuple(value) if isinstance(value, (tuple, list)) else (value,) * n


def _k_structure_ok(down, up, channels, layers, temb) -> bool:
    """Replays diffusers' K-block channel bookkeeping (KUpBlock2D / KCrossAttnUpBlock2D `k_in_channels`)."""
    n = len(down)
    res = [channels[0]]  # conv_in output
    for i, block in enumerate(down):
        final = i == n - 1
        res += [None if (block == "KCrossAttnDownBlock2D" and final) else channels[i]] * layers[i]
    hidden = channels[-1]
    rev_ch, rev_layers = channels[::-1], layers[::-1]
    for i, block in enumerate(up):
        in_ch, out_ch = rev_ch[min(i + 1, n - 1)], rev_ch[i]
        used, res = res[-rev_layers[i]:], res[:-rev_layers[i]]
        skip = used[-1]
        if block == "KUpBlock2D":
            k_in = 2 * out_ch
        else:
            k_in = out_ch if in_ch == out_ch == temb else 2 * out_ch
        if hidden + (skip or 0) != k_in:
            return False
        hidden = in_ch
    return True


def _simple_attention_channels(down, up, mid, n) -> dict:
    """{attention_head_dim index: channel indices its SimpleCrossAttn heads are built over}."""
    at: dict[int, set] = {}
    for i in range(n):
        if down[i] == "SimpleCrossAttnDownBlock2D":
            at.setdefault(i, set()).add(i)
        if up[i] == "SimpleCrossAttnUpBlock2D":
            at.setdefault(i, set()).add(n - 1 - i)
    if mid == "UNetMidBlock2DSimpleCrossAttn":
        at.setdefault(n - 1, set()).add(n - 1)
    return at


def _time_embed_dims(cfg):
    """(time_embed_dim, blocks' temb width) as diffusers derives them."""
    c0 = cfg["block_out_channels"][0]
    ted = cfg.get("time_embedding_dim")
    if cfg.get("time_embedding_type", "positional") == "fourier":
        t = ted or 2 * c0
    else:
        t = ted or 4 * c0
    return t, (2 * t if cfg.get("class_embeddings_concat") else t)


@st.composite
def _config(draw, profile: Profile, max_blocks: int, fixed: dict):
    p = profile
    pick = lambda key, strategy: _pick(draw, fixed, key, strategy)  # noqa: E731

    # --- structure -----------------------------------------------------------------------------------
    if "down_block_types" in fixed:
        down = tuple(fixed["down_block_types"])
        n = len(down)
    else:
        n = draw(st.integers(p.min_blocks, max(p.min_blocks, max_blocks)))
        down = _per_block(draw, n, p.down)
    mirror = {"always": True, "never": False}.get(p.mirror)
    mirror = draw(st.booleans()) if mirror is None else mirror
    up = tuple(TWIN[b] for b in reversed(down)) if mirror else _per_block(draw, n, p.up)
    up = tuple(fixed.get("up_block_types", up))
    mid = pick("mid_block_type", st.sampled_from(p.mids))

    groups = pick("norm_num_groups", st.sampled_from(p.groups))
    if p.channels is not None:
        channel_pool = p.channels
    else:
        channel_pool = tuple(c for c in range(4, 17) if c % (groups or 1) == 0)
    channels = tuple(fixed.get("block_out_channels", _per_block(draw, n, channel_pool)))
    layers = pick("layers_per_block", st.just(None))
    if layers is None:
        layers = _int_or_tuple(draw, n, (1, 2))
    layers_t = _as_tuple(layers, n)

    cfg = dict(down_block_types=down, up_block_types=up, mid_block_type=mid, block_out_channels=channels,
               layers_per_block=layers, norm_num_groups=groups)

    # --- attention ------------------------------------------------------------------------------------
    cross_norm = pick("cross_attention_norm", st.sampled_from(p.cross_norms))
    cfg["cross_attention_norm"] = cross_norm
    cad = 32 if cross_norm == "group_norm" else draw(st.sampled_from((4, 6, 8)))
    simple_at = _simple_attention_channels(down, up, mid, n)
    if cross_norm == "layer_norm" and simple_at and "block_out_channels" not in fixed:
        # SimpleCrossAttn's Attention builds LayerNorm(out_channels) but applies it to encoder_hidden_states
        # (width cross_attention_dim): diffusers only runs when those widths agree.
        cad = draw(st.sampled_from(channel_pool))
        simple_channels = set().union(*simple_at.values())
        channels = tuple(cad if i in simple_channels else c for i, c in enumerate(channels))
        cfg["block_out_channels"] = channels

    # attention_head_dim: a head *count* for CrossAttn blocks, a head *width* for Attn/SimpleCrossAttn/K
    # blocks (up block i reads attention_head_dim[i] against reversed channels). SimpleCrossAttn reshapes
    # heads * width back to the channel count, so there it must divide the channels.
    min_ch = min(channels)
    if p.name == "k":
        head_pool = (8, 16, 32)
    else:
        head_pool = tuple(sorted(set(_divisors(math.gcd(*channels))) | set(range(1, min(min_ch, 4) + 1))))
    if "attention_head_dim" in fixed:
        cfg["attention_head_dim"] = fixed["attention_head_dim"]
    else:
        must_divide = [[channels[j] for j in simple_at.get(i, ())] for i in range(n)]

        def pool(widths):
            if not widths:
                return head_pool
            return tuple(d for d in _divisors(math.gcd(*widths)) if d <= min_ch)

        if draw(st.booleans()):
            cfg["attention_head_dim"] = draw(st.sampled_from(pool(sum(must_divide, []))))
        else:
            cfg["attention_head_dim"] = tuple(draw(st.sampled_from(pool(must_divide[i]))) for i in range(n))

    enc_type, add_type = draw(st.sampled_from(p.additions))
    enc_type = fixed.get("encoder_hid_dim_type", enc_type)
    add_type = fixed.get("addition_embed_type", add_type)
    attention_type = pick("attention_type", st.sampled_from(p.attention_types))
    cfg["attention_type"] = attention_type

    consumers_down = [down[i] in CROSS_CONSUMERS or up[n - 1 - i] in CROSS_CONSUMERS for i in range(n)]
    if mid in CROSS_CONSUMERS:
        consumers_down[-1] = True
    needs_int_cad = (enc_type is not None or add_type in ("text", "text_image", "image", "image_hint")
                     or attention_type != "default")
    if "cross_attention_dim" in fixed:
        cfg["cross_attention_dim"] = fixed["cross_attention_dim"]
    elif p.tuple_cross_dim and not needs_int_cad and draw(st.booleans()):
        cfg["cross_attention_dim"] = tuple(
            cad if consumers_down[i] else draw(st.sampled_from((3, 5, 8))) for i in range(n))
    else:
        cfg["cross_attention_dim"] = cad

    # transformer_layers_per_block: int, per block, or per block per layer (+ the reverse for the up path)
    kind = draw(st.sampled_from(("int", "tuple", "nested") if p.nested_transformer_layers else ("int", "tuple")))
    if "transformer_layers_per_block" in fixed:
        cfg["transformer_layers_per_block"] = fixed["transformer_layers_per_block"]
        cfg["reverse_transformer_layers_per_block"] = fixed.get("reverse_transformer_layers_per_block")
    else:
        if kind == "int":
            cfg["transformer_layers_per_block"] = draw(st.sampled_from((1, 2)))
        elif kind == "tuple":
            cfg["transformer_layers_per_block"] = _per_block(draw, n, (1, 2))
        else:
            cfg["transformer_layers_per_block"] = tuple(_per_block(draw, layers_t[i], (1, 2)) for i in range(n))
        if kind == "nested" or (p.nested_transformer_layers and draw(st.integers(0, 5)) == 0):
            rev_layers = layers_t[::-1]
            cfg["reverse_transformer_layers_per_block"] = tuple(
                _per_block(draw, rev_layers[i] + 1, (1, 2)) for i in range(n))
        else:
            cfg["reverse_transformer_layers_per_block"] = None

    oca = pick("only_cross_attention", st.one_of(st.booleans(), st.tuples(*[st.booleans()] * n)))
    cfg["only_cross_attention"] = oca
    cfg["mid_block_only_cross_attention"] = pick("mid_block_only_cross_attention",
                                                 st.sampled_from((None, False, True)))
    cfg["use_linear_projection"] = pick("use_linear_projection", st.booleans())
    cfg["upcast_attention"] = pick("upcast_attention", st.booleans())
    cfg["dual_cross_attention"] = p.dual_cross_attention

    # --- resnets / misc -------------------------------------------------------------------------------
    cfg["act_fn"] = pick("act_fn", st.sampled_from(ACTIVATIONS))
    cfg["norm_eps"] = pick("norm_eps", st.sampled_from((1e-5, 1e-6, 1e-3)))
    cfg["resnet_time_scale_shift"] = pick("resnet_time_scale_shift", st.sampled_from(p.scale_shifts))
    cfg["resnet_skip_time_act"] = pick("resnet_skip_time_act", st.booleans())
    cfg["resnet_out_scale_factor"] = pick("resnet_out_scale_factor", st.sampled_from((1.0, 0.5, 1.4142135623730951)))
    cfg["mid_block_scale_factor"] = pick("mid_block_scale_factor", st.sampled_from((1, 0.5, 1.4142135623730951)))
    cfg["downsample_padding"] = pick("downsample_padding", st.sampled_from((1, 0)))
    cfg["conv_in_kernel"] = pick("conv_in_kernel", st.sampled_from((3, 1, 5)))
    cfg["conv_out_kernel"] = pick("conv_out_kernel", st.sampled_from((3, 1, 5)))
    cfg["center_input_sample"] = pick("center_input_sample", st.booleans())
    cfg["dropout"] = pick("dropout", st.sampled_from((0.0, 0.1)))  # eval mode: must be a no-op
    cfg["sample_size"] = pick("sample_size", st.sampled_from((None, 8, 32, (8, 12))))
    sample_channels = draw(st.integers(1, 5))
    cfg["out_channels"] = pick("out_channels", st.integers(1, 5))

    # --- time embedding -------------------------------------------------------------------------------
    cfg["time_embedding_type"] = pick("time_embedding_type", st.sampled_from(p.time_types))
    cfg["flip_sin_to_cos"] = pick("flip_sin_to_cos", st.booleans())
    cfg["freq_shift"] = pick("freq_shift", st.sampled_from((0, 1)))
    cfg["time_embedding_act_fn"] = pick("time_embedding_act_fn", st.sampled_from((None,) + ACTIVATIONS))
    cfg["timestep_post_act"] = pick("timestep_post_act", st.sampled_from((None, "silu", "mish", "gelu")))
    cfg["time_cond_proj_dim"] = pick("time_cond_proj_dim", st.sampled_from((None, None, 3, 6)))
    if p.name == "k":
        # The first K up block only skips its concat when in == out == temb: let temb hit a block width.
        ted = pick("time_embedding_dim", st.sampled_from(tuple(sorted(set(channels))) + (None,)))
    else:
        odd = (9,) if cfg["time_embedding_type"] == "positional" else ()  # fourier needs an even width
        ted = pick("time_embedding_dim", st.sampled_from((None, None, 8, 12, 20) + odd))
    cfg["time_embedding_dim"] = ted

    # --- class / addition / encoder projection --------------------------------------------------------
    class_type = pick("class_embed_type", st.sampled_from(p.class_types))
    cfg["class_embed_type"] = None if class_type == "num_class_embeds" else class_type
    cfg["num_class_embeds"] = draw(st.integers(2, 5)) if class_type == "num_class_embeds" else None
    cfg["class_embeddings_concat"] = bool(
        class_type is not None and add_type is None and p.name != "k"
        and pick("class_embeddings_concat", st.booleans()))
    proj_dim = draw(st.integers(2, 8))
    cfg["projection_class_embeddings_input_dim"] = None
    if class_type in ("projection", "simple_projection"):
        cfg["projection_class_embeddings_input_dim"] = proj_dim

    d_int = cfg["cross_attention_dim"] if isinstance(cfg["cross_attention_dim"], int) else None
    enc_dim = None
    if enc_type is not None or add_type in ("image", "image_hint"):
        enc_dim = draw(st.sampled_from((3, 4, 6, 8)))
        # image_embeds has one width: text_image_proj / text_image want D, image_proj / image(_hint) want E.
        wants_d = enc_type == "text_image_proj" or add_type == "text_image"
        wants_e = enc_type == "image_proj" or add_type in ("image", "image_hint")
        if wants_d and wants_e:
            enc_dim = d_int
    if add_type in ("image", "image_hint") and enc_type is None:
        enc_type = "implicit_text_proj"
    cfg["encoder_hid_dim"] = enc_dim
    cfg["encoder_hid_dim_type"] = None if enc_type == "implicit_text_proj" else enc_type
    cfg["addition_embed_type"] = add_type
    cfg["addition_time_embed_dim"] = None
    if add_type == "text":
        raw = enc_dim or d_int
        cfg["addition_embed_type_num_heads"] = draw(st.sampled_from(_divisors(raw)))
    if add_type == "text_time":
        atd = draw(st.sampled_from((4, 6, 8)))
        n_ids = draw(st.integers(1, 3))
        cfg["addition_time_embed_dim"] = atd
        # text_embeds width + n_ids * atd; shared with class_embed_type="projection" when both are set
        cfg["projection_class_embeddings_input_dim"] = proj_dim + n_ids * atd
    cfg["in_channels"] = sample_channels + (4 if add_type == "image_hint" else 0)
    if "in_channels" in fixed:
        cfg["in_channels"] = fixed["in_channels"]

    # --- family-level validity ------------------------------------------------------------------------
    if p.name == "k":
        temb = _time_embed_dims(cfg)[1]
        assume(_k_structure_ok(down, up, channels, layers_t, temb))

    # --- spell some block types with the "UNetRes" prefix diffusers also accepts ----------------------
    if "down_block_types" not in fixed and draw(st.integers(0, 7)) == 0:
        cfg["down_block_types"] = tuple("UNetRes" + b if draw(st.booleans()) else b for b in down)
        cfg["up_block_types"] = tuple("UNetRes" + b if draw(st.booleans()) else b for b in up)

    # --- drop some keys that equal diffusers' defaults, so defaults get exercised too -----------------
    if draw(st.booleans()):
        for key in list(cfg):
            if key not in _STRUCTURAL and key not in fixed and key in DEFAULTS and cfg[key] == DEFAULTS[key]:
                if type(cfg[key]) is type(DEFAULTS[key]):
                    del cfg[key]
    return cfg


def unet_configs(*, families=None, max_blocks: int = 3, **fixed):
    """Valid small UNet2DConditionModel kwargs dicts drawn from the named family profiles.

    families: a name or names from `PROFILES` (default: every runnable family). `fixed` pins kwargs.
    """
    if families is None:
        families = RUNNABLE_FAMILIES
    if isinstance(families, str):
        families = (families,)
    return st.one_of(*[_config(PROFILES[f], max_blocks, fixed) for f in families])


# ---------------------------------------------------------------------------------------------------------
# Facts about a config that the inputs depend on


def canonical_block(name: str | None) -> str | None:
    """diffusers' get_down_block/get_up_block strip a leading "UNetRes" from block type names."""
    return name[7:] if name is not None and name.startswith("UNetRes") else name


def _resolved(cfg):
    c = dict(DEFAULTS)
    c.update(cfg)
    c["down_block_types"] = tuple(canonical_block(b) for b in c["down_block_types"])
    c["up_block_types"] = tuple(canonical_block(b) for b in c["up_block_types"])
    return c


def config_facts(cfg: dict) -> dict:
    """Derived widths and the forward features diffusers supports for this config."""
    c = _resolved(cfg)
    down, up, mid = tuple(c["down_block_types"]), tuple(c["up_block_types"]), c["mid_block_type"]
    n = len(down)
    channels = tuple(c["block_out_channels"])
    oca = c["only_cross_attention"]
    mid_oca = c["mid_block_only_cross_attention"]
    if isinstance(oca, bool):
        mid_oca = oca if mid_oca is None else mid_oca
        oca = (oca,) * n
    mid_oca = bool(mid_oca)
    oca = tuple(oca)
    cad = c["cross_attention_dim"]
    if isinstance(cad, int):
        ehs_dim = cad
    else:
        users = [cad[i] for i in range(n) if down[i] in CROSS_CONSUMERS or up[n - 1 - i] in CROSS_CONSUMERS]
        users += [cad[-1]] if mid in CROSS_CONSUMERS else []
        ehs_dim = users[0] if users else cad[0]
    enc_dim, enc_type = c["encoder_hid_dim"], c["encoder_hid_dim_type"]
    if enc_dim is not None and enc_type is None:
        enc_type = "text_proj"
    raw_dim = enc_dim if enc_dim is not None else ehs_dim
    time_embed_dim, _ = _time_embed_dims(c)

    # which attentions see `attention_mask` / `encoder_attention_mask`, and can they take it
    attn_mask_ok, enc_mask_ok = True, True
    blocks = [(b, oca[i]) for i, b in enumerate(down)] + [(b, oca[n - 1 - i]) for i, b in enumerate(up)]
    for block, only_cross in blocks:
        if block in ("CrossAttnDownBlock2D", "CrossAttnUpBlock2D") and not only_cross:
            attn_mask_ok = False
        if block in ("SimpleCrossAttnDownBlock2D", "SimpleCrossAttnUpBlock2D") and only_cross:
            attn_mask_ok = enc_mask_ok = False
        if block in ("KCrossAttnDownBlock2D", "KCrossAttnUpBlock2D"):
            attn_mask_ok = False
    if mid == "UNetMidBlock2DCrossAttn":
        attn_mask_ok = False
    if mid == "UNetMidBlock2DSimpleCrossAttn" and mid_oca:
        attn_mask_ok = enc_mask_ok = False

    adapter_max = n
    for i, block in enumerate(down):
        if block in ("SimpleCrossAttnDownBlock2D", "KCrossAttnDownBlock2D"):
            adapter_max = i
            break

    return dict(
        n_blocks=n,
        sample_channels=c["in_channels"] - (4 if c["addition_embed_type"] == "image_hint" else 0),
        out_channels=c["out_channels"],
        ehs_dim=ehs_dim, raw_ehs_dim=raw_dim, encoder_hid_dim_type=enc_type, encoder_hid_dim=enc_dim,
        time_embed_dim=time_embed_dim,
        odd_sizes_ok=all(b in UPSAMPLE_SIZE_AWARE for b in up[:-1]),
        attention_mask_ok=attn_mask_ok, encoder_attention_mask_ok=enc_mask_ok,
        adapter_max=adapter_max,
        k_blocks=any(b in K_DOWN or b in K_UP for b in down + up),
        simple_attention=any(b.startswith("SimpleCrossAttn") for b in down + up)
        or mid == "UNetMidBlock2DSimpleCrossAttn",
        controlnet_ok=down[-1] != "KCrossAttnDownBlock2D",
        runnable=not (c["dual_cross_attention"] or any(b in SKIP_DOWN or b in SKIP_UP for b in down + up)),
    )


def kv_length(cfg: dict, seq_len: int) -> int:
    """Number of cross-attention tokens after diffusers' encoder_hid_proj."""
    enc_type = config_facts(cfg)["encoder_hid_dim_type"]
    if enc_type == "image_proj":
        return IMAGE_PROJ_TOKENS
    if enc_type == "text_image_proj":
        return TEXT_IMAGE_PROJ_TOKENS + seq_len
    return seq_len


def _downsampled(block: str, size: int, padding: int) -> int:
    if block in CONV_DOWNSAMPLERS:
        return (size - 1) // 2 + 1 if padding == 1 else (size - 2) // 2 + 1
    return size // 2  # avg-pool (Resnet/SimpleCrossAttn downsample resnets) and KDownsample2D


def residual_shapes(cfg: dict, batch: int, height: int, width: int) -> dict:
    """Shapes diffusers expects for ControlNet / T2I-Adapter residuals (checked against hooks in tests).

    down: one entry per `down_block_res_samples` element (None where a K block stores None),
    mid: the mid block output, intrablock: per down block, the shape its T2I residual is added to.
    """
    c = _resolved(cfg)
    down = tuple(c["down_block_types"])
    n = len(down)
    channels = tuple(c["block_out_channels"])
    layers = _as_tuple(c["layers_per_block"], n)
    h, w = height, width
    res = [(batch, channels[0], h, w)]
    intrablock = []
    for i, block in enumerate(down):
        final = i == n - 1
        here = (batch, channels[i], h, w)
        k_block = block in K_DOWN
        res += [None if (block == "KCrossAttnDownBlock2D" and final) else here] * layers[i]
        if not final:
            h, w = (_downsampled(block, h, c["downsample_padding"]), _downsampled(block, w, c["downsample_padding"]))
            if not k_block:
                res.append((batch, channels[i], h, w))
        after = (batch, channels[i], h, w)
        intrablock.append(here if block == "CrossAttnDownBlock2D" else after)
    return dict(down=res, mid=(batch, channels[-1], h, w), intrablock=intrablock)


# ---------------------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class InputSpec:
    """Everything needed to rebuild one forward call deterministically (tensors come from `seed`)."""

    batch: int
    height: int
    width: int
    seq_len: int
    seed: int
    timestep: str           # int | float | tensor0d_int | tensor0d_float | tensor1d_int | tensor1d_float | tensor1d_single
    encoder_mask: str | None  # None | float | bool | long
    attention_mask: str | None
    fully_masked_row: bool
    timestep_cond: bool
    time_ids: int           # number of SDXL time ids (text_time)
    class_labels_int: bool  # "timestep" class labels given as int64 (else float)
    gligen_boxes: int       # 0: no GLIGEN kwargs
    lora_scale: float | None
    controlnet: bool
    adapter: int            # number of T2I-Adapter residuals
    adapter_mid: str | None  # None | match | mismatch: one more residual offered to the mid block
    adapter_legacy: bool    # pass adapter residuals via down_block_additional_residuals (deprecated path)
    return_dict: bool


@st.composite
def input_specs(draw, cfg: dict):
    f = config_facts(cfg)
    c = _resolved(cfg)
    n = f["n_blocks"]
    factor = 2 ** (n - 1)
    max_side = 8 if c["addition_embed_type"] == "image_hint" else 12
    if f["odd_sizes_ok"]:
        sides = st.integers(factor, max(factor, max_side))
    elif f["k_blocks"]:
        # KDownsample2D / KUpsample2D reflect-pad by 1, so even the deepest level needs 2 pixels
        sides = st.integers(2, max(2, max_side // factor)).map(lambda k: k * factor)
    else:
        sides = st.integers(1, max(1, max_side // factor)).map(lambda k: k * factor)
    batch = draw(st.integers(1, 3))
    enc_mask = None
    if f["encoder_attention_mask_ok"]:
        enc_mask = draw(st.sampled_from((None, None, "float", "bool", "long")))
    attn_mask = None
    if f["attention_mask_ok"]:
        attn_mask = draw(st.sampled_from((None, "float", "long")))
    time_ids = 0
    if c["addition_embed_type"] == "text_time":
        atd = c["addition_time_embed_dim"]
        time_ids = draw(st.integers(1, (c["projection_class_embeddings_input_dim"] - 1) // atd))
    adapter = draw(st.integers(0, f["adapter_max"]))
    adapter_mid = None
    if adapter == n and c["mid_block_type"] is not None:
        adapter_mid = draw(st.sampled_from((None, "match", "mismatch")))
    controlnet = f["controlnet_ok"] and draw(st.booleans())
    gligen = 0
    if c["attention_type"] != "default":
        gligen = draw(st.integers(0, 3))
    height, width = draw(sides), draw(sides)
    seq_len = draw(st.integers(1, 5))
    if c["cross_attention_norm"] == "group_norm" and batch == 1 and kv_length(cfg, seq_len) == 1:
        seq_len = 2  # group-normalising a single token of width 32 in 32 groups: torch refuses 1 value/group
    if (enc_mask or attn_mask) and f["simple_attention"]:
        # AttnAddedKVProcessor pads the mask by the image-token count only when the mask length differs
        # from it; when kv_len == h * w at some level the mask stays short and diffusers raises.
        shapes = residual_shapes(cfg, batch, height, width)
        tokens = {s[2] * s[3] for s in shapes["down"] + [shapes["mid"]] if s is not None}
        if kv_length(cfg, seq_len) in tokens:
            enc_mask = attn_mask = None
    groups = c["norm_num_groups"]
    if batch == 1 and groups is not None and min(c["block_out_channels"]) == groups:
        # torch's group_norm refuses a group holding a single value (1 channel per group, 1x1 map, batch 1)
        _, _, mh, mw = residual_shapes(cfg, batch, height, width)["mid"]
        assume(mh * mw > 1)
    return InputSpec(
        batch=batch, height=height, width=width, seq_len=seq_len,
        seed=draw(st.integers(0, 2**31 - 1)),
        timestep=draw(st.sampled_from(("int", "float", "tensor0d_int", "tensor0d_float", "tensor1d_int",
                                       "tensor1d_float", "tensor1d_single"))),
        encoder_mask=enc_mask, attention_mask=attn_mask,
        fully_masked_row=(enc_mask is not None or attn_mask is not None) and draw(st.booleans()),
        timestep_cond=c["time_cond_proj_dim"] is not None and draw(st.booleans()),
        time_ids=time_ids, class_labels_int=draw(st.booleans()), gligen_boxes=gligen,
        lora_scale=draw(st.sampled_from((None, None, 0.5, 1.0))),
        controlnet=controlnet, adapter=adapter, adapter_mid=adapter_mid,
        adapter_legacy=adapter > 0 and not controlnet and draw(st.booleans()),
        return_dict=draw(st.booleans()),
    )


def _mask(gen, batch, length, dtype, fully_masked_row):
    keep = torch.rand(batch, length, generator=gen) < 0.6
    keep[:, 0] |= ~keep.any(dim=1)  # at least one kept token per row ...
    if fully_masked_row:
        keep[0] = False             # ... except an explicit fully-masked first row
    return {"float": keep.float(), "bool": keep, "long": keep.long()}[dtype]


def build_inputs(cfg: dict, spec: InputSpec) -> dict:
    """Forward kwargs for `cfg` described by `spec` (fresh tensors every call)."""
    f = config_facts(cfg)
    c = _resolved(cfg)
    gen = torch.Generator().manual_seed(spec.seed)
    randn = lambda *shape: torch.randn(*shape, generator=gen)  # noqa: E731
    b, h, w, seq = spec.batch, spec.height, spec.width, spec.seq_len

    t_int = int(torch.randint(0, 1000, (), generator=gen))
    t_float = float(torch.rand((), generator=gen)) * 1000.0
    timestep = {
        "int": t_int, "float": t_float,
        "tensor0d_int": torch.tensor(t_int), "tensor0d_float": torch.tensor(t_float),
        "tensor1d_int": torch.randint(0, 1000, (b,), generator=gen),
        "tensor1d_float": torch.rand(b, generator=gen) * 1000.0,
        "tensor1d_single": torch.tensor([t_float]),
    }[spec.timestep]
    inputs = dict(sample=randn(b, f["sample_channels"], h, w), timestep=timestep,
                  encoder_hidden_states=randn(b, seq, f["raw_ehs_dim"]))
    kv = kv_length(cfg, seq)
    if spec.encoder_mask:
        inputs["encoder_attention_mask"] = _mask(gen, b, kv, spec.encoder_mask, spec.fully_masked_row)
    if spec.attention_mask:
        inputs["attention_mask"] = _mask(gen, b, kv, spec.attention_mask, spec.fully_masked_row)

    class_type = c["class_embed_type"]
    if class_type is None and c["num_class_embeds"] is not None:
        inputs["class_labels"] = torch.randint(0, c["num_class_embeds"], (b,), generator=gen)
    elif class_type == "timestep":
        inputs["class_labels"] = (torch.randint(0, 1000, (b,), generator=gen) if spec.class_labels_int
                                  else torch.rand(b, generator=gen) * 1000.0)
    elif class_type == "identity":
        inputs["class_labels"] = randn(b, f["time_embed_dim"])
    elif class_type in ("projection", "simple_projection"):
        inputs["class_labels"] = randn(b, c["projection_class_embeddings_input_dim"])
    if spec.timestep_cond:
        inputs["timestep_cond"] = randn(b, c["time_cond_proj_dim"])

    added = {}
    add_type, enc_type = c["addition_embed_type"], f["encoder_hid_dim_type"]
    d = f["ehs_dim"]
    if add_type == "text_time":
        n_text = c["projection_class_embeddings_input_dim"] - spec.time_ids * c["addition_time_embed_dim"]
        added["text_embeds"] = randn(b, n_text)
        added["time_ids"] = torch.randint(0, 1024, (b, spec.time_ids), generator=gen).float()
    elif add_type == "text_image":
        added["text_embeds"] = randn(b, d)
        added["image_embeds"] = randn(b, d)
    elif add_type in ("image", "image_hint"):
        added["image_embeds"] = randn(b, f["encoder_hid_dim"])
        if add_type == "image_hint":
            added["hint"] = randn(b, 3, 8 * h, 8 * w)
    if enc_type == "text_image_proj":
        added["image_embeds"] = randn(b, d)
    elif enc_type == "image_proj":
        added["image_embeds"] = randn(b, f["encoder_hid_dim"])
    if added:
        inputs["added_cond_kwargs"] = added

    cross = {}
    if spec.lora_scale is not None:
        cross["scale"] = spec.lora_scale
    if spec.gligen_boxes:
        nb = spec.gligen_boxes
        boxes = torch.rand(b, nb, 4, generator=gen)
        masks = (torch.rand(b, nb, generator=gen) < 0.7).float()
        if c["attention_type"] == "gated":
            gligen = dict(boxes=boxes, masks=masks, positive_embeddings=randn(b, nb, d))
        else:
            gligen = dict(boxes=boxes, masks=masks,
                          phrases_masks=(torch.rand(b, nb, generator=gen) < 0.7).float(),
                          image_masks=(torch.rand(b, nb, generator=gen) < 0.7).float(),
                          phrases_embeddings=randn(b, nb, d), image_embeddings=randn(b, nb, d))
        cross["gligen"] = gligen
    if cross:
        inputs["cross_attention_kwargs"] = cross

    shapes = residual_shapes(cfg, b, h, w)
    if spec.controlnet:
        inputs["down_block_additional_residuals"] = tuple(randn(*s) for s in shapes["down"])
        inputs["mid_block_additional_residual"] = randn(*shapes["mid"])
    if spec.adapter:
        adapter = [randn(*s) for s in shapes["intrablock"][: spec.adapter]]
        if spec.adapter_mid == "match":
            adapter.append(randn(*shapes["mid"]))
        elif spec.adapter_mid == "mismatch":  # diffusers silently skips a residual whose shape differs
            mb, mc, mh, mw = shapes["mid"]
            adapter.append(randn(mb, mc, mh + 1, mw))
        if spec.adapter_legacy:
            inputs["down_block_additional_residuals"] = adapter
        else:
            inputs["down_intrablock_additional_residuals"] = adapter
    inputs["return_dict"] = spec.return_dict
    return inputs


def unet_inputs(cfg: dict):
    """Forward kwargs dicts for `cfg` (see `input_specs` for what is drawn)."""
    return input_specs(cfg).map(lambda spec: build_inputs(cfg, spec))


def describe_spec(spec: InputSpec) -> str:
    """Only the non-trivial fields of a spec, for error messages."""
    return ", ".join(f"{k}={v!r}" for k, v in dataclasses.asdict(spec).items() if v not in (None, False, 0))
