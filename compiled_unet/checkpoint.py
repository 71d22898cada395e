"""Checkpoint I/O in diffusers' folder layout, without importing diffusers.

A model folder holds ``config.json`` and the weights, as diffusers 0.42.1 writes them:

- ``diffusion_pytorch_model[.{variant}].safetensors``, or when larger than ``max_shard_size``
  ``diffusion_pytorch_model[.{variant}]-00001-of-0000N.safetensors`` shards plus
  ``diffusion_pytorch_model.safetensors.index[.{variant}].json`` (diffusers inserts the variant
  before the last dot of every name, hence the odd index name);
- the same names with ``.bin`` for pickle checkpoints (``safe_serialization=False``).

Saving stages every file as a temp file in the target folder and moves them into place only once
all of them were written, so an interrupted save leaves the previous checkpoint intact. Loading
turns every failure (missing file, corrupt safetensors, bad JSON) into a ``CheckpointError`` that
names the path and what was expected.
"""
from __future__ import annotations

import json
import logging
import os
import pickle
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import safetensors
import safetensors.torch
import torch

from ._atomic import commit, temp_path_for

__all__ = [
    "CheckpointError",
    "load_pretrained_files",
    "load_state_dict_strict",
    "parse_size",
    "save_pretrained",
]

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_STEM = "diffusion_pytorch_model"
SAFETENSORS_EXT = ".safetensors"
PICKLE_EXT = ".bin"
# Written into config.json so that diffusers' from_pretrained accepts the folder as its own.
CLASS_NAME = "UNet2DConditionModel"
DIFFUSERS_VERSION = "0.42.1"
# Config keys diffusers keeps in memory but never writes (configuration_utils.to_json_string).
_UNSAVED_CONFIG_KEYS = ("_ignore_files", "_use_default_values", "_pre_quantization_dtype")
# Decimal units, as huggingface_hub's parse_size_to_int reads max_shard_size.
_SIZE_UNITS = {"TB": 10**12, "GB": 10**9, "MB": 10**6, "KB": 10**3}


class CheckpointError(ValueError):
    """A checkpoint folder or file is missing, malformed, or does not fit the model."""


# ----------------------------------------------------------------------------------------------
# File names


def _add_variant(name: str, variant: str | None) -> str:
    """Insert the variant before the last extension, exactly as diffusers' ``_add_variant``."""
    if variant is None:
        return name
    head, _, ext = name.rpartition(".")
    return f"{head}.{variant}.{ext}"


@dataclass(frozen=True)
class _Layout:
    """The file names of one checkpoint: a weights format (extension) and a variant."""

    ext: str  # SAFETENSORS_EXT or PICKLE_EXT
    variant: str | None

    @property
    def single(self) -> str:
        return _add_variant(WEIGHTS_STEM + self.ext, self.variant)

    @property
    def index(self) -> str:
        return _add_variant(f"{WEIGHTS_STEM}{self.ext}.index.json", self.variant)

    @property
    def is_pickle(self) -> bool:
        return self.ext == PICKLE_EXT

    def shard(self, number: int, count: int) -> str:
        # huggingface_hub formats "{stem}{suffix}{ext}" with suffix "-00001-of-00003".
        stem = self.single[: -len(self.ext)]
        return f"{stem}-{number:05d}-of-{count:05d}{self.ext}"

    def is_shard(self, filename: str) -> bool:
        stem = re.escape(self.single[: -len(self.ext)])
        return re.fullmatch(rf"{stem}-\d{{5}}-of-\d{{5}}{re.escape(self.ext)}", filename) is not None


def _check_variant(variant: str | None) -> None:
    if variant is None:
        return
    if not isinstance(variant, str) or not variant or "/" in variant or os.sep in variant:
        raise CheckpointError(f"variant must be a non-empty name such as 'fp16', got {variant!r}")


# ----------------------------------------------------------------------------------------------
# Sharding


def parse_size(size: int | str) -> int:
    """Bytes from an int or a string like "10GB", "200MB", "10KB" (decimal units, like diffusers)."""
    if isinstance(size, int) and not isinstance(size, bool):
        if size <= 0:
            raise CheckpointError(f"max_shard_size must be a positive number of bytes, got {size}")
        return size
    if not isinstance(size, str):
        raise CheckpointError(f"max_shard_size must be an int or a string like '5GB', got {size!r}")
    text = size.strip()
    unit = text[-2:].upper()
    if unit not in _SIZE_UNITS:
        raise CheckpointError(
            f"max_shard_size {size!r} has no supported unit; use TB, GB, MB or KB, e.g. '5GB'"
        )
    try:
        value = float(text[:-2].strip())
    except ValueError:
        raise CheckpointError(f"max_shard_size {size!r} does not start with a number") from None
    if value <= 0:
        raise CheckpointError(f"max_shard_size must be positive, got {size!r}")
    return int(value * _SIZE_UNITS[unit])


def _plan_shards(state_dict: Mapping[str, torch.Tensor], max_bytes: int) -> list[list[str]]:
    """Group keys into shards the way huggingface_hub's split_torch_state_dict_into_shards does.

    Same walk in key order, so shard names and contents match a diffusers save of the same model:
    a tensor larger than the limit gets a shard of its own right away, while the shard being filled
    stays open, so shard order can interleave. Unlike the hub, tied tensors (which diffusers cannot
    save at all) and empty tensors are placed by key order like the rest, as they arrive untied.
    """
    shards: list[list[str]] = []
    current: list[str] = []
    current_bytes = 0
    for key, tensor in state_dict.items():
        size = tensor.numel() * tensor.element_size()
        if size > max_bytes:
            shards.append([key])
            continue
        if current_bytes + size > max_bytes:
            shards.append(current)
            current, current_bytes = [], 0
        current.append(key)
        current_bytes += size
    if current or not shards:  # an empty model still gets one (empty) weights file
        shards.append(current)
    return shards


def _shard_file_names(layout: _Layout, count: int) -> list[str]:
    if count == 1:
        return [layout.single]
    return [layout.shard(number, count) for number in range(1, count + 1)]


# ----------------------------------------------------------------------------------------------
# Saving


def _tensors_for_save(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous tensors with no two sharing storage.

    safetensors refuses tied tensors (two keys on one storage); a clone per extra key keeps every
    key in the file, so loading stays strict, at the cost of storing the tied weight twice.
    """
    on_meta = [key for key, tensor in state_dict.items() if tensor.device.type == "meta"]
    if on_meta:
        raise CheckpointError(
            f"cannot save tensors that live on the meta device (no data); load weights first: {on_meta}"
        )
    seen_storages: set[tuple[str, int]] = set()
    tensors: dict[str, torch.Tensor] = {}
    for key, tensor in state_dict.items():
        tensor = tensor.detach()
        storage = (str(tensor.device), tensor.untyped_storage().data_ptr())
        if storage in seen_storages and tensor.numel() > 0:
            tensors[key] = tensor.clone(memory_format=torch.contiguous_format)
        else:
            tensors[key] = tensor.contiguous()
        seen_storages.add(storage)
    return tensors


def _to_json_value(value: Any) -> Any:
    """JSON-ready value: tuples become lists, arrays lists, paths strings, as diffusers writes them."""
    if isinstance(value, (list, tuple)):
        return [_to_json_value(item) for item in value]
    if isinstance(value, dict):
        return {str(key): _to_json_value(item) for key, item in value.items()}
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, Path):
        return value.as_posix()
    return value


def _config_json(config: Mapping[str, Any]) -> str:
    if not isinstance(config, Mapping):
        raise TypeError(f"config must be a dict of constructor arguments, got {type(config).__name__}")
    saved = {key: value for key, value in config.items() if key not in _UNSAVED_CONFIG_KEYS}
    saved["_class_name"] = CLASS_NAME
    saved["_diffusers_version"] = DIFFUSERS_VERSION
    return json.dumps(_to_json_value(saved), indent=2, sort_keys=True) + "\n"


def _index_json(
    file_names: list[str], shards: list[list[str]], tensors: Mapping[str, torch.Tensor]
) -> str:
    weight_map = {key: name for name, keys in zip(file_names, shards) for key in keys}
    total_size = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    return json.dumps(index, indent=2, sort_keys=True) + "\n"


def _stage(folder: str, name: str, write: Callable[[str], None]) -> str:
    """Write one file to a temp path in `folder`; on failure nothing of it is left behind."""
    temp_path = temp_path_for(os.path.join(folder, name))
    try:
        write(temp_path)
    except BaseException:
        os.remove(temp_path)
        raise
    return temp_path


def _write_all_atomically(folder: str, writers: dict[str, Callable[[str], None]]) -> None:
    """Stage every file, then move them all into place; a failure while staging changes nothing.

    Moving happens in `writers` order (weights, index, config last), after the slow and fallible
    serialization, so the window in which old and new files coexist is a few renames long.
    """
    staged: dict[str, str] = {}
    try:
        for name, write in writers.items():
            staged[name] = _stage(folder, name, write)
    except BaseException:
        for temp_path in staged.values():
            os.remove(temp_path)
        raise
    for name, temp_path in staged.items():
        commit(temp_path, os.path.join(folder, name))


def _remove_stale_files(folder: str, layout: _Layout, keep: set[str]) -> None:
    """Delete files of an earlier save of this format and variant that the new save did not write.

    Like diffusers this removes old shards, and also the old index or single file, which diffusers
    leaves behind (a stale index would shadow a new single file on load). Other variants and formats
    are left alone.
    """
    for name in os.listdir(folder):
        if name in keep or not os.path.isfile(os.path.join(folder, name)):
            continue
        if name in (layout.single, layout.index) or layout.is_shard(name):
            os.remove(os.path.join(folder, name))


def _tensor_writer(tensors: dict[str, torch.Tensor], safe: bool) -> Callable[[str], None]:
    def write(path: str) -> None:
        if safe:
            # Looked up at call time (not imported by name) so tests can simulate a failing write.
            safetensors.torch.save_file(tensors, path, metadata={"format": "pt"})
        else:
            torch.save(tensors, path)

    return write


def _text_writer(text: str) -> Callable[[str], None]:
    def write(path: str) -> None:
        with open(path, "w", encoding="utf-8") as file:
            file.write(text)

    return write


def save_pretrained(
    model: torch.nn.Module,
    save_directory: str | os.PathLike,
    *,
    config: Mapping[str, Any],
    variant: str | None = None,
    max_shard_size: int | str = "10GB",
    safe_serialization: bool = True,
) -> None:
    """Write `model`'s weights and `config` to `save_directory` in diffusers' layout.

    Files of an earlier save with the same format and variant are replaced; the folder's other
    contents are kept. Every file is written to a temp file first and moved into place only after all
    of them were written.
    """
    _check_variant(variant)
    folder = os.fspath(save_directory)
    if os.path.exists(folder) and not os.path.isdir(folder):
        raise CheckpointError(f"save_directory '{folder}' is a file; expected a folder to save into")
    max_bytes = parse_size(max_shard_size)
    config_text = _config_json(config)
    tensors = _tensors_for_save(model.state_dict())
    os.makedirs(folder, exist_ok=True)

    layout = _Layout(SAFETENSORS_EXT if safe_serialization else PICKLE_EXT, variant)
    shards = _plan_shards(tensors, max_bytes)
    file_names = _shard_file_names(layout, len(shards))

    writers = {
        name: _tensor_writer({key: tensors[key] for key in keys}, safe_serialization)
        for name, keys in zip(file_names, shards)
    }
    if len(shards) > 1:
        writers[layout.index] = _text_writer(_index_json(file_names, shards, tensors))
    writers[CONFIG_NAME] = _text_writer(config_text)

    _write_all_atomically(folder, writers)
    _remove_stale_files(folder, layout, keep=set(writers))


# ----------------------------------------------------------------------------------------------
# Loading files


def _resolve_folder(pretrained_model_path: str | os.PathLike, subfolder: str | None) -> str:
    root = os.fspath(pretrained_model_path)
    if not os.path.exists(root):
        raise CheckpointError(
            f"pretrained_model_path '{root}' does not exist; expected a local folder with config.json "
            "and diffusion_pytorch_model.safetensors (Hub downloads are not supported)"
        )
    folder = os.path.join(root, subfolder) if subfolder else root
    if not os.path.isdir(folder):
        what = f"subfolder '{subfolder}' of '{root}'" if subfolder else f"pretrained_model_path '{root}'"
        raise CheckpointError(f"{what} is not a folder ('{folder}'); expected a model folder")
    return folder


def _read_json(path: str, what: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as file:
            data = json.load(file)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{what} '{path}' is not valid JSON: {err}") from None
    except OSError as err:
        raise CheckpointError(f"cannot read {what} '{path}': {err.strerror or err}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{what} '{path}' must hold a JSON object, got {type(data).__name__}")
    return data


def _read_config(folder: str) -> dict[str, Any]:
    path = os.path.join(folder, CONFIG_NAME)
    if not os.path.isfile(path):
        raise CheckpointError(
            f"'{folder}' has no {CONFIG_NAME}; expected a diffusers model folder "
            f"(config.json plus {WEIGHTS_STEM}.safetensors)"
        )
    return _read_json(path, "config")


def _looks_like_lfs_pointer(path: str) -> bool:
    """A clone made without git-lfs holds small text pointers where the weights should be."""
    try:
        with open(path, "rb") as file:
            return file.read(40).startswith(b"version https://git-lfs")
    except OSError:
        return False


def _load_safetensors(path: str) -> dict[str, torch.Tensor]:
    try:
        return safetensors.torch.load_file(path, device="cpu")
    except (safetensors.SafetensorError, OSError) as err:
        hint = (
            " It is a git-lfs pointer: run `git lfs pull` in the cloned repository."
            if _looks_like_lfs_pointer(path)
            else " The file is corrupt or truncated; save or download it again."
        )
        raise CheckpointError(f"cannot read safetensors file '{path}': {err}.{hint}") from None


def _load_pickle(path: str) -> dict[str, torch.Tensor]:
    try:
        state_dict = torch.load(path, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        raise CheckpointError(
            f"cannot read pickle checkpoint '{path}' with torch.load(weights_only=True): {err}"
        ) from None
    if not isinstance(state_dict, dict) or not all(
        isinstance(key, str) and isinstance(value, torch.Tensor) for key, value in state_dict.items()
    ):
        raise CheckpointError(f"pickle checkpoint '{path}' must hold a dict of name -> tensor")
    return state_dict


def _load_weights_file(path: str, layout: _Layout) -> dict[str, torch.Tensor]:
    return _load_pickle(path) if layout.is_pickle else _load_safetensors(path)


def _load_sharded(folder: str, layout: _Layout) -> dict[str, torch.Tensor]:
    index_path = os.path.join(folder, layout.index)
    weight_map = _read_json(index_path, "shard index").get("weight_map")
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(
            f"shard index '{index_path}' must have a 'weight_map' of tensor name -> file"
        )

    keys_by_shard: dict[str, list[str]] = {}
    for key, shard_name in weight_map.items():
        keys_by_shard.setdefault(shard_name, []).append(key)

    state_dict: dict[str, torch.Tensor] = {}
    for shard_name, keys in keys_by_shard.items():
        # The index is data from the folder: a shard name must not point outside it.
        if os.path.basename(shard_name) != shard_name or shard_name in ("", ".", ".."):
            raise CheckpointError(
                f"shard index '{index_path}' names '{shard_name}', which is not a file name"
            )
        shard_path = os.path.join(folder, shard_name)
        if not os.path.isfile(shard_path):
            raise CheckpointError(
                f"shard '{shard_name}' named by index '{index_path}' is missing from '{folder}'"
            )
        shard = _load_weights_file(shard_path, layout)
        absent = [key for key in keys if key not in shard]
        if absent:
            raise CheckpointError(
                f"shard '{shard_path}' lacks tensors that index '{index_path}' places in it: {absent}"
            )
        state_dict.update(shard)
    return state_dict


def _pickle_refused(path: str) -> CheckpointError:
    return CheckpointError(
        f"'{path}' is a pickle checkpoint, and unpickling can run arbitrary code. "
        "Pass allow_pickle=True to load it anyway (with torch.load(weights_only=True)), "
        "or re-save it as safetensors."
    )


def _missing_weights(folder: str, variant: str | None) -> CheckpointError:
    safe, pickled = _Layout(SAFETENSORS_EXT, variant), _Layout(PICKLE_EXT, variant)
    expected = [safe.single, safe.index, pickled.single, pickled.index]
    which = f"variant {variant!r} of the weights" if variant else "weights"
    present = sorted(os.listdir(folder))
    return CheckpointError(
        f"no {which} in '{folder}': expected one of {expected}; files present: {present}"
    )


def _read_weights(folder: str, variant: str | None, allow_pickle: bool) -> dict[str, torch.Tensor]:
    # Same preference as diffusers: safetensors over pickle, and an index over a single file.
    for layout in (_Layout(SAFETENSORS_EXT, variant), _Layout(PICKLE_EXT, variant)):
        index_path = os.path.join(folder, layout.index)
        single_path = os.path.join(folder, layout.single)
        sharded = os.path.isfile(index_path)
        if not sharded and not os.path.isfile(single_path):
            continue
        if layout.is_pickle and not allow_pickle:
            raise _pickle_refused(index_path if sharded else single_path)
        return _load_sharded(folder, layout) if sharded else _load_weights_file(single_path, layout)
    raise _missing_weights(folder, variant)


def load_pretrained_files(
    pretrained_model_path: str | os.PathLike,
    *,
    subfolder: str | None = None,
    variant: str | None = None,
    allow_pickle: bool = False,
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Read (config dict, state dict on CPU) from a local diffusers model folder.

    Reads single-file or sharded safetensors, or a pickle ``.bin`` only with ``allow_pickle=True``.
    Every problem raises ``CheckpointError`` naming the path and what was expected.
    """
    _check_variant(variant)
    folder = _resolve_folder(pretrained_model_path, subfolder)
    config = _read_config(folder)
    state_dict = _read_weights(folder, variant, allow_pickle)
    return config, state_dict


# ----------------------------------------------------------------------------------------------
# Loading into a model


def _fit_problems(
    expected: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor]
) -> tuple[list[str], list[str], list[str]]:
    """(missing keys, unexpected keys, shape mismatch lines) of `state_dict` against `expected`."""
    missing = [key for key in expected if key not in state_dict]
    unexpected = [key for key in state_dict if key not in expected]
    mismatched = [
        f"{key}: expected {tuple(expected[key].shape)}, got {tuple(state_dict[key].shape)}"
        for key in expected
        if key in state_dict and tuple(expected[key].shape) != tuple(state_dict[key].shape)
    ]
    return missing, unexpected, mismatched


def _fit_report(model_name: str, sections: Mapping[str, list[str]]) -> str:
    lines = [f"state dict does not fit {model_name}:"]
    for title, items in sections.items():
        if items:
            lines.append(f"{title} ({len(items)}):")
            lines += [f"  {item}" for item in items]
    return "\n".join(lines)


def _check_fit(
    model: torch.nn.Module,
    expected: Mapping[str, torch.Tensor],
    state_dict: Mapping[str, torch.Tensor],
    strict: bool,
) -> None:
    """Raise before anything is copied; shape mismatches count even when not strict, as in torch."""
    missing, unexpected, mismatched = _fit_problems(expected, state_dict)
    if not strict:
        if missing or unexpected:
            logger.warning(
                "strict=False: ignoring %d missing and %d unexpected keys", len(missing), len(unexpected)
            )
        missing, unexpected = [], []
    if missing or unexpected or mismatched:
        sections = {
            "missing keys": missing, "unexpected keys": unexpected, "shape mismatches": mismatched
        }
        raise CheckpointError(_fit_report(type(model).__name__, sections))


def _cast(
    state_dict: Mapping[str, torch.Tensor], dtypes: Mapping[str, torch.dtype]
) -> dict[str, torch.Tensor]:
    """Floating tensors converted to the dtype given for their key; others (int buffers) untouched."""
    return {
        key: tensor.to(dtypes[key]) if key in dtypes and tensor.is_floating_point() else tensor
        for key, tensor in state_dict.items()
    }


def load_state_dict_strict(
    model: torch.nn.Module,
    state_dict: Mapping[str, torch.Tensor],
    *,
    strict: bool = True,
    dtype: torch.dtype | None = None,
) -> None:
    """Load `state_dict` into `model` after checking every key and shape; nothing is copied on error.

    Floating tensors end up in `dtype` when given, else in the model's own dtype. A model built on
    the meta device adopts the (cast) tensors with ``assign=True`` instead of copying into storage
    it does not have; a tensor that needed no cast is then shared with `state_dict`, not copied.
    """
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise CheckpointError(
            f"dtype must be a floating torch.dtype such as torch.float16, got {dtype!r}"
        )
    expected = model.state_dict()
    _check_fit(model, expected, state_dict, strict)

    if not any(tensor.device.type == "meta" for tensor in expected.values()):
        if dtype is not None:
            model.to(dtype)  # copy_ would otherwise cast the weights back to the model's dtype
        model.load_state_dict(state_dict, strict=strict)
        return

    left_without_data = [
        key for key, tensor in expected.items() if tensor.device.type == "meta" and key not in state_dict
    ]
    if left_without_data:
        raise CheckpointError(
            f"model is on the meta device and the state dict lacks {left_without_data}; "
            "these would stay without data"
        )
    dtypes = {
        key: dtype or tensor.dtype for key, tensor in expected.items() if tensor.is_floating_point()
    }
    model.load_state_dict(_cast(state_dict, dtypes), strict=strict, assign=True)
