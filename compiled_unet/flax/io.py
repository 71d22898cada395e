"""Checkpoint folders for the Flax model, in diffusers' layouts, through our PyTorch-side reader/writer.

- Flax: ``config.json`` + ``diffusion_flax_model[.{variant}].msgpack`` (flax.serialization msgpack of the
  param tree, diffusers 0.39's names), as diffusers' `FlaxModelMixin` writes it.
- PyTorch (``from_pt=True`` / ``format="pt"``): everything `compiled_unet.checkpoint` reads and writes
  (safetensors, sharded with an index, variants; pickle ``.bin`` only with ``allow_pickle=True``).

Unlike diffusers, a config key this model does not know is an error naming it (diffusers drops it
silently and then computes something else, e.g. with ``norm_num_groups=8``).
"""
from __future__ import annotations

import json
import os
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import serialization

from .. import checkpoint as ckpt
from ..config import UNetConfig
from .convert import check_params, params_from_torch, params_to_torch

FLAX_WEIGHTS_STEM = "diffusion_flax_model"
FLAX_CLASS_NAME = "FlaxUNet2DConditionModel"
# Flax-only fields diffusers 0.39 writes into config.json (it never writes dtype); we also accept ours.
_FLAX_CONFIG_KEYS = ("use_memory_efficient_attention", "split_head_dim", "gelu_approximate", "transformer_norm_eps")


def _flax_weights_name(variant: Optional[str]) -> str:
    return ckpt._add_variant(f"{FLAX_WEIGHTS_STEM}.msgpack", variant)


def _model_from_config(cls, config: dict, config_path: str, dtype, overrides: dict):
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    flax_kw = {k: config.pop(k) for k in _FLAX_CONFIG_KEYS if k in config}
    flax_kw.update({k: overrides.pop(k) for k in list(overrides) if k in _FLAX_CONFIG_KEYS or k == "param_dtype"})
    try:
        c = UNetConfig.from_dict(config, **overrides)
    except TypeError as err:  # unknown keys: diffusers ignores them silently, we refuse
        raise ckpt.CheckpointError(f"config '{config_path}': {err}") from None
    return cls.from_config(c, dtype=dtype, **flax_kw)


def from_pretrained(cls, path, *, dtype=jnp.float32, from_pt: bool = False, allow_pickle: bool = False,
                    variant: Optional[str] = None, subfolder: Optional[str] = None, **overrides):
    """(model, params): params as jax arrays in the stored dtype; `dtype` is the computation dtype."""
    ckpt._check_variant(variant)
    folder = ckpt._resolve_folder(path, subfolder)
    config_path = os.path.join(folder, ckpt.CONFIG_NAME)
    if from_pt:
        config, state_dict = ckpt.load_pretrained_files(path, subfolder=subfolder, variant=variant,
                                                        allow_pickle=allow_pickle)
        model = _model_from_config(cls, config, config_path, dtype, overrides)
        try:
            params = params_from_torch(state_dict, model.config)
        except ValueError as err:
            raise ckpt.CheckpointError(f"weights in '{folder}': {err}") from None
    else:
        config = ckpt._read_config(folder)
        model = _model_from_config(cls, config, config_path, dtype, overrides)
        weights = os.path.join(folder, _flax_weights_name(variant))
        if not os.path.isfile(weights):
            present = sorted(os.listdir(folder))
            hint = ("; it holds PyTorch weights: pass from_pt=True" if any(
                n.startswith(ckpt.WEIGHTS_STEM) for n in present) else "")
            raise ckpt.CheckpointError(f"no {os.path.basename(weights)} in '{folder}'{hint}; files present: {present}")
        try:
            with open(weights, "rb") as f:
                params = serialization.msgpack_restore(f.read())
        except Exception as err:  # msgpack raises several types for corrupt data
            raise ckpt.CheckpointError(f"cannot read Flax weights '{weights}': {err}") from None
        try:
            check_params(params, model.param_shapes())
        except ValueError as err:
            raise ckpt.CheckpointError(f"weights '{weights}': {err}") from None
    return model, jax.tree_util.tree_map(jnp.asarray, params)


def _config_text(model, class_name: str, version: str) -> str:
    cfg = model.config.to_dict()
    if class_name == FLAX_CLASS_NAME:
        cfg.update(use_memory_efficient_attention=model.use_memory_efficient_attention,
                   split_head_dim=model.split_head_dim, gelu_approximate=model.gelu_approximate,
                   transformer_norm_eps=model.transformer_norm_eps)
    cfg["_class_name"] = class_name
    cfg["_diffusers_version"] = version
    return json.dumps(ckpt._to_json_value(cfg), indent=2, sort_keys=True) + "\n"


class _StateDictView:
    """What `checkpoint.save_pretrained` needs from a model: `state_dict()` of torch tensors."""

    def __init__(self, arrays: dict):
        self._arrays = arrays

    def state_dict(self):
        import torch
        out = {}
        for k, a in self._arrays.items():
            if a.dtype.name == "bfloat16":
                out[k] = torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
            else:
                out[k] = torch.from_numpy(np.ascontiguousarray(a))
        return out


def save_pretrained(model, save_directory, params, *, format: str = "flax", variant: Optional[str] = None,
                    **pt_kwargs) -> None:
    """Write config.json and the weights atomically (every file staged, then moved into place)."""
    if format not in ("flax", "pt"):
        raise ValueError(f"format must be 'flax' or 'pt', got {format!r}")
    ckpt._check_variant(variant)
    params = jax.tree_util.tree_map(np.asarray, params)
    if format == "pt":
        arrays = params_to_torch(params, model.config)
        ckpt.save_pretrained(_StateDictView(arrays), save_directory, config=model.config.to_dict(), variant=variant,
                             **pt_kwargs)
        return
    if pt_kwargs:
        raise TypeError(f"save_pretrained(format='flax') got unexpected arguments {sorted(pt_kwargs)}")
    check_params(params, model.param_shapes())
    folder = os.fspath(save_directory)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise ckpt.CheckpointError(f"save_directory '{folder}' is a file; expected a folder to save into")
    os.makedirs(folder, exist_ok=True)
    data = serialization.msgpack_serialize(params)
    text = _config_text(model, FLAX_CLASS_NAME, "0.39.0")

    def write_bytes(p):
        with open(p, "wb") as f:
            f.write(data)

    ckpt._write_all_atomically(folder, {_flax_weights_name(variant): write_bytes,
                                        ckpt.CONFIG_NAME: ckpt._text_writer(text)})
