"""Small compatibility helpers over torch.utils._pytree across torch 2.9-2.13."""
from __future__ import annotations


def children(spec) -> list:
    """A TreeSpec's child specs (`children()` on new torch, the `children_specs` field on old)."""
    method = getattr(type(spec), "children", None)
    if callable(method):
        return list(spec.children())
    return list(spec.children_specs)
