"""Fold a per-channel scale `x * v` into the convolutions that produce x (FreeU's backbone b)."""
import logging

import torch
import torch.fx as fx

from ._context import mutated_bases, val, view_base

log = logging.getLogger("passes")
aten = torch.ops.aten


def _conv_parts(node, ctx):
    """(weight node, bias node or None) of a plain 2-D convolution with frozen weights, else None."""
    if node.target is aten.conv2d.default:
        w, b = node.args[1], node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    elif node.target is aten.convolution.default and not node.args[6]:
        w, b = node.args[1], node.args[2]
    else:
        return None
    if ctx.tensor(w) is None or not ctx.is_frozen(w) or (b is not None and (ctx.tensor(b) is None or not ctx.is_frozen(b))):
        return None
    return w, b


def _producers(node, ctx, bases, convs, root=True) -> bool:
    """Collect convolutions that x is a sum of (through add, and scalar mul/div); single-user chain."""
    if not isinstance(node, fx.Node) or node.op != "call_function" or view_base(node) in bases:
        return False
    if not root and len(node.users) != 1:
        return False
    if _conv_parts(node, ctx) is not None:
        convs.append(node)
        return True
    a = node.args
    if node.target is aten.add.Tensor and len(a) == 2 and node.kwargs.get("alpha", 1) == 1:
        return (all(isinstance(t, fx.Node) and val(t).shape == val(node).shape for t in a)
                and _producers(a[0], ctx, bases, convs, False) and _producers(a[1], ctx, bases, convs, False))
    if node.target in (aten.mul.Tensor, aten.div.Tensor) and len(a) == 2 and isinstance(a[1], (int, float)):
        return _producers(a[0], ctx, bases, convs, False)
    return False


def _scale(mul, ctx):
    """mul == x * v with v a frozen per-channel (or scalar) tensor of x's dtype -> (x, v[C]), else None."""
    for x, v in ((mul.args[0], mul.args[1]), (mul.args[1], mul.args[0])):
        if not isinstance(x, fx.Node) or not isinstance(v, fx.Node):
            continue
        xv, vv = val(x), val(v)
        if xv.dim() != 4 or vv.dtype != xv.dtype or val(mul).shape != xv.shape or vv.dim() > 4:
            continue
        shape = (1,) * (4 - vv.dim()) + tuple(vv.shape)
        if shape[0] != 1 or shape[2:] != (1, 1) or shape[1] not in (1, xv.shape[1]):
            continue
        t = ctx.evaluate(v, at=mul)
        if t is not None:
            return x, t.reshape(-1).expand(xv.shape[1])
    return None


def fold_channel_scale(gm: fx.GraphModule, ctx) -> int:
    """x * v (v constant per channel, x = sum of convs) -> convs with scaled weights and biases."""
    graph, n = gm.graph, 0
    bases = mutated_bases(graph)
    for mul in [m for m in graph.nodes if m.op == "call_function" and m.target is aten.mul.Tensor]:
        hit = _scale(mul, ctx)
        if hit is None:
            continue
        x, v = hit
        convs: list = []
        if len(x.users) != 1 or not _producers(x, ctx, bases, convs) or len(set(convs)) != len(convs):
            log.info("freeu: %s has no foldable producer; kept as one channel-scale multiply", mul)
            continue
        for conv in convs:
            w, b = _conv_parts(conv, ctx)
            wt = ctx.tensor(w)
            vc = v.to(wt.dtype)
            name = ctx.fqn(w) or w.name
            w2 = ctx.add_constant(name + "_scaled", wt * vc.view(-1, *([1] * (wt.dim() - 1))))
            conv.replace_input_with(w, w2)
            if b is not None:
                b2 = ctx.add_constant((ctx.fqn(b) or b.name) + "_scaled", ctx.tensor(b) * vc)
                conv.replace_input_with(b, b2)
        mul.replace_all_uses_with(x)
        graph.erase_node(mul)
        n += 1
    log.info("fold_channel_scale: %d channel scale(s) folded into conv weights", n)
    return n
