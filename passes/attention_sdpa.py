"""Hand-written attention (bmm/baddbmm + scale + mask + softmax (+ upcast) + bmm) -> SDPA.

diffusers' AttnProcessor computes, on head-folded (B*h, L, d) tensors,
    probs = softmax(baddbmm(mask or empty, q, k^T, beta=1 or 0, alpha=scale)).to(dtype); out = bmm(probs, v)
This becomes scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale); when q, k, v come from
head_to_batch_dim (reshape -> permute(0, 2, 1, 3) -> reshape) the SDPA runs on the (B, h, L, d) tensors
and the mask is viewed per head, so `broadcast_attention_mask` can later drop the per-head copy.
"""
import logging
import math

import torch
import torch.fx as fx

from ._context import val

log = logging.getLogger("passes")
aten = torch.ops.aten

_CASTS = {aten.to.dtype, aten._to_copy.default, aten.to.dtype_layout}
_RESHAPES = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}
_SOFTMAX = {aten.softmax.int, aten._softmax.default}
SDPA = aten.scaled_dot_product_attention.default


def _strip_casts(node):
    while isinstance(node, fx.Node) and node.op == "call_function" and node.target in _CASTS:
        node = node.args[0]
    return node


def _is_last_two_transpose(node):
    if node.op != "call_function":
        return False
    nd = val(node).dim()
    if node.target is aten.transpose.int:
        return sorted(d % nd for d in node.args[1:3]) == [nd - 2, nd - 1]
    if node.target is aten.permute.default:
        return list(node.args[1]) == list(range(nd - 2)) + [nd - 1, nd - 2]
    return False


def _scores(node):
    """node == scale * q @ k^T (+ mask) -> (q, k, mask, scale) or None."""
    node = _strip_casts(node)
    scale = 1.0
    while node.op == "call_function" and node.target in (aten.mul.Tensor, aten.div.Tensor) \
            and isinstance(node.args[1], (int, float)):
        scale = scale * node.args[1] if node.target is aten.mul.Tensor else scale / node.args[1]
        node = node.args[0]
    mask = None
    if node.target is aten.baddbmm.default:
        inp, q, kt = node.args[:3]
        beta, alpha = node.kwargs.get("beta", 1), node.kwargs.get("alpha", 1)
        if beta not in (0, 1):
            return None
        mask = inp if beta == 1 else None
        scale *= alpha
    elif node.target in (aten.bmm.default, aten.matmul.default):
        q, kt = node.args[:2]
    else:
        return None
    if not isinstance(kt, fx.Node) or not _is_last_two_transpose(kt):
        return None
    return _strip_casts(q), _strip_casts(kt.args[0]), mask, scale


def match_attention(out: fx.Node):
    """out == bmm(softmax(scores, -1), v) -> (q, k, v, mask, scale) or None."""
    if out.op != "call_function" or out.target not in (aten.bmm.default, aten.matmul.default):
        return None
    probs, v = out.args[:2]
    sm = _strip_casts(probs)
    if sm.op != "call_function" or sm.target not in _SOFTMAX or len(sm.users) != 1:
        return None
    if sm.args[1] % val(sm).dim() != val(sm).dim() - 1:
        return None
    hit = _scores(sm.args[0])
    if hit is None:
        return None
    q, k, mask, scale = hit
    v = _strip_casts(v)
    qv, kv, vv = val(q), val(k), val(v)
    if not (qv.dtype == kv.dtype == vv.dtype == val(out).dtype) or qv.dim() != 3:
        return None
    if mask is not None and val(mask).dtype != qv.dtype and val(_strip_casts(mask)).dtype == qv.dtype:
        mask = _strip_casts(mask)  # the mask was upcast along with q and k
    if mask is not None and val(mask).dtype != qv.dtype:
        return None
    return q, k, v, mask, scale


def head_split(t3):
    """t3 == reshape(permute(reshape(x, (B, L, h, d)), (0, 2, 1, 3)), (B*h, L, d)) -> the (B, h, L, d) node."""
    if not isinstance(t3, fx.Node) or t3.target not in _RESHAPES:
        return None
    p = t3.args[0]
    if p.op != "call_function" or p.target is not aten.permute.default or list(p.args[1]) != [0, 2, 1, 3]:
        return None
    B, h, L, d = val(p).shape
    return p if tuple(val(t3).shape) == (B * h, L, d) else None


def emit_sdpa(ctx, q, k, v, mask, scale, like, readers):
    """SDPA equal to attention on (N, L, d) tensors, lifted to (B, h, L, d) when the head split is visible.
    Returns (new node, node it replaces): `like` (the (N, Lq, dv) result) or, when its only reader is
    batch_to_head_dim's reshape to (B, h, Lq, dv), that reshape."""
    ps = [head_split(t) for t in (q, k, v)]
    N, Lq, _ = val(q).shape
    dv = val(v).shape[-1]
    kw = {} if scale == val(q).shape[-1] ** -0.5 else {"scale": float(scale)}
    if all(p is not None for p in ps) and len({tuple(val(p).shape[:2]) for p in ps}) == 1:
        B, h = val(ps[0]).shape[:2]
        m4 = None
        if mask is not None:
            mv = val(mask)
            if mv.dim() == 3 and mv.shape[0] == N:
                m4 = ctx.call(aten.reshape.default, (mask, [B, h, mv.shape[1], mv.shape[2]]), like=like)
            elif mv.dim() <= 2 or (mv.dim() == 3 and mv.shape[0] == 1):
                m4 = mask
        if mask is None or m4 is not None:
            o4 = ctx.call(SDPA, (ps[0], ps[1], ps[2], m4), kw, like=like)
            user = readers[0] if len(readers) == 1 else None
            if user is not None and user.target in _RESHAPES and tuple(val(user).shape) == (B, h, Lq, dv):
                return o4, user  # batch_to_head_dim's first reshape is the 4-D result itself
            return ctx.call(aten.reshape.default, (o4, [N, Lq, dv]), like=like), like
    return ctx.call(SDPA, (q, k, v, mask), kw, like=like), like


def attention_to_sdpa(gm: fx.GraphModule, ctx) -> int:
    """Replace hand-written attention (diffusers' AttnProcessor, get_attention_scores) by SDPA."""
    graph, n = gm.graph, 0
    for out in [b for b in graph.nodes if b.op == "call_function" and b.target in (aten.bmm.default, aten.matmul.default)]:
        hit = match_attention(out)
        if hit is None:
            continue
        q, k, v, mask, scale = hit
        if not math.isfinite(scale):
            continue
        with graph.inserting_before(out):
            new, replaced = emit_sdpa(ctx, q, k, v, mask, scale, out, list(out.users))
        replaced.replace_all_uses_with(new)
        n += 1
    log.info("attention_to_sdpa: %d hand-written attention(s) -> SDPA", n)
    return n
