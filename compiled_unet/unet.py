"""`UNet2DConditionModel`: diffusers' conditional UNet, written to export as one static graph.

Same constructor arguments, forward arguments, state_dict keys and numerics as diffusers'. Nothing in
`forward` branches on tensor values or syncs with the host: what varies with input shapes resolves
while tracing, so `torch.export` captures one graph for every configuration and optional input.
"""
from __future__ import annotations

import inspect
import numbers
from dataclasses import dataclass
from typing import Any, Optional, Union

import torch
from torch import nn

from . import checks
from .attention import Attention
from .blocks import DOWN_BLOCKS, MID_BLOCKS, UP_BLOCKS, BlockArgs, Conditioning, shared_block_args
from .config import UNetConfig, _strip_unet_res
from .embeddings import (GaussianFourierProjection, GLIGENTextBoundingboxProjection, ImageHintTimeEmbedding,
                         ImageProjection, ImageTimeEmbedding, TextImageProjection, TextImageTimeEmbedding,
                         TextTimeEmbedding, TimestepEmbedding, Timesteps)
from .layers import get_activation


@dataclass
class UNet2DConditionOutput:
    """The UNet's output; `sample`: [B, out_channels, H, W]."""

    sample: torch.Tensor = None

    def __getitem__(self, key):
        # diffusers' BaseOutput: out[0] and out["sample"] both work.
        return self.sample if key in (0, "sample") else (self.sample,)[key]

    def to_tuple(self) -> tuple:
        return (self.sample,)


class UNet2DConditionModel(nn.Module):
    """A conditional 2D UNet (Stable Diffusion family). Arguments: see diffusers' class of the same name."""

    config_class = UNetConfig

    def __init__(self, *args, **kwargs):
        super().__init__()
        c = _config_from_arguments(args, kwargs)
        self.config = c
        p = c.plan()
        self.sample_size = c.sample_size
        n = len(c.down_block_types)

        self.conv_in = nn.Conv2d(c.in_channels, c.block_out_channels[0], c.conv_in_kernel,
                                 padding=(c.conv_in_kernel - 1) // 2)
        if c.time_embedding_type == "fourier":
            self.time_proj = GaussianFourierProjection(p.time_embed_dim // 2, log=False, flip_sin_to_cos=c.flip_sin_to_cos)
        else:
            self.time_proj = Timesteps(c.block_out_channels[0], c.flip_sin_to_cos, c.freq_shift)
        self.time_embedding = TimestepEmbedding(p.timestep_input_dim, p.time_embed_dim, act_fn=c.act_fn,
                                                post_act_fn=c.timestep_post_act, cond_proj_dim=c.time_cond_proj_dim)
        self.encoder_hid_proj = _encoder_hid_proj(c)
        self.class_embedding = _class_embedding(c, p)
        self._add_embedding(c, p)
        self.time_embed_act = get_activation(c.time_embedding_act_fn) if c.time_embedding_act_fn else None

        common = shared_block_args(c, p)
        self.down_blocks = nn.ModuleList()
        self.up_blocks = nn.ModuleList()  # registered before mid_block: diffusers' state_dict key order
        output_channel = c.block_out_channels[0]
        for i, block_type in enumerate(c.down_block_types):
            input_channel, output_channel = output_channel, c.block_out_channels[i]
            args = BlockArgs(
                num_layers=p.layers_per_block[i], in_channels=input_channel, out_channels=output_channel,
                add_sample=i != n - 1, transformer_layers_per_block=p.transformer_layers_per_block[i],
                num_attention_heads=p.num_attention_heads[i], cross_attention_dim=p.cross_attention_dim[i],
                attention_head_dim=p.attention_head_dim[i] if p.attention_head_dim[i] is not None else output_channel,
                only_cross_attention=p.only_cross_attention[i], **common)
            self.down_blocks.append(DOWN_BLOCKS[_strip_unet_res(block_type)](args))

        self.mid_block = None
        if c.mid_block_type is not None:
            args = BlockArgs(
                num_layers=1, in_channels=c.block_out_channels[-1], out_channels=c.block_out_channels[-1],
                output_scale_factor=c.mid_block_scale_factor,
                transformer_layers_per_block=p.transformer_layers_per_block[-1],
                num_attention_heads=p.num_attention_heads[-1], cross_attention_dim=p.cross_attention_dim[-1],
                attention_head_dim=p.attention_head_dim[-1], only_cross_attention=p.mid_block_only_cross_attention,
                **common)
            self.mid_block = MID_BLOCKS[c.mid_block_type](args)

        self.num_upsamplers = 0
        reversed_channels = list(reversed(c.block_out_channels))
        output_channel = reversed_channels[0]
        for i, block_type in enumerate(c.up_block_types):
            is_final = i == n - 1
            prev_output_channel, output_channel = output_channel, reversed_channels[i]
            self.num_upsamplers += 0 if is_final else 1
            head_dim = list(reversed(p.attention_head_dim))[i]
            args = BlockArgs(
                num_layers=list(reversed(p.layers_per_block))[i] + 1,
                in_channels=reversed_channels[min(i + 1, n - 1)], out_channels=output_channel,
                prev_output_channel=prev_output_channel, add_sample=not is_final, resolution_idx=i,
                transformer_layers_per_block=p.reverse_transformer_layers_per_block[i],
                num_attention_heads=list(reversed(p.num_attention_heads))[i],
                cross_attention_dim=list(reversed(p.cross_attention_dim))[i],
                # diffusers indexes the *unreversed* attention_head_dim here; kept for identical shapes.
                attention_head_dim=p.attention_head_dim[i] if p.attention_head_dim[i] is not None else output_channel,
                only_cross_attention=list(reversed(p.only_cross_attention))[i], **common)
            del head_dim
            self.up_blocks.append(UP_BLOCKS[_strip_unet_res(block_type)](args))

        if c.norm_num_groups is not None:
            self.conv_norm_out = nn.GroupNorm(c.norm_num_groups, c.block_out_channels[0], eps=c.norm_eps)
            self.conv_act = get_activation(c.act_fn)
        else:
            self.conv_norm_out = self.conv_act = None
        self.conv_out = nn.Conv2d(c.block_out_channels[0], c.out_channels, c.conv_out_kernel,
                                  padding=(c.conv_out_kernel - 1) // 2)
        if c.attention_type in ("gated", "gated-text-image"):
            positive_len = p.cross_attention_dim[0] if not isinstance(c.cross_attention_dim, int) else c.cross_attention_dim
            self.position_net = GLIGENTextBoundingboxProjection(
                positive_len=positive_len, out_dim=c.cross_attention_dim,
                feature_type="text-only" if c.attention_type == "gated" else "text-image")

    # -- construction helpers ----------------------------------------------------------------------
    def _add_embedding(self, c: UNetConfig, p) -> None:
        t = c.addition_embed_type
        if t == "text":
            dim = c.encoder_hid_dim if c.encoder_hid_dim is not None else c.cross_attention_dim
            self.add_embedding = TextTimeEmbedding(dim, p.time_embed_dim, num_heads=c.addition_embed_type_num_heads)
        elif t == "text_image":
            self.add_embedding = TextImageTimeEmbedding(c.cross_attention_dim, c.cross_attention_dim, p.time_embed_dim)
        elif t == "text_time":
            self.add_time_proj = Timesteps(c.addition_time_embed_dim, c.flip_sin_to_cos, c.freq_shift)
            self.add_embedding = TimestepEmbedding(c.projection_class_embeddings_input_dim, p.time_embed_dim)
        elif t == "image":
            self.add_embedding = ImageTimeEmbedding(c.encoder_hid_dim, p.time_embed_dim)
        elif t == "image_hint":
            self.add_embedding = ImageHintTimeEmbedding(c.encoder_hid_dim, p.time_embed_dim)

    @classmethod
    def from_config(cls, config: Union[dict, UNetConfig], **overrides) -> "UNet2DConditionModel":
        """Build from a diffusers config dict (private `_` keys ignored) or a `UNetConfig`."""
        if isinstance(config, UNetConfig):
            config = config.to_dict()
        return cls(**UNetConfig.from_dict(config, **overrides).to_dict())

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # -- forward pieces ----------------------------------------------------------------------------
    def get_time_embed(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        if not torch.is_tensor(timestep):
            # float64 for non-integral numbers (diffusers: for `float`, so np.float32 fails there), else int64.
            dtype = torch.int64 if isinstance(timestep, numbers.Integral) else torch.float64
            if sample.device.type == "mps":  # diffusers' maybe_adjust_dtype_for_device
                dtype = torch.float32 if dtype == torch.float64 else torch.int32
            timestep = torch.tensor([timestep], dtype=dtype, device=sample.device)
        elif timestep.ndim == 0:
            timestep = timestep[None].to(sample.device)
        timesteps = timestep.expand(sample.shape[0])
        return self.time_proj(timesteps).to(dtype=sample.dtype)

    def get_class_embed(self, sample: torch.Tensor, class_labels: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        if self.class_embedding is None:
            return None
        if self.config.class_embed_type == "timestep":
            class_labels = self.time_proj(class_labels).to(dtype=sample.dtype)
        return self.class_embedding(class_labels).to(dtype=sample.dtype)

    def get_aug_embed(self, emb, encoder_hidden_states, added_cond_kwargs: dict):
        t = self.config.addition_embed_type
        if t == "text":
            return self.add_embedding(encoder_hidden_states)
        if t == "text_image":
            text_embs = added_cond_kwargs.get("text_embeds", encoder_hidden_states)
            return self.add_embedding(text_embs, added_cond_kwargs["image_embeds"])
        if t == "text_time":
            text_embeds = added_cond_kwargs["text_embeds"]
            time_embeds = self.add_time_proj(added_cond_kwargs["time_ids"].flatten())
            time_embeds = time_embeds.reshape((text_embeds.shape[0], -1))
            return self.add_embedding(torch.concat([text_embeds, time_embeds], dim=-1).to(emb.dtype))
        if t == "image":
            return self.add_embedding(added_cond_kwargs["image_embeds"])
        if t == "image_hint":
            return self.add_embedding(added_cond_kwargs["image_embeds"], added_cond_kwargs["hint"])
        return None

    def process_encoder_hidden_states(self, encoder_hidden_states, added_cond_kwargs: dict):
        t = self.config.encoder_hid_dim_type
        if t == "text_proj":
            return self.encoder_hid_proj(encoder_hidden_states)
        if t == "text_image_proj":
            return self.encoder_hid_proj(encoder_hidden_states, added_cond_kwargs["image_embeds"])
        if t == "image_proj":
            return self.encoder_hid_proj(added_cond_kwargs["image_embeds"])
        return encoder_hidden_states

    def forward(
        self,
        sample: torch.Tensor,
        timestep: Union[torch.Tensor, float, int],
        encoder_hidden_states: Optional[torch.Tensor] = None,
        class_labels: Optional[torch.Tensor] = None,
        timestep_cond: Optional[torch.Tensor] = None,
        attention_mask: Optional[torch.Tensor] = None,
        cross_attention_kwargs: Optional[dict[str, Any]] = None,
        added_cond_kwargs: Optional[dict[str, torch.Tensor]] = None,
        down_block_additional_residuals: Optional[tuple] = None,
        mid_block_additional_residual: Optional[torch.Tensor] = None,
        down_intrablock_additional_residuals: Optional[tuple] = None,
        encoder_attention_mask: Optional[torch.Tensor] = None,
        return_dict: bool = True,
    ) -> Union[UNet2DConditionOutput, tuple]:
        added_cond_kwargs = added_cond_kwargs or {}
        checks.check_forward_inputs(self, sample, timestep, encoder_hidden_states, class_labels, timestep_cond,
                                    attention_mask, added_cond_kwargs, down_block_additional_residuals,
                                    mid_block_additional_residual, down_intrablock_additional_residuals,
                                    encoder_attention_mask)
        c = self.config
        # Masks: 1 keep / 0 drop -> additive bias [B, 1, L].
        if attention_mask is not None:
            attention_mask = _keep_mask_to_bias(attention_mask, sample.dtype)
        if encoder_attention_mask is not None:
            encoder_attention_mask = _keep_mask_to_bias(encoder_attention_mask, sample.dtype)
        if c.center_input_sample:
            sample = 2 * sample - 1.0

        emb = self.time_embedding(self.get_time_embed(sample, timestep), timestep_cond)
        class_emb = self.get_class_embed(sample, class_labels)
        if class_emb is not None:
            emb = torch.cat([emb, class_emb], dim=-1) if c.class_embeddings_concat else emb + class_emb
        aug_emb = self.get_aug_embed(emb, encoder_hidden_states, added_cond_kwargs)
        if c.addition_embed_type == "image_hint":
            aug_emb, hint = aug_emb
            sample = torch.cat([sample, hint], dim=1)
        if aug_emb is not None:
            emb = emb + aug_emb
        if self.time_embed_act is not None:
            emb = self.time_embed_act(emb)
        encoder_hidden_states = self.process_encoder_hidden_states(encoder_hidden_states, added_cond_kwargs)

        skip_sample = sample  # score-SDE skip blocks downsample the input image alongside
        sample = self.conv_in(sample)

        if cross_attention_kwargs is not None and cross_attention_kwargs.get("gligen") is not None:
            cross_attention_kwargs = dict(cross_attention_kwargs)
            cross_attention_kwargs["gligen"] = {"objs": self.position_net(**cross_attention_kwargs["gligen"])}
        ctx = Conditioning(encoder_hidden_states, attention_mask, encoder_attention_mask, cross_attention_kwargs)

        is_controlnet = mid_block_additional_residual is not None and down_block_additional_residuals is not None
        intrablock = list(down_intrablock_additional_residuals or ())
        if not intrablock and mid_block_additional_residual is None and down_block_additional_residuals is not None:
            # diffusers' deprecated T2I-Adapter path: down residuals without a mid residual.
            intrablock = list(down_block_additional_residuals)

        down_block_res_samples = (sample,)
        for block in self.down_blocks:
            if hasattr(block, "skip_conv"):
                sample, res_samples, skip_sample = block(sample, emb, skip_sample)
            elif block.has_cross_attention:
                residual = intrablock.pop(0) if intrablock else None
                sample, res_samples = block(sample, emb, ctx, additional_residuals=residual)
            else:
                sample, res_samples = block(sample, emb)
            if not block.has_cross_attention and intrablock and not hasattr(block, "skip_conv"):
                # diffusers adds in place, which also updates the skip that aliases `sample`.
                aliased = res_samples and res_samples[-1] is sample
                sample = sample + intrablock.pop(0)
                if aliased:
                    res_samples = res_samples[:-1] + (sample,)
            down_block_res_samples += res_samples

        if is_controlnet:
            # Mid blocks keep the shape, so the mid residual must match the down path's output.
            checks.check_controlnet_residuals(down_block_res_samples, down_block_additional_residuals,
                                              sample, mid_block_additional_residual)
            down_block_res_samples = tuple(
                s + r for s, r in zip(down_block_res_samples, down_block_additional_residuals))

        if self.mid_block is not None:
            sample = self.mid_block(sample, emb, ctx)
            if intrablock and sample.shape == intrablock[0].shape:
                sample = sample + intrablock.pop(0)
        if is_controlnet:
            sample = sample + mid_block_additional_residual

        default_overall_up_factor = 2**self.num_upsamplers
        forward_upsample_size = any(s % default_overall_up_factor != 0 for s in sample.shape[-2:]) or any(
            s % default_overall_up_factor != 0 for s in down_block_res_samples[0].shape[-2:])
        upsample_size = None
        skip_sample = None
        for i, block in enumerate(self.up_blocks):
            n_res = len(block.resnets)
            res_samples = down_block_res_samples[-n_res:]
            down_block_res_samples = down_block_res_samples[:-n_res]
            if i != len(self.up_blocks) - 1 and forward_upsample_size:
                upsample_size = down_block_res_samples[-1].shape[2:]
            if hasattr(block, "skip_conv"):
                sample, skip_sample = block(sample, res_samples, emb, skip_sample)
            else:
                sample = block(sample, res_samples, emb, ctx, upsample_size=upsample_size)

        if self.conv_norm_out is not None:
            sample = self.conv_act(self.conv_norm_out(sample))
        sample = self.conv_out(sample)
        if skip_sample is not None:
            sample = sample + skip_sample
        if not return_dict:
            return (sample,)
        return UNet2DConditionOutput(sample=sample)

    # -- attention processors ------------------------------------------------------------------------
    @property
    def attn_processors(self) -> dict:
        """Processors of every attention layer, keyed `"<module path>.processor"` as diffusers does."""
        return {f"{name}.processor": m.processor for name, m in self.named_modules() if isinstance(m, Attention)}

    def set_attn_processor(self, processor) -> None:
        """One processor for every layer, or a dict keyed like `attn_processors`."""
        layers = {f"{name}.processor": m for name, m in self.named_modules() if isinstance(m, Attention)}
        if isinstance(processor, dict):
            unknown = sorted(set(processor) - set(layers))
            missing = sorted(set(layers) - set(processor))
            if unknown or missing:
                raise ValueError(
                    f"set_attn_processor: the processor dict must have one entry per attention layer "
                    f"({len(layers)}); unknown keys {unknown}, missing keys {missing}")
            for key, layer in layers.items():
                layer.set_processor(processor[key])
        else:
            for layer in layers.values():
                layer.set_processor(processor)

    def set_default_attn_processor(self) -> None:
        """Back to the default processor of each layer (SDPA; added-KV SDPA for added-KV layers)."""
        from .processors import AttnAddedKVProcessor2_0, AttnProcessor2_0
        for m in self.modules():
            if isinstance(m, Attention):
                m.set_processor(AttnAddedKVProcessor2_0() if m.added_kv_proj_dim is not None else AttnProcessor2_0())

    def set_attention_slice(self, slice_size: Union[str, int, list] = "auto") -> None:
        """Sliced attention: "auto" (half the heads), "max" (one head at a time), an int, or one entry per layer.

        Layers are the attention layers in module order, as diffusers counts them; a list entry of None
        puts that layer back on its default processor. Same validation and messages as diffusers, plus:
        "auto" on a one-head layer gives 1 (diffusers gives 0 and divides by zero at the first call).
        """
        layers = [m for m in self.modules() if isinstance(m, Attention)]
        dims = [m.sliceable_head_dim for m in layers]
        if slice_size == "auto":
            slice_size = [max(1, dim // 2) for dim in dims]
        elif slice_size == "max":
            slice_size = len(dims) * [1]
        slice_size = len(dims) * [slice_size] if not isinstance(slice_size, list) else slice_size
        if len(slice_size) != len(dims):
            raise ValueError(
                f"You have provided {len(slice_size)}, but {self.config} has {len(dims)} different"
                f" attention layers. Make sure to match `len(slice_size)` to be {len(dims)}."
            )
        for size, dim in zip(slice_size, dims):
            if size is not None and size > dim:
                raise ValueError(f"size {size} has to be smaller or equal to {dim}.")
            if size is not None and (not isinstance(size, int) or isinstance(size, bool) or size < 1):
                raise ValueError(f"slice size must be a positive int, \"auto\", \"max\" or None; got {size!r}")
        for layer, size in zip(layers, slice_size):
            layer.set_attention_slice(size)

    def fuse_qkv_projections(self) -> None:
        """One matmul for Q,K,V of self-attention, K,V of cross-attention and the added K,V projections.

        Unlike diffusers, no modules are swapped and no `to_qkv` weights are created: each layer's
        to_q/to_k/to_v (add_k_proj/add_v_proj) parameters stay the source of truth and its processor
        concatenates them into one projection per call. So `state_dict()` is identical fused or not,
        processors (ours, diffusers', user-written) can be set before or after, and added-KV layers fuse too.
        """
        for m in self.modules():
            if isinstance(m, Attention):
                m.fuse_projections()

    def unfuse_qkv_projections(self) -> None:
        """Back to one matmul per projection (the weights never changed)."""
        for m in self.modules():
            if isinstance(m, Attention):
                m.unfuse_projections()

    # -- FreeU --------------------------------------------------------------------------------------
    def enable_freeu(self, s1: float, s2: float, b1: float, b2: float) -> None:
        """FreeU on the first two up blocks: b scales half the backbone channels, s the skip's low frequencies."""
        stages = {0: (b1, s1), 1: (b2, s2)}
        targets = [blk for blk in self.up_blocks if getattr(blk, "supports_freeu", False) and blk.resolution_idx in stages]
        if len(self.up_blocks) < 2:
            raise ValueError(f"enable_freeu needs at least two up blocks; this model has {len(self.up_blocks)}")
        for blk in targets:
            blk.set_freeu(*stages[blk.resolution_idx])

    def disable_freeu(self) -> None:
        for blk in self.up_blocks:
            if getattr(blk, "supports_freeu", False):
                blk.set_freeu(None, None)

    # -- checkpoints --------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_path, subfolder: Optional[str] = None, variant: Optional[str] = None,
                        torch_dtype: Optional[torch.dtype] = None, allow_pickle: bool = False,
                        **overrides) -> "UNet2DConditionModel":
        """Load diffusers' layout from a local folder: config.json + (sharded) safetensors."""
        from . import checkpoint
        config, state_dict = checkpoint.load_pretrained_files(
            pretrained_model_path, subfolder=subfolder, variant=variant, allow_pickle=allow_pickle)
        with torch.device("meta"):
            model = cls.from_config(config, **overrides)
        checkpoint.load_state_dict_strict(model, state_dict, dtype=torch_dtype)
        _materialize_non_persistent(model)
        return model.eval()

    def save_pretrained(self, save_directory, variant: Optional[str] = None, max_shard_size="10GB",
                        safe_serialization: bool = True) -> None:
        from . import checkpoint
        checkpoint.save_pretrained(self, save_directory, config=self.config.to_dict(), variant=variant,
                                   max_shard_size=max_shard_size, safe_serialization=safe_serialization)

    # -- LoRA (compiled_unet/lora.py: formats, layers, export behaviour) -----------------------------
    def load_lora_adapter(self, pretrained_model_name_or_path_or_dict, adapter_name: Optional[str] = None, *,
                          prefix: Optional[str] = None, network_alphas: Optional[dict] = None, strict: bool = True,
                          hotswap: bool = False):
        """Load UNet LoRA weights (a .safetensors path or a state dict) as adapter `adapter_name`.

        Formats: PEFT/diffusers (`lora_A`/`lora_B`, `lora.down`/`lora.up`, `to_q_lora`), kohya
        (`lora_unet_...`); alphas from `.alpha` keys, `network_alphas` or the file's metadata, else alpha =
        rank. A `unet.` prefix is removed; with `prefix`, only keys under `prefix.` are read. Text-encoder
        keys are skipped and listed in the returned `LoRALoadReport`. Keys that match no Linear/Conv2d
        raise a ValueError naming them (strict=False: loaded around, warned and listed in the report);
        wrong shapes always raise, before anything is changed. The new adapter becomes the only active one
        (as in diffusers). `hotswap=True` copies the weights into the existing adapter of that name (same
        layers and ranks): an exported program picks them up without a new export.
        """
        from . import lora
        return lora.load(self, pretrained_model_name_or_path_or_dict, adapter_name, prefix=prefix,
                         network_alphas=network_alphas, strict=strict, hotswap=hotswap)

    def set_adapters(self, adapter_names, weights=None) -> None:
        """Activate `adapter_names` (str or list) with `weights` (None: 1.0; a number or one per name)."""
        from . import lora
        lora.set_adapters(self, adapter_names, weights)

    def active_adapters(self) -> list:
        from . import lora
        layers = lora.lora_layers(self)
        return list(next(iter(layers.values())).active_adapters) if layers else []

    def set_lora_scale(self, scale: float) -> None:
        """Multiply every adapter's scaling by `scale` through its buffers (export-safe runtime scale).

        `cross_attention_kwargs={"scale": s}` does the same for one call, as in diffusers, but it is a
        Python number: an exported program keeps the value it was exported with.
        """
        from . import lora
        lora.set_global_scale(self, scale)

    def fuse_lora(self, lora_scale: float = 1.0, safe_fusing: bool = False, adapter_names=None) -> None:
        """Add `lora_scale` x the adapters' deltas (default: the active ones) into the base weights."""
        from . import lora
        lora.fuse(self, lora_scale, safe_fusing, adapter_names)

    def unfuse_lora(self) -> None:
        """Put back the weights saved at fusion (bit-exact; the LoRA branch runs again)."""
        from . import lora
        lora.unfuse(self)

    def unload_lora(self) -> None:
        """Remove all adapters; the original layers come back (fused weights stay fused, as in diffusers)."""
        from . import lora
        lora.unload(self)

    def delete_adapters(self, adapter_names) -> None:
        from . import lora
        lora.delete(self, adapter_names)

    def disable_lora(self) -> None:
        """Run without the (unfused) adapters until `enable_lora()`."""
        from . import lora
        lora.set_enabled(self, False)

    def enable_lora(self) -> None:
        from . import lora
        lora.set_enabled(self, True)


def _keep_mask_to_bias(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Keep mask [B, L] or [B, 1, L] of 1 (keep) / 0 (drop) -> additive bias [B, 1, L]."""
    return ((1 - mask.reshape(mask.shape[0], -1).to(dtype)) * -10000.0).unsqueeze(1)


def _materialize_non_persistent(model: nn.Module) -> None:
    """Buffers that checkpoints do not carry (K-resampler kernels) are rebuilt on CPU after a meta load."""
    for module in model.modules():
        for name, buf in list(module._buffers.items()):
            if buf is not None and buf.is_meta:
                fresh = type(module)() if not list(inspect.signature(type(module).__init__).parameters)[1:] else None
                if fresh is None or name not in fresh._buffers:
                    raise RuntimeError(f"cannot rebuild buffer {name!r} of {type(module).__name__}")
                module._buffers[name] = fresh._buffers[name].to(dtype=buf.dtype)


def _encoder_hid_proj(c: UNetConfig) -> Optional[nn.Module]:
    if c.encoder_hid_dim_type == "text_proj":
        return nn.Linear(c.encoder_hid_dim, c.cross_attention_dim)
    if c.encoder_hid_dim_type == "text_image_proj":
        return TextImageProjection(text_embed_dim=c.encoder_hid_dim, image_embed_dim=c.cross_attention_dim,
                                   cross_attention_dim=c.cross_attention_dim)
    if c.encoder_hid_dim_type == "image_proj":
        return ImageProjection(image_embed_dim=c.encoder_hid_dim, cross_attention_dim=c.cross_attention_dim)
    return None


def _class_embedding(c: UNetConfig, p) -> Optional[nn.Module]:
    t = c.class_embed_type
    if t is None and c.num_class_embeds is not None:
        return nn.Embedding(c.num_class_embeds, p.time_embed_dim)
    if t == "timestep":
        return TimestepEmbedding(p.timestep_input_dim, p.time_embed_dim, act_fn=c.act_fn)
    if t == "identity":
        return nn.Identity()
    if t == "projection":
        return TimestepEmbedding(c.projection_class_embeddings_input_dim, p.time_embed_dim)
    if t == "simple_projection":
        return nn.Linear(c.projection_class_embeddings_input_dim, p.time_embed_dim)
    return None


def _constructor_signature() -> inspect.Signature:
    import dataclasses
    params = [inspect.Parameter("self", inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    for f in dataclasses.fields(UNetConfig):
        params.append(inspect.Parameter(f.name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=f.default))
    return inspect.Signature(params)


def _config_from_arguments(args: tuple, kwargs: dict) -> UNetConfig:
    """Constructor arguments -> UNetConfig. As diffusers' `register_to_config`, keyword arguments starting
    with `_` are ignored: its config dicts carry `_class_name`, `_diffusers_version`, `_name_or_path` and
    `_use_default_values`, so `UNet2DConditionModel(**diffusers_unet.config)` works. Any other unknown
    keyword is a TypeError naming all of them."""
    kwargs = {k: v for k, v in kwargs.items() if not k.startswith("_")}
    unknown = sorted(set(kwargs) - set(_CONSTRUCTOR_SIGNATURE.parameters))
    if unknown:
        raise TypeError(f"UNet2DConditionModel got unknown config arguments {unknown}; expected a subset of "
                        f"{sorted(_CONSTRUCTOR_SIGNATURE.parameters)} (keys starting with '_' are ignored)")
    return UNetConfig(**_CONSTRUCTOR_SIGNATURE.bind(*args, **kwargs).arguments)


_CONSTRUCTOR_SIGNATURE = _constructor_signature().replace(parameters=list(_constructor_signature().parameters.values())[1:])
UNet2DConditionModel.__init__.__signature__ = _constructor_signature()
