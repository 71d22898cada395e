"""PyTorch state dict <-> Flax params, bit-exact both ways (only transposes, no arithmetic).

Names are diffusers 0.39's Flax names (its `modeling_flax_pytorch_utils.rename_key`): an index joins
the name before it (`down_blocks.0.resnets.1` -> `down_blocks_0/resnets_1`), and the leaf follows the
module type: Linear `weight` -> `kernel` (transposed), Conv2d `weight` -> `kernel` (OIHW -> HWIO), norm
`weight` -> `scale`, Embedding `weight` -> `embedding`; other parameters keep their names (GaussianFourier
`time_proj.weight`, `pool.positional_embedding`). The module type comes from our PyTorch model built on
the meta device, so the mapping covers exactly the PyTorch keys and nothing is guessed from shapes.
Blocks diffusers' Flax model never had use the same rule (e.g. `add_k_proj`, `group_norm`, `norm_cross`,
`encoder_hid_proj/image_embeds`, `add_embedding/input_hint_block_0`).
"""
from __future__ import annotations

from typing import Mapping

import numpy as np


def _flax_path(pt_key: str) -> list:
    path = []
    for part in pt_key.split("."):
        if part.isdigit() and path:
            path[-1] = f"{path[-1]}_{part}"
        else:
            path.append(part)
    return path


def _module_kinds(config) -> dict:
    """{pt parameter key: (kind, flax path)} from our PyTorch model on the meta device."""
    import torch
    from torch import nn

    from ..config import UNetConfig
    from ..unet import UNet2DConditionModel

    cfg = config.to_dict() if isinstance(config, UNetConfig) else dict(config)
    with torch.device("meta"):
        model = UNet2DConditionModel.from_config(cfg)
    kinds = {}
    for mod_name, module in model.named_modules():
        for p_name, _ in module.named_parameters(recurse=False):
            key = f"{mod_name}.{p_name}" if mod_name else p_name
            path = _flax_path(key)
            if p_name == "weight" and isinstance(module, nn.Linear):
                kinds[key] = ("linear", path[:-1] + ["kernel"])
            elif p_name == "weight" and isinstance(module, nn.Conv2d):
                kinds[key] = ("conv", path[:-1] + ["kernel"])
            elif p_name == "weight" and isinstance(module, (nn.GroupNorm, nn.LayerNorm)):
                kinds[key] = ("plain", path[:-1] + ["scale"])
            elif p_name == "weight" and isinstance(module, nn.Embedding):
                kinds[key] = ("plain", path[:-1] + ["embedding"])
            else:
                kinds[key] = ("plain", path)
    return kinds


def _to_flax(kind: str, a: np.ndarray) -> np.ndarray:
    if kind == "linear":
        return np.ascontiguousarray(a.T)
    if kind == "conv":
        return np.ascontiguousarray(a.transpose(2, 3, 1, 0))
    return a


def _to_torch(kind: str, a: np.ndarray) -> np.ndarray:
    if kind == "linear":
        return np.ascontiguousarray(a.T)
    if kind == "conv":
        return np.ascontiguousarray(a.transpose(3, 2, 0, 1))
    return a


def _numpy(t) -> np.ndarray:
    if hasattr(t, "detach"):  # torch tensor; bfloat16 goes through float32 bits unchanged
        import torch
        t = t.detach().cpu()
        if t.dtype == torch.bfloat16:
            import ml_dtypes
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
        return t.numpy()
    return np.asarray(t)


def _flatten(tree, prefix=()) -> dict:
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(_flatten(v, prefix + (k,)))
        else:
            out[prefix + (k,)] = v
    return out


def params_from_torch(state_dict: Mapping, config) -> dict:
    """Flax params (nested dict of numpy arrays) from a PyTorch state dict of our model / diffusers'.

    Every key must be there and nothing else: missing and unexpected keys raise a ValueError naming them.
    """
    kinds = _module_kinds(config)
    missing = sorted(set(kinds) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(kinds))
    if missing or unexpected:
        raise ValueError(f"state dict does not fit this config: missing keys {missing[:20]}"
                         f"{' ...' if len(missing) > 20 else ''}, unexpected keys {unexpected[:20]}"
                         f"{' ...' if len(unexpected) > 20 else ''}")
    params: dict = {}
    for key, (kind, path) in kinds.items():
        node = params
        for p in path[:-1]:
            node = node.setdefault(p, {})
        node[path[-1]] = _to_flax(kind, _numpy(state_dict[key]))
    return params


def params_to_torch(params: Mapping, config) -> dict:
    """{PyTorch key: numpy array} from Flax params (our names or diffusers 0.39 Flax's, they are the same)."""
    kinds = _module_kinds(config)
    flat = {k: v for k, v in _flatten(_unfreeze(params)).items()}
    wanted = {tuple(path): key for key, (_, path) in kinds.items()}
    missing = sorted("/".join(p) for p in set(wanted) - set(flat))
    unexpected = sorted("/".join(p) for p in set(flat) - set(wanted))
    if missing or unexpected:
        raise ValueError(f"Flax params do not fit this config: missing {missing[:20]}, unexpected {unexpected[:20]}")
    return {key: _to_torch(kind, np.asarray(flat[tuple(path)])) for key, (kind, path) in kinds.items()}


def check_params(params: Mapping, reference: Mapping) -> None:
    """Same tree and shapes as `reference` (e.g. `model.param_shapes()`), else a ValueError naming the differences."""
    flat, ref = _flatten(_unfreeze(params)), _flatten(_unfreeze(reference))
    missing = sorted("/".join(p) for p in set(ref) - set(flat))
    unexpected = sorted("/".join(p) for p in set(flat) - set(ref))
    shapes = sorted(f"{'/'.join(p)}: {tuple(np.shape(flat[p]))} != {tuple(ref[p].shape)}"
                    for p in set(ref) & set(flat) if tuple(np.shape(flat[p])) != tuple(ref[p].shape))
    if missing or unexpected or shapes:
        raise ValueError(f"params do not fit the model: missing {missing[:20]}, unexpected {unexpected[:20]}, "
                         f"shape mismatches {shapes[:20]}")


def _unfreeze(tree):
    if hasattr(tree, "unfreeze"):
        return tree.unfreeze()
    return tree
