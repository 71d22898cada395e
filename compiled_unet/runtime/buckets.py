"""`ShapeBuckets`: compiled UNets for several static shapes behind one forward, dispatched by exact shapes.

Every bucket is its own compiled graph, so there is nothing that could recompile: a call either matches one
bucket's signature exactly or raises a ValueError listing the available shapes. Built by
`compiled_unet.buckets.compile_buckets`; saved and loaded as one folder by `compiled_unet.save` / `load`.
"""
from __future__ import annotations

import json
from typing import Mapping, Sequence

import torch

from .compiled import SKELETON_ATTRIBUTES, CompiledUNet


def describe_shapes(c: CompiledUNet) -> str:
    return "{" + ", ".join(f"{k}: {list(v)}" for k, v in c.signature.shapes.items()) + "}"


class ShapeBuckets(torch.nn.Module):
    """Compiled UNets for several static shapes behind one forward; dispatch by exact input shapes."""

    def __init__(self, buckets: Sequence[CompiledUNet]):
        super().__init__()
        if not buckets:
            raise ValueError("ShapeBuckets needs at least one compiled UNet")
        seen = set()
        for b in buckets:
            if not isinstance(b, CompiledUNet):
                raise TypeError(f"ShapeBuckets holds CompiledUNet objects, got {type(b).__name__}")
            key = json.dumps(b.signature.to_json(), sort_keys=True)
            if key in seen:
                raise ValueError(f"two buckets compiled for the same inputs: {describe_shapes(b)}")
            seen.add(key)
        self.buckets = list(buckets)  # a plain list: CompiledUNet holds no parameters to register

    def __getattr__(self, name: str):
        # What pipelines read (the skeleton's module attributes): the first bucket's; every bucket is the same UNet.
        if name in SKELETON_ATTRIBUTES and "buckets" in self.__dict__:
            return getattr(self.__dict__["buckets"][0], name)
        return super().__getattr__(name)

    @property
    def in_channels(self) -> int:
        return self.buckets[0].in_channels

    @property
    def config(self):
        return self.buckets[0].config

    @property
    def dtype(self) -> torch.dtype:
        return self.buckets[0].dtype

    @property
    def device(self) -> torch.device:
        return self.buckets[0].device

    def to(self, *args, **kwargs):
        for b in self.buckets:
            b.to(*args, **kwargs)
        return self

    def available(self) -> list[str]:
        return [describe_shapes(b) for b in self.buckets]

    def select(self, *args, **inputs) -> CompiledUNet:
        """The bucket compiled for exactly these inputs, or a ValueError listing the available shapes."""
        inputs.pop("return_dict", None)
        for b in self.buckets:
            if b.accepts(*args, **inputs):
                return b
        sample = args[0] if args else inputs.get("sample")
        given = {"sample": list(sample.shape) if torch.is_tensor(sample) else sample}
        given.update({k: list(v.shape) for k, v in inputs.items() if torch.is_tensor(v)})
        given.update({k: "given" for k, v in inputs.items() if v is not None and not torch.is_tensor(v)})
        dtype = sample.dtype if torch.is_tensor(sample) else None
        raise ValueError(f"no compiled bucket for inputs {given} (dtype {dtype}); available buckets:\n  "
                         + "\n  ".join(self.available()))

    def forward(self, *args, return_dict: bool = True, **inputs):
        return self.select(*args, **inputs)(*args, return_dict=return_dict, **inputs)

    def enable_freeu(self, s1: float, s2: float, b1: float, b2: float) -> None:
        for b in self.buckets:
            b.enable_freeu(s1, s2, b1, b2)

    def disable_freeu(self) -> None:
        for b in self.buckets:
            b.disable_freeu()

    def swap_weights(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True) -> None:
        """New weights into every bucket, no recompiles (see CompiledUNet.swap_weights). Every bucket checks
        the weights before any bucket loads them, so a refusal leaves all buckets on the old weights."""
        derived = [b.derive_weights(state_dict) if b._exported is not None and not set(state_dict) <= set(b.weight_names())
                   else state_dict for b in self.buckets]
        for b, sd in zip(self.buckets, derived):
            b.check_weights(sd, strict=strict)
        for b, sd in zip(self.buckets, derived):
            b.swap_weights(sd, strict=strict)
