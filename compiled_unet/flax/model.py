"""`FlaxUNet2DConditionModel`: the JAX/Flax twin of our PyTorch `UNet2DConditionModel`.

A `flax.linen.Module` whose fields are `UNetConfig`'s (same names and defaults) plus the Flax-only
choices (`dtype`, `param_dtype`, `use_memory_efficient_attention`, `split_head_dim`, `gelu_approximate`,
`transformer_norm_eps`: with `gelu_approximate=True` and `transformer_norm_eps=1e-5` the arithmetic is diffusers'
Flax model's, for checkpoints trained with it; the defaults are the PyTorch model's).
The config is validated once at construction by `UNetConfig`; what the Flax port does not cover raises
a ValueError naming the argument. Inside, tensors are channels-last (NHWC); `sample` in and out is NCHW
as in diffusers' Flax model, and ControlNet residuals are NHWC, as diffusers' `FlaxControlNetModel` emits them.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from ..blocks import BlockArgs, shared_block_args
from ..config import UNetConfig, _strip_unet_res
from .blocks import SUPPORTED_DOWN, SUPPORTED_MID, SUPPORTED_UP, Ctx, DownBlock, MidBlock, Options, UpBlock
from .embeddings import (Embed, GaussianFourierProjection, ImageHintTimeEmbedding, ImageProjection,
                         ImageTimeEmbedding, TextImageProjection, TextImageTimeEmbedding, TextTimeEmbedding,
                         TimestepEmbedding, timestep_embedding)
from .layers import GroupNorm, activation, conv, dense

CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(UNetConfig))
FLAX_FIELDS = ("dtype", "param_dtype", "use_memory_efficient_attention", "split_head_dim", "gelu_approximate",
               "transformer_norm_eps")


@flax.struct.dataclass
class FlaxUNet2DConditionOutput:
    """The UNet's output; `sample`: [B, out_channels, H, W]. A pytree; `.replace(sample=...)` gives a copy."""

    sample: jnp.ndarray

    def __getitem__(self, key):
        return self.sample if key in (0, "sample") else (self.sample,)[key]

    def to_tuple(self) -> tuple:
        return (self.sample,)


def unsupported(config: UNetConfig) -> list:
    """(argument, value) pairs this Flax port does not implement; empty when the config is fully supported."""
    c = config
    bad = []
    for name, types, ok in (("down_block_types", c.down_block_types, SUPPORTED_DOWN),
                            ("up_block_types", c.up_block_types, SUPPORTED_UP)):
        bad += [(name, t) for t in types if _strip_unet_res(t) not in ok]
    if c.mid_block_type not in SUPPORTED_MID:
        bad.append(("mid_block_type", c.mid_block_type))
    if c.dual_cross_attention:
        bad.append(("dual_cross_attention", True))
    if c.attention_type != "default":
        bad.append(("attention_type", c.attention_type))
    return bad


def check_supported(config: UNetConfig) -> None:
    bad = unsupported(config)
    if bad:
        what = "; ".join(f"`{k}`={v!r}" for k, v in bad)
        raise ValueError(f"{what}: not supported by compiled_unet.flax yet (the PyTorch UNet2DConditionModel "
                         f"supports it)")


def _keep_mask_to_bias(mask, dtype):
    """Keep mask [B, L] or [B, 1, L] of 1 (keep) / 0 (drop) -> additive bias [B, 1, L] (PyTorch model's)."""
    return ((1 - mask.reshape(mask.shape[0], -1).astype(dtype)) * -10000.0)[:, None, :]


def _nhwc(x):
    return jnp.transpose(x, (0, 2, 3, 1))


class _UNet:
    """Methods of FlaxUNet2DConditionModel (its fields are generated from UNetConfig below)."""

    def __post_init__(self):
        self.config  # validates: UNetConfig errors name the argument
        check_supported(self.config)
        nn.Module.__post_init__(self)

    @property
    def config(self) -> UNetConfig:
        return UNetConfig(**{k: getattr(self, k) for k in CONFIG_FIELDS})

    # -- construction helpers -------------------------------------------------------------------------
    @classmethod
    def from_config(cls, config, **kwargs):
        """Build from a diffusers config dict (private `_` keys ignored; unknown keys: TypeError naming
        them) or a `UNetConfig`; `kwargs` may carry config overrides and the Flax fields (dtype, ...)."""
        if isinstance(config, UNetConfig):
            config = config.to_dict()
        flax_kw = {k: kwargs.pop(k) for k in FLAX_FIELDS if k in kwargs}
        c = UNetConfig.from_dict(config, **kwargs)
        return cls(**{k: getattr(c, k) for k in CONFIG_FIELDS}, **flax_kw)

    def _opts(self) -> Options:
        return Options(self.dtype, self.param_dtype, self.use_memory_efficient_attention, self.split_head_dim,
                       self.gelu_approximate, self.transformer_norm_eps)

    def dummy_inputs(self, batch: int = 1, height: int = 8, width: int = 8, seq: int = 1) -> dict:
        """Smallest valid inputs for this config (used by init_weights)."""
        c = self.config
        n_down = 2 ** (len(c.down_block_types) - 1)
        height, width = max(height, n_down), max(width, n_down)
        in_ch = c.in_channels - (4 if c.addition_embed_type == "image_hint" else 0)
        ehs_dim = c.encoder_hid_dim if c.encoder_hid_dim_type is not None else _first(c.cross_attention_dim)
        if c.addition_embed_type == "text" and c.encoder_hid_dim is not None:
            ehs_dim = c.encoder_hid_dim
        kw: dict[str, Any] = dict(sample=jnp.zeros((batch, in_ch, height, width), jnp.float32),
                                  timesteps=jnp.ones((batch,), jnp.int32),
                                  encoder_hidden_states=jnp.zeros((batch, seq, ehs_dim), jnp.float32))
        added = {}
        p = c.plan()
        if c.addition_embed_type == "text_time":
            n_time = 6
            text_dim = c.projection_class_embeddings_input_dim - n_time * c.addition_time_embed_dim
            if text_dim <= 0:
                n_time, text_dim = 1, c.projection_class_embeddings_input_dim - c.addition_time_embed_dim
            added.update(text_embeds=jnp.zeros((batch, text_dim)), time_ids=jnp.zeros((batch, n_time)))
        if c.addition_embed_type in ("text_image", "image", "image_hint") or c.encoder_hid_dim_type in (
                "text_image_proj", "image_proj"):
            dim = c.encoder_hid_dim if c.addition_embed_type in ("image", "image_hint") or \
                c.encoder_hid_dim_type == "image_proj" else _first(c.cross_attention_dim)
            added["image_embeds"] = jnp.zeros((batch, dim))
        if c.addition_embed_type == "image_hint":
            added["hint"] = jnp.zeros((batch, 3, height * 8, width * 8))
        if added:
            kw["added_cond_kwargs"] = added
        if c.class_embed_type is not None or c.num_class_embeds is not None:
            if c.class_embed_type in ("projection", "simple_projection"):
                kw["class_labels"] = jnp.zeros((batch, c.projection_class_embeddings_input_dim))
            elif c.class_embed_type == "identity":
                kw["class_labels"] = jnp.zeros((batch, p.time_embed_dim))
            else:
                kw["class_labels"] = jnp.zeros((batch,), jnp.int32)
        if c.time_cond_proj_dim is not None:
            kw["timestep_cond"] = jnp.zeros((batch, c.time_cond_proj_dim))
        return kw

    def init_weights(self, rng) -> dict:
        """Random parameters: the tree from `jax.eval_shape` (no compute), values from ONE jitted draw.

        Compiling the modules' own initializers takes minutes on CPU (one threefry kernel per parameter);
        here one normal draw is sliced: kernels N(0, 1/fan_in) (LeCun, as flax's default, untruncated),
        biases 0, norm scales 1, other parameters (embeddings, Fourier weights) N(0, 1),
        `positional_embedding` N(0, 1/width). For real weights use `from_pretrained` or `convert`.
        """
        shapes = self.param_shapes()
        leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
        return _init_from_one_draw(tuple((tuple(k.key for k in path), s.shape, s.dtype) for path, s in leaves),
                                   treedef, rng)

    def param_shapes(self) -> dict:
        """The parameter tree as `jax.ShapeDtypeStruct`s, without computing anything."""
        inputs = self.dummy_inputs()
        return jax.eval_shape(lambda k: self.init({"params": k, "dropout": k}, **inputs)["params"],
                              jax.random.PRNGKey(0))

    # -- checkpoints (io.py) ----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, dtype=jnp.float32, *, from_pt: bool = False,
                        allow_pickle: bool = False, variant: Optional[str] = None, subfolder: Optional[str] = None,
                        **kwargs):
        """(model, params) from a local folder: diffusers' Flax layout, or with `from_pt=True` a PyTorch one."""
        from . import io
        return io.from_pretrained(cls, pretrained_model_name_or_path, dtype=dtype, from_pt=from_pt,
                                  allow_pickle=allow_pickle, variant=variant, subfolder=subfolder, **kwargs)

    def save_pretrained(self, save_directory, params, format: str = "flax", **kwargs) -> None:
        """Write config.json + weights: "flax" (diffusion_flax_model.msgpack) or "pt" (safetensors)."""
        from . import io
        io.save_pretrained(self, save_directory, params, format=format, **kwargs)

    # -- forward ----------------------------------------------------------------------------------------
    def _time_embedding(self, sample, timesteps, timestep_cond, class_labels, encoder_hidden_states,
                        added_cond_kwargs, o: Options):
        c, p = self.config, self.config.plan()
        b = sample.shape[0]
        timesteps = jnp.asarray(timesteps)
        if timesteps.ndim == 0:
            timesteps = timesteps[None]
        timesteps = jnp.broadcast_to(timesteps, (b,))
        if c.time_embedding_type == "fourier":
            time_proj = GaussianFourierProjection(p.time_embed_dim // 2, c.flip_sin_to_cos, o.param_dtype,
                                                  name="time_proj")
        else:
            time_proj = lambda t: timestep_embedding(t, c.block_out_channels[0], c.flip_sin_to_cos,  # noqa: E731
                                                     c.freq_shift)
        t_emb = time_proj(timesteps).astype(self.dtype)
        emb = TimestepEmbedding(p.time_embed_dim, c.act_fn, post_act_fn=c.timestep_post_act,
                                cond_proj_dim=c.time_cond_proj_dim, name="time_embedding", **o.kw)(t_emb, timestep_cond)
        class_emb = self._class_embedding(class_labels, time_proj, o)
        if class_emb is not None:
            emb = jnp.concatenate([emb, class_emb], axis=-1) if c.class_embeddings_concat else emb + class_emb
        aug, hint = self._aug_embedding(emb, encoder_hidden_states, added_cond_kwargs or {}, o)
        if aug is not None:
            emb = emb + aug
        if c.time_embedding_act_fn is not None:
            emb = activation(c.time_embedding_act_fn)(emb)
        return emb, hint

    def _class_embedding(self, class_labels, time_proj, o: Options):
        c, p = self.config, self.config.plan()
        t = c.class_embed_type
        if t is None and c.num_class_embeds is None:
            return None
        if class_labels is None:
            raise ValueError("class_labels should be provided when doing class conditioning "
                             f"(class_embed_type={t!r}, num_class_embeds={c.num_class_embeds})")
        if t is None:
            out = Embed(c.num_class_embeds, p.time_embed_dim, o.param_dtype, name="class_embedding")(class_labels)
        elif t == "timestep":
            labels = time_proj(jnp.asarray(class_labels)).astype(self.dtype)
            out = TimestepEmbedding(p.time_embed_dim, c.act_fn, name="class_embedding", **o.kw)(labels)
        elif t == "identity":
            out = class_labels
        elif t == "projection":
            out = TimestepEmbedding(p.time_embed_dim, name="class_embedding", **o.kw)(class_labels)
        else:  # simple_projection
            out = dense(p.time_embed_dim, "class_embedding", **o.kw)(class_labels)
        return out.astype(self.dtype)

    def _aug_embedding(self, emb, ehs, added: dict, o: Options):
        c, p = self.config, self.config.plan()
        t = c.addition_embed_type

        def need(*keys):
            missing = [k for k in keys if added.get(k) is None]
            if missing:
                raise ValueError(f"addition_embed_type={t!r} requires {missing} in `added_cond_kwargs`")
            return [added[k] for k in keys]

        if t == "text":
            dim = c.encoder_hid_dim if c.encoder_hid_dim is not None else c.cross_attention_dim
            return TextTimeEmbedding(dim, p.time_embed_dim, c.addition_embed_type_num_heads, name="add_embedding",
                                     **o.kw)(ehs), None
        if t == "text_image":
            (image_embeds,) = need("image_embeds")
            text = added.get("text_embeds", ehs)
            return TextImageTimeEmbedding(p.time_embed_dim, name="add_embedding", **o.kw)(text, image_embeds), None
        if t == "text_time":
            text_embeds, time_ids = need("text_embeds", "time_ids")
            time_embeds = timestep_embedding(jnp.ravel(time_ids), c.addition_time_embed_dim, c.flip_sin_to_cos,
                                             c.freq_shift)
            time_embeds = time_embeds.reshape(text_embeds.shape[0], -1)
            add = jnp.concatenate([text_embeds, time_embeds], axis=-1).astype(emb.dtype)
            return TimestepEmbedding(p.time_embed_dim, name="add_embedding", **o.kw)(add), None
        if t == "image":
            (image_embeds,) = need("image_embeds")
            return ImageTimeEmbedding(p.time_embed_dim, name="add_embedding", **o.kw)(image_embeds), None
        if t == "image_hint":
            image_embeds, hint = need("image_embeds", "hint")
            return ImageHintTimeEmbedding(p.time_embed_dim, name="add_embedding", **o.kw)(image_embeds, _nhwc(hint))
        return None, None

    def _encoder_hidden_states(self, ehs, added: dict, o: Options):
        c = self.config
        t = c.encoder_hid_dim_type
        if t == "text_proj":
            return dense(_first(c.cross_attention_dim), "encoder_hid_proj", **o.kw)(ehs)
        if t in ("text_image_proj", "image_proj") and added.get("image_embeds") is None:
            raise ValueError(f"encoder_hid_dim_type={t!r} requires 'image_embeds' in `added_cond_kwargs`")
        if t == "text_image_proj":
            return TextImageProjection(c.cross_attention_dim, name="encoder_hid_proj", **o.kw)(
                ehs, added["image_embeds"])
        if t == "image_proj":
            return ImageProjection(c.cross_attention_dim, name="encoder_hid_proj", **o.kw)(added["image_embeds"])
        return ehs

    def _block_args(self):
        """BlockArgs per down block, the mid block and per up block: what our PyTorch UNet derives."""
        c, p = self.config, self.config.plan()
        n = len(c.down_block_types)
        common = shared_block_args(c, p)
        down, out_ch = [], c.block_out_channels[0]
        for i in range(n):
            in_ch, out_ch = out_ch, c.block_out_channels[i]
            down.append(BlockArgs(
                num_layers=p.layers_per_block[i], in_channels=in_ch, out_channels=out_ch, add_sample=i != n - 1,
                transformer_layers_per_block=p.transformer_layers_per_block[i],
                num_attention_heads=p.num_attention_heads[i], cross_attention_dim=p.cross_attention_dim[i],
                attention_head_dim=p.attention_head_dim[i] if p.attention_head_dim[i] is not None else out_ch,
                only_cross_attention=p.only_cross_attention[i], **common))
        mid = BlockArgs(
            num_layers=1, in_channels=c.block_out_channels[-1], out_channels=c.block_out_channels[-1],
            output_scale_factor=c.mid_block_scale_factor,
            transformer_layers_per_block=p.transformer_layers_per_block[-1],
            num_attention_heads=p.num_attention_heads[-1], cross_attention_dim=p.cross_attention_dim[-1],
            attention_head_dim=p.attention_head_dim[-1], only_cross_attention=p.mid_block_only_cross_attention,
            **common)
        up, rev = [], list(reversed(c.block_out_channels))
        out_ch = rev[0]
        for i in range(n):
            prev, out_ch = out_ch, rev[i]
            up.append(BlockArgs(
                num_layers=list(reversed(p.layers_per_block))[i] + 1, in_channels=rev[min(i + 1, n - 1)],
                out_channels=out_ch, prev_output_channel=prev, add_sample=i != n - 1, resolution_idx=i,
                transformer_layers_per_block=p.reverse_transformer_layers_per_block[i],
                num_attention_heads=list(reversed(p.num_attention_heads))[i],
                cross_attention_dim=list(reversed(p.cross_attention_dim))[i],
                # diffusers indexes the *unreversed* attention_head_dim here (as our PyTorch model does).
                attention_head_dim=p.attention_head_dim[i] if p.attention_head_dim[i] is not None else out_ch,
                only_cross_attention=list(reversed(p.only_cross_attention))[i], **common))
        return down, mid, up

    @nn.compact
    def __call__(self, sample, timesteps, encoder_hidden_states=None, added_cond_kwargs=None,
                 down_block_additional_residuals=None, mid_block_additional_residual=None, return_dict: bool = True,
                 train: bool = False, class_labels=None, timestep_cond=None, attention_mask=None,
                 encoder_attention_mask=None, down_intrablock_additional_residuals=None):
        """sample [B, C, H, W]; timesteps scalar, [1] or [B]; encoder_hidden_states [B, L, D];
        ControlNet residuals NHWC (as diffusers' FlaxControlNetModel returns them); masks 1 keep / 0 drop."""
        c, o = self.config, self._opts()
        det = not train
        added = dict(added_cond_kwargs or {})
        dtype = self.dtype
        sample = jnp.asarray(sample).astype(dtype)
        if attention_mask is not None:
            attention_mask = _keep_mask_to_bias(attention_mask, dtype)
        if encoder_attention_mask is not None:
            encoder_attention_mask = _keep_mask_to_bias(encoder_attention_mask, dtype)
        if encoder_hidden_states is not None:
            encoder_hidden_states = jnp.asarray(encoder_hidden_states).astype(dtype)
        if c.center_input_sample:
            sample = 2 * sample - 1.0
        emb, hint = self._time_embedding(sample, timesteps, timestep_cond, class_labels, encoder_hidden_states,
                                         added, o)
        x = _nhwc(sample)
        if hint is not None:
            x = jnp.concatenate([x, hint.astype(dtype)], axis=-1)
        ehs = self._encoder_hidden_states(encoder_hidden_states, added, o)
        ctx = Ctx(ehs, attention_mask, encoder_attention_mask)

        x = conv(c.block_out_channels[0], c.conv_in_kernel, "conv_in", padding=(c.conv_in_kernel - 1) // 2, **o.kw)(x)
        down_args, mid_args, up_args = self._block_args()
        is_controlnet = mid_block_additional_residual is not None and down_block_additional_residuals is not None
        intrablock = list(down_intrablock_additional_residuals or ())
        if not intrablock and mid_block_additional_residual is None and down_block_additional_residuals is not None:
            intrablock = list(down_block_additional_residuals)  # diffusers' deprecated T2I-Adapter path

        res = (x,)
        for i, kind in enumerate(c.down_block_types):
            kind = _strip_unet_res(kind)
            block = DownBlock(kind, down_args[i], o, name=f"down_blocks_{i}")
            cross = kind in ("CrossAttnDownBlock2D", "SimpleCrossAttnDownBlock2D")
            residual = intrablock.pop(0) if (cross and intrablock) else None
            x, outs = block(x, emb, ctx, residual, det)
            if not cross and intrablock:
                aliased = outs and outs[-1] is x
                x = x + intrablock.pop(0)
                if aliased:
                    outs = outs[:-1] + (x,)
            res += outs

        if is_controlnet:
            _check_residuals(res, down_block_additional_residuals, x, mid_block_additional_residual)
            res = tuple(r + a for r, a in zip(res, down_block_additional_residuals))
        if c.mid_block_type is not None:
            x = MidBlock(c.mid_block_type, mid_args, o, name="mid_block")(x, emb, ctx, det)
            if intrablock and x.shape == intrablock[0].shape:
                x = x + intrablock.pop(0)
        if is_controlnet:
            x = x + mid_block_additional_residual

        factor = 2 ** (len(c.down_block_types) - 1)
        forward_upsample_size = any(s % factor for s in x.shape[1:3]) or any(s % factor for s in res[0].shape[1:3])
        upsample_size = None
        for i, kind in enumerate(c.up_block_types):
            n_res = up_args[i].num_layers
            block_res, res = res[-n_res:], res[:-n_res]
            if i != len(c.up_block_types) - 1 and forward_upsample_size:
                upsample_size = res[-1].shape[1:3]
            x = UpBlock(_strip_unet_res(kind), up_args[i], o, name=f"up_blocks_{i}")(
                x, block_res, emb, ctx, upsample_size, det)

        if c.norm_num_groups is not None:
            x = activation(c.act_fn)(GroupNorm(c.norm_num_groups, c.norm_eps, name="conv_norm_out", **o.kw)(x))
        x = conv(c.out_channels, c.conv_out_kernel, "conv_out", padding=(c.conv_out_kernel - 1) // 2, **o.kw)(x)
        out = jnp.transpose(x, (0, 3, 1, 2))
        if not return_dict:
            return (out,)
        return FlaxUNet2DConditionOutput(sample=out)


def _init_from_one_draw(leaves: tuple, treedef, rng):
    sizes = [int(np.prod(shape)) for _, shape, _ in leaves]

    @jax.jit
    def init(key):
        flat = jax.random.normal(key, (max(1, sum(sizes)),), jnp.float32)
        out, offset = [], 0
        for (path, shape, dtype), size in zip(leaves, sizes):
            name = path[-1]
            if name == "bias":
                out.append(jnp.zeros(shape, dtype))
                continue
            if name == "scale":
                out.append(jnp.ones(shape, dtype))
                continue
            x = flat[offset: offset + size].reshape(shape)
            offset += size
            if name == "kernel":
                x = x * (1.0 / np.sqrt(max(1, int(np.prod(shape[:-1])))))
            elif name == "positional_embedding":
                x = x * (1.0 / np.sqrt(shape[-1]))
            out.append(x.astype(dtype))
        return jax.tree_util.tree_unflatten(treedef, out)

    return init(rng)


def _first(value):
    return value if isinstance(value, int) or value is None else value[0]


def _check_residuals(res, down_residuals, x, mid_residual) -> None:
    if len(down_residuals) != len(res):
        raise ValueError(f"down_block_additional_residuals has {len(down_residuals)} tensors; this UNet has "
                         f"{len(res)} down-block outputs")
    for i, (r, a) in enumerate(zip(res, down_residuals)):
        if tuple(a.shape) != tuple(r.shape):
            raise ValueError(f"down_block_additional_residuals[{i}] has shape {tuple(a.shape)}; expected "
                             f"{tuple(r.shape)} (NHWC, as diffusers' FlaxControlNetModel returns them)")
    if tuple(mid_residual.shape) != tuple(x.shape):
        raise ValueError(f"mid_block_additional_residual has shape {tuple(mid_residual.shape)}; expected "
                         f"{tuple(x.shape)} (NHWC)")


def _make_class():
    annotations, defaults = {}, {}
    for f in dataclasses.fields(UNetConfig):
        annotations[f.name] = Any
        defaults[f.name] = f.default
    for name, default in (("dtype", jnp.float32), ("param_dtype", jnp.float32),
                          ("use_memory_efficient_attention", False), ("split_head_dim", False),
                          ("gelu_approximate", False), ("transformer_norm_eps", 1e-6)):
        annotations[name] = Any
        defaults[name] = default
    namespace = {k: v for k, v in vars(_UNet).items() if k not in ("__dict__", "__weakref__")}
    namespace.update(defaults)
    namespace["__annotations__"] = annotations
    namespace["__module__"] = __name__
    namespace["__qualname__"] = "FlaxUNet2DConditionModel"
    namespace["__doc__"] = __doc__
    return type("FlaxUNet2DConditionModel", (nn.Module,), namespace)


FlaxUNet2DConditionModel = _make_class()
