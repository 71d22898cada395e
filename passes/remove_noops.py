"""Replace value-preserving nodes (same-dtype casts, same-shape views, clones, x*1, x+0) by their input."""
import logging

import torch
import torch.fx as fx

from ._context import is_view_op, mutated_bases, val, view_base

log = logging.getLogger("passes")
aten = torch.ops.aten

_CASTS = {aten.to.dtype, aten.to.dtype_layout, aten._to_copy.default, aten.to.device, aten.type_as.default}
_SHAPE_OPS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.expand.default,
              aten.alias.default, aten.detach.default, aten.view_as.default, aten.reshape_as.default,
              aten.expand_as.default}
_COPIES = {aten.contiguous.default, aten.clone.default}
_IDENTITY_SCALAR = {aten.mul.Tensor: 1, aten.div.Tensor: 1, aten.add.Tensor: 0, aten.sub.Tensor: 0,
                    aten.mul.Scalar: 1, aten.div.Scalar: 1}
_NEEDS_CONTIGUOUS = {aten.view.default, aten._unsafe_view.default}


def _same_meta(a, b) -> bool:
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
            and a.dtype == b.dtype and a.device == b.device)


def _feeds_view(node: fx.Node) -> bool:
    """Does any view descendant of node need a contiguous layout (aten.view)?"""
    todo, seen = [node], {node}
    while todo:
        for u in todo.pop().users:
            if u.op == "call_function" and u.target in _NEEDS_CONTIGUOUS:
                return True
            if u.op == "call_function" and is_view_op(u.target) and u not in seen:
                seen.add(u)
                todo.append(u)
    return False


def _is_noop(node: fx.Node) -> bool:
    t, args = node.target, node.args
    if not args or not isinstance(args[0], fx.Node) or not _same_meta(val(args[0]), val(node)):
        return False
    if t in _CASTS:
        mf = node.kwargs.get("memory_format")
        return mf in (None, torch.preserve_format) and not _feeds_view(node)
    if t in _SHAPE_OPS:
        return True
    if t is aten.slice.Tensor:
        return (args[4] if len(args) > 4 else node.kwargs.get("step", 1)) == 1
    if t in _COPIES:
        return not _feeds_view(node)
    if t in _IDENTITY_SCALAR:
        other = args[1] if len(args) > 1 else None
        alpha = node.kwargs.get("alpha", 1)
        return (isinstance(other, (int, float)) and not isinstance(other, bool)
                and other == _IDENTITY_SCALAR[t] and alpha == 1)
    return False


def remove_noops(gm: fx.GraphModule, ctx) -> int:
    """Replace no-op nodes by their input (skipping anything whose storage is written in place)."""
    bases = mutated_bases(gm.graph)
    n = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or not _is_noop(node):
            continue
        x = node.args[0]
        if view_base(x) in bases or view_base(node) in bases or node in bases:
            continue
        node.replace_all_uses_with(x)
        gm.graph.erase_node(node)
        n += 1
    log.info("remove_noops: %d no-op node(s) removed", n)
    return n
