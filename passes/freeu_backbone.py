"""FreeU backbone scale written as an in-place slice write -> one functional channel-scale multiply.

diffusers multiplies by a Python float, which ATen computes in the op-math dtype (float32 for bf16/fp16,
float64 for fp64) and rounds once; the functional multiply does the same (x upcast, scale in op-math
dtype, result cast back), so the rewrite is bit-exact in every dtype.
"""
import logging

import torch
import torch.fx as fx

from ._context import val

log = logging.getLogger("passes")
aten = torch.ops.aten


def _channel_slice(node, x=None):
    """node == x[:, 0:k] (aten.slice on dim 1, from 0, step 1) -> (x, k), else None."""
    if not (isinstance(node, fx.Node) and node.op == "call_function" and node.target is aten.slice.Tensor):
        return None
    a = list(node.args) + [None] * (5 - len(node.args))
    src, dim, start, end, step = a[:5]
    if (x is not None and src is not x) or dim != 1 or start not in (0, None) or step not in (1, None):
        return None
    v = val(node)
    return (src, v.shape[1]) if isinstance(v, torch.Tensor) else None


def freeu_backbone(gm: fx.GraphModule, ctx) -> int:
    """`x[:, :k] = x[:, :k] * b` (diffusers' apply_freeu) -> `x * v`, v = (b,)*k + (1,)*(C-k) per channel."""
    graph, n = gm.graph, 0
    order = {node: i for i, node in enumerate(graph.nodes)}
    for copy in [c for c in graph.nodes if c.op == "call_function" and c.target is aten.copy_.default]:
        dst, src = copy.args[0], copy.args[1]
        hit = _channel_slice(dst)
        if hit is None or copy.users or not isinstance(src, fx.Node) or src.target is not aten.mul.Tensor:
            continue
        x, k = hit
        a, b = src.args[0], src.args[1]
        if _channel_slice(a, x) is None:
            a, b = b, a
        if _channel_slice(a, x) is None or _channel_slice(a, x)[1] != k:
            continue
        xv = val(x)
        if not (isinstance(xv, torch.Tensor) and xv.dim() == 4 and x.op == "call_function"):
            continue
        if isinstance(b, fx.Node) and not (isinstance(val(b), torch.Tensor) and val(b).numel() == 1):
            continue
        # everything that reads x before the write must be part of this pattern
        pattern = {dst, a, src, copy}
        early = [u for u in x.users if order[u] < order[copy] and u not in pattern]
        if early or len(src.users) != 1 or len(a.users) != 1 or len(dst.users) != 1:
            continue
        C = xv.shape[1]
        opmath = torch.promote_types(xv.dtype, torch.float32)
        if isinstance(b, fx.Node):
            cond = ctx.add_constant(f"_freeu.channel_mask_{C}_{k}", (torch.arange(C) < k).view(C, 1, 1))
        else:
            v = torch.ones(C, 1, 1, dtype=opmath)
            v[:k] = b
            scale = ctx.add_constant("_freeu.backbone_scale", v)
        with graph.inserting_before(copy.next):
            if isinstance(b, fx.Node):
                scale = ctx.call(aten.where.ScalarOther, (cond, b, 1.0), like=src)
                if val(scale).dtype != opmath:
                    scale = ctx.call(aten.to.dtype, (scale, opmath), like=src)
            xo = x if opmath == xv.dtype else ctx.call(aten.to.dtype, (x, opmath), like=src)
            y = ctx.call(aten.mul.Tensor, (xo, scale), like=src)
            if opmath != xv.dtype:
                y = ctx.call(aten.to.dtype, (y, xv.dtype), like=src)
        for u in list(x.users):
            if u is not y and order.get(u, -1) > order[copy]:
                u.replace_input_with(x, y)
        graph.erase_node(copy)
        n += 1
    log.info("freeu_backbone: %d in-place channel scale(s) made functional", n)
    return n
