"""Sliced attention (diffusers' set_attention_slice) <-> one SDPA.

`merge_sliced_attention` (default): diffusers' SlicedAttnProcessor writes attention of head slices into a
zeros buffer (`out[s:e] = attn(q[s:e], k[s:e], v[s:e], mask[s:e])`); once `attention_to_sdpa` made each
slice an SDPA, the buffer (or a `cat` of the slices along dim 0) becomes one SDPA over all heads. `SliceAttention(slice_size)` (opt-in) does
the reverse, for memory: each SDPA over more than slice_size heads runs in head slices and a cat.
"""
import collections
import logging

import torch
import torch.fx as fx

from ._context import val
from .attention_sdpa import SDPA, emit_sdpa

log = logging.getLogger("passes")
aten = torch.ops.aten

_BUFFERS = {aten.zeros.default, aten.empty.memory_format, aten.new_zeros.default, aten.new_empty.default}


def _slice0(node):
    """node == t[s:e] along dim 0 -> (t, s, e) with e clamped, else None."""
    if not isinstance(node, fx.Node) or node.target is not aten.slice.Tensor:
        return None
    a = list(node.args) + [None] * (5 - len(node.args))
    t, dim, s, e, step = a[:5]
    if dim != 0 or step not in (None, 1):
        return None
    s = s or 0
    return t, s, s + val(node).shape[0]


def _sdpa_parts(node):
    if node.target is not SDPA:
        return None
    args = list(node.args) + [None] * (4 - len(node.args))
    q, k, v, mask = args[:4]
    mask = node.kwargs.get("attn_mask", mask)
    rest = {k_: v_ for k_, v_ in node.kwargs.items() if k_ != "attn_mask"}
    if len(node.args) > 4 or rest.get("dropout_p", 0.0) != 0.0 or rest.get("is_causal", False):
        return None
    return q, k, v, mask, rest.get("scale")


def merge_sliced_attention(gm: fx.GraphModule, ctx) -> int:
    """zeros buffer filled by SDPA over consecutive head slices -> one SDPA over all heads."""
    graph, n = gm.graph, 0
    groups = collections.defaultdict(list)
    for c in graph.nodes:
        if c.op == "call_function" and c.target is aten.copy_.default and _slice0(c.args[0]) is not None:
            buf = c.args[0].args[0]
            if buf.op == "call_function" and buf.target in _BUFFERS:
                groups[buf].append(c)
    order = {x: i for i, x in enumerate(graph.nodes)}
    for buf, copies in groups.items():
        N = val(buf).shape[0]
        parts, ok = [], True
        for c in copies:
            _, s, e = _slice0(c.args[0])
            src = c.args[1]
            sp = _sdpa_parts(src) if isinstance(src, fx.Node) else None
            if sp is None or len(src.users) != 1 or len(c.args[0].users) != 1 or c.users:
                ok = False
                break
            sl = [_slice0(t) if t is not None else (None, s, e) for t in sp[:4]]
            if any(x is None or (x[1], x[2]) != (s, e) for x in sl):
                ok = False
                break
            parts.append((s, e, tuple(x[0] for x in sl), sp[4]))
        if not ok or not parts:
            continue
        parts.sort(key=lambda p: p[0])
        spans = [(p[0], p[1]) for p in parts]
        if spans[0][0] != 0 or spans[-1][1] != N or any(a[1] != b[0] for a, b in zip(spans, spans[1:])) \
                or len({p[2] for p in parts}) != 1 or len({p[3] for p in parts}) != 1:
            continue
        last = max(copies, key=order.__getitem__)
        readers = [u for u in buf.users if u.target is not aten.slice.Tensor or u not in {c.args[0] for c in copies}]
        if any(order[u] < order[last] for u in readers):
            continue
        q, k, v, mask = parts[0][2]
        scale = parts[0][3]
        scale = val(q).shape[-1] ** -0.5 if scale is None else scale
        with graph.inserting_before(last.next):
            new, replaced = emit_sdpa(ctx, q, k, v, mask, scale, last, readers)
        if replaced is last:
            for u in readers:
                u.replace_input_with(buf, new)
        else:
            replaced.replace_all_uses_with(new)
        for c in copies:
            graph.erase_node(c)
        n += 1
    for cat in [c for c in graph.nodes if c.op == "call_function" and c.target is aten.cat.default]:
        n += _merge_cat(cat, ctx)
    log.info("merge_sliced_attention: %d sliced attention(s) -> one SDPA", n)
    return n


def _merge_cat(cat, ctx) -> int:
    """cat([SDPA(q[s:e], k[s:e], v[s:e], mask[s:e]) for consecutive slices], dim=0) -> one SDPA."""
    items = cat.args[0]
    dim = cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    if dim != 0 or len(items) < 2:
        return 0
    parts = []
    for src in items:
        sp = _sdpa_parts(src) if isinstance(src, fx.Node) else None
        if sp is None or len(src.users) != 1:
            return 0
        sl = [_slice0(t) for t in sp[:3]]
        if any(x is None for x in sl) or len({(x[1], x[2]) for x in sl}) != 1:
            return 0
        s, e = sl[0][1], sl[0][2]
        m = (None, s, e) if sp[3] is None else _slice0(sp[3])
        if m is None or (m[1], m[2]) != (s, e):
            return 0
        parts.append((s, e, (sl[0][0], sl[1][0], sl[2][0], m[0]), sp[4]))
    spans = [(p[0], p[1]) for p in parts]
    if spans[0][0] != 0 or spans[-1][1] != val(cat).shape[0] or any(a[1] != b[0] for a, b in zip(spans, spans[1:])) \
            or len({p[2] for p in parts}) != 1 or len({p[3] for p in parts}) != 1:
        return 0
    q, k, v, mask = parts[0][2]
    scale = val(q).shape[-1] ** -0.5 if parts[0][3] is None else parts[0][3]
    with cat.graph.inserting_before(cat):
        new, replaced = emit_sdpa(ctx, q, k, v, mask, scale, cat, list(cat.users))
    replaced.replace_all_uses_with(new)
    return 1


class SliceAttention:
    """Opt-in: run each SDPA over more than `slice_size` heads as SDPAs over head slices plus a cat."""

    def __init__(self, slice_size: int):
        if not isinstance(slice_size, int) or slice_size < 1:
            raise ValueError(f"slice_size must be a positive int, got {slice_size!r}")
        self.slice_size = slice_size
        self.name = f"slice_attention({slice_size})"

    def __call__(self, gm: fx.GraphModule, ctx) -> int:
        graph, n = gm.graph, 0
        for node in [x for x in graph.nodes if x.op == "call_function" and x.target is SDPA]:
            parts = _sdpa_parts(node)
            if parts is None:
                continue
            q, k, v, mask, scale = parts
            dim = 1 if val(q).dim() == 4 else 0
            H = val(q).shape[dim]
            if H <= self.slice_size:
                continue
            kw = {} if scale is None else {"scale": scale}
            outs = []
            with graph.inserting_before(node):
                for s in range(0, H, self.slice_size):
                    e = min(H, s + self.slice_size)
                    sl = [ctx.call(aten.slice.Tensor, (t, dim, s, e), like=node) for t in (q, k, v)]
                    m = mask
                    if mask is not None and val(mask).dim() == val(q).dim() and val(mask).shape[dim] == H:
                        m = ctx.call(aten.slice.Tensor, (mask, dim, s, e), like=node)
                    outs.append(ctx.call(SDPA, (*sl, m), kw, like=node))
                cat = ctx.call(aten.cat.default, (outs, dim), like=node)
            node.replace_all_uses_with(cat)
            graph.erase_node(node)
            n += 1
        log.info("%s: %d SDPA(s) sliced", self.name, n)
        return n
