"""Input checks for `UNet2DConditionModel.forward`: clear errors instead of failures deep inside torch.

Every check reads only shapes, dtypes and Python values (static while tracing), so checking adds no
node to an exported graph.
"""
from __future__ import annotations

import numbers
from typing import Optional

import torch


def _fail(arg: str, expected: str, got) -> None:
    raise ValueError(f"`{arg}`: expected {expected}; got {got}")


def _shape(t) -> str:
    return f"a tensor of shape {tuple(t.shape)}" if torch.is_tensor(t) else f"{type(t).__name__}"


def _text_readers(c, added_cond_kwargs: dict) -> list:
    """Parts of the model that read `encoder_hidden_states` as given (diffusers' forward), besides attention."""
    readers = []
    if c.addition_embed_type == "text":
        readers.append("addition_embed_type='text'")
    if c.addition_embed_type == "text_image" and "text_embeds" not in added_cond_kwargs:
        readers.append("addition_embed_type='text_image' without added_cond_kwargs['text_embeds']")
    if c.encoder_hid_dim_type in ("text_proj", "text_image_proj"):
        readers.append(f"encoder_hid_dim_type={c.encoder_hid_dim_type!r}")
    return readers


def _cross_attention_blocks(model) -> list:
    """(name, block) of the blocks that pass `encoder_hidden_states` to their attention layers."""
    blocks = [(f"down_blocks.{i}", b) for i, b in enumerate(model.down_blocks)]
    blocks += [("mid_block", model.mid_block)] if model.mid_block is not None else []
    blocks += [(f"up_blocks.{i}", b) for i, b in enumerate(model.up_blocks)]
    return [(name, b) for name, b in blocks if getattr(b, "has_cross_attention", False)]


def _no_self_fallback(model) -> Optional[str]:
    """Why the attention layers cannot run without `encoder_hidden_states`, or None when they can.

    diffusers passes `encoder_hidden_states=None` on to the attention layers, which then take keys and
    values from the hidden states themselves (AudioLDM and MusicLDM run this way); that only fits a layer
    whose key projections take the layer's own width. DualTransformer2DModel slices the states: no fallback.
    """
    from .attention import Attention, DualTransformer2DModel
    for prefix, block in _cross_attention_blocks(model):
        for name, m in block.named_modules(prefix=prefix):
            if isinstance(m, DualTransformer2DModel):
                return "dual_cross_attention splits them into text and image tokens"
            if not isinstance(m, Attention):
                continue
            widths = [p.in_features for p in (m.to_k, m.add_k_proj) if p is not None]
            if any(w != m.query_dim for w in widths):
                return (f"without them an attention layer attends over its own hidden states, but "
                        f"{name} takes keys of width {max(widths)} != its width {m.query_dim}")
    return None


def _expected_encoder_width(model) -> Optional[int]:
    c = model.config
    if c.encoder_hid_dim_type in ("text_proj", "text_image_proj"):
        return c.encoder_hid_dim
    if c.encoder_hid_dim_type == "image_proj":
        return None  # replaced by the projected image embedding
    dims = {c.cross_attention_dim} if isinstance(c.cross_attention_dim, int) else set(c.cross_attention_dim)
    return dims.pop() if len(dims) == 1 else None


def _check_encoder_states(model, encoder_hidden_states, added_cond_kwargs: dict, batch: int) -> None:
    """As diffusers: None is fine where nothing reads the states (image_proj derives them from
    `added_cond_kwargs['image_embeds']`; a model without cross-attention ignores them) and where the
    attention layers can attend over the hidden states instead; states nothing reads are not checked."""
    c = model.config
    readers = _text_readers(c, added_cond_kwargs)
    attention_reads = c.encoder_hid_dim_type is None and bool(_cross_attention_blocks(model))
    if encoder_hidden_states is None:
        why = "; ".join(readers) if readers else (_no_self_fallback(model) if attention_reads else None)
        if why:
            _fail("encoder_hidden_states", f"a tensor [batch, sequence, dim] ({why})", "None")
        return
    if not (readers or attention_reads):
        return  # diffusers never reads them
    if not torch.is_tensor(encoder_hidden_states) or encoder_hidden_states.ndim != 3:
        _fail("encoder_hidden_states", "a 3-D tensor [batch, sequence, dim]", _shape(encoder_hidden_states))
    width = _expected_encoder_width(model)
    if width is not None and encoder_hidden_states.shape[-1] != width:
        _fail("encoder_hidden_states", f"last dimension {width} (cross_attention_dim / encoder_hid_dim)",
              f"shape {tuple(encoder_hidden_states.shape)}")
    if encoder_hidden_states.shape[0] != batch:
        _fail("encoder_hidden_states", f"batch {batch} (as sample)", f"shape {tuple(encoder_hidden_states.shape)}")


def check_forward_inputs(model, sample, timestep, encoder_hidden_states, class_labels, timestep_cond,
                         attention_mask, added_cond_kwargs, down_block_additional_residuals,
                         mid_block_additional_residual, down_intrablock_additional_residuals,
                         encoder_attention_mask) -> None:
    c = model.config
    if not torch.is_tensor(sample) or sample.ndim != 4:
        _fail("sample", "a 4-D tensor [batch, channels, height, width]", _shape(sample))
    if not sample.is_floating_point():
        _fail("sample", "a floating-point tensor", f"dtype {sample.dtype}")
    batch = sample.shape[0]
    channels = c.in_channels - (4 if c.addition_embed_type == "image_hint" else 0)
    if sample.shape[1] != channels:
        _fail("sample", f"{channels} channels (config.in_channels"
              f"{' minus the 4 hint channels' if c.addition_embed_type == 'image_hint' else ''})",
              f"{sample.shape[1]} channels, shape {tuple(sample.shape)}")

    if torch.is_tensor(timestep):
        if timestep.ndim > 1 or (timestep.ndim == 1 and timestep.shape[0] not in (1, batch)):
            _fail("timestep", f"a scalar, a 0-d tensor or a 1-d tensor of length 1 or batch ({batch})",
                  _shape(timestep))
    elif not isinstance(timestep, numbers.Real) or isinstance(timestep, bool):
        # numbers.Real: Python and NumPy scalars (diffusers takes np.int64 / np.float64 too).
        _fail("timestep", "a tensor, float or int", type(timestep).__name__)

    _check_encoder_states(model, encoder_hidden_states, added_cond_kwargs, batch)

    for name, mask in (("attention_mask", attention_mask), ("encoder_attention_mask", encoder_attention_mask)):
        if mask is None:
            continue
        # [batch, 1, sequence] works in diffusers too (the same bias after broadcasting).
        if not torch.is_tensor(mask) or mask.ndim not in (2, 3) or mask.shape[0] != batch or \
                (mask.ndim == 3 and mask.shape[1] != 1):
            _fail(name, f"a 2-D keep mask [batch={batch}, sequence] of 1 (keep) / 0 (drop)", _shape(mask))
        if name == "encoder_attention_mask" and torch.is_tensor(encoder_hidden_states) and \
                c.encoder_hid_dim_type is None and mask.shape[-1] != encoder_hidden_states.shape[1]:
            _fail(name, f"sequence length {encoder_hidden_states.shape[1]} (as encoder_hidden_states)",
                  f"shape {tuple(mask.shape)}")

    if model.class_embedding is not None and class_labels is None:
        _fail("class_labels", f"a tensor (config.class_embed_type={c.class_embed_type!r}"
              f"{', num_class_embeds=' + str(c.num_class_embeds) if c.num_class_embeds else ''} needs them)", "None")
    if c.time_cond_proj_dim is None and timestep_cond is not None:
        _fail("timestep_cond", "None (config.time_cond_proj_dim is None)", _shape(timestep_cond))
    if timestep_cond is not None and timestep_cond.shape[-1] != c.time_cond_proj_dim:
        _fail("timestep_cond", f"last dimension {c.time_cond_proj_dim} (config.time_cond_proj_dim)",
              _shape(timestep_cond))

    _check_added_cond(c, added_cond_kwargs, batch)
    _check_residuals(model, sample, down_block_additional_residuals, mid_block_additional_residual,
                     down_intrablock_additional_residuals)


_REQUIRED_ADDED = {
    "text_image": ("image_embeds",),
    "text_time": ("text_embeds", "time_ids"),
    "image": ("image_embeds",),
    "image_hint": ("image_embeds", "hint"),
}


def _check_added_cond(c, added_cond_kwargs: dict, batch: int) -> None:
    required = list(_REQUIRED_ADDED.get(c.addition_embed_type, ()))
    if c.encoder_hid_dim_type in ("text_image_proj", "image_proj"):
        required.append("image_embeds")
    missing = [k for k in dict.fromkeys(required) if k not in added_cond_kwargs]
    if missing:
        why = f"addition_embed_type={c.addition_embed_type!r}, encoder_hid_dim_type={c.encoder_hid_dim_type!r}"
        _fail("added_cond_kwargs", f"the keys {required} ({why})", f"a dict without {missing}")
    if c.addition_embed_type == "text_time":
        text, ids = added_cond_kwargs["text_embeds"], added_cond_kwargs["time_ids"]
        n_ids = c.projection_class_embeddings_input_dim - text.shape[-1]
        if n_ids <= 0 or n_ids % c.addition_time_embed_dim or ids.numel() * c.addition_time_embed_dim != text.shape[0] * n_ids:
            _fail("added_cond_kwargs['time_ids']",
                  f"text_embeds width + time_ids per sample x addition_time_embed_dim ({c.addition_time_embed_dim}) "
                  f"= projection_class_embeddings_input_dim ({c.projection_class_embeddings_input_dim})",
                  f"text_embeds {tuple(text.shape)}, time_ids {tuple(ids.shape)}")
    if c.addition_embed_type == "image_hint":
        hint = added_cond_kwargs["hint"]
        if not torch.is_tensor(hint) or hint.ndim != 4 or hint.shape[1] != 3:
            _fail("added_cond_kwargs['hint']", "an RGB image tensor [batch, 3, 8*H, 8*W]", _shape(hint))


def check_controlnet_residuals(res_samples: tuple, down: tuple, sample: torch.Tensor, mid) -> None:
    """Called once the down path ran: the skips' shapes are known (static while tracing)."""
    if len(down) != len(res_samples):
        _fail("down_block_additional_residuals", f"{len(res_samples)} tensors (one per down-path skip)", len(down))
    for i, (r, s) in enumerate(zip(down, res_samples)):
        if not torch.is_tensor(r) or r.shape != s.shape:
            _fail(f"down_block_additional_residuals[{i}]", f"shape {tuple(s.shape)}", _shape(r))
    if not torch.is_tensor(mid) or mid.shape != sample.shape:
        _fail("mid_block_additional_residual", f"shape {tuple(sample.shape)}", _shape(mid))


def _check_residuals(model, sample, down, mid, intrablock) -> None:
    if mid is not None and down is None:
        _fail("down_block_additional_residuals", "a tuple of tensors alongside mid_block_additional_residual "
              "(ControlNet)", "None")
    if intrablock is not None and len(intrablock) > len(model.down_blocks) + 1:
        _fail("down_intrablock_additional_residuals",
              f"at most {len(model.down_blocks) + 1} tensors (one per down block, then the mid block)",
              f"{len(intrablock)}")
