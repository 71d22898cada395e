"""diffusers' per-head mask copy (repeat_interleave over heads, view to (B, h, Lq, L)) -> one broadcast mask."""
import logging

import torch
import torch.fx as fx

from ._context import val

log = logging.getLogger("passes")
aten = torch.ops.aten

_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default}


def _per_head(mask):
    """mask == view(repeat_interleave(m, h, dim=0), (B, h, Lq, L)) -> m (B, Lq, L) (to unsqueeze), or
    mask == repeat_interleave(m4, h, dim=1) with m4 (B, 1, Lq, L) -> m4 (already broadcastable); else None."""
    if isinstance(mask, fx.Node) and mask.target is aten.repeat_interleave.self_int:
        m4 = mask.args[0]
        dim = mask.args[2] if len(mask.args) > 2 else mask.kwargs.get("dim")
        if val(m4).dim() == 4 and dim is not None and dim % 4 == 1 and val(m4).shape[1] == 1:
            return m4
        return None
    if not isinstance(mask, fx.Node) or mask.target not in _VIEWS:
        return None
    rep = mask.args[0]
    if rep.target is not aten.repeat_interleave.self_int:
        return None
    m = rep.args[0]
    h = rep.args[1]
    dim = rep.args[2] if len(rep.args) > 2 else rep.kwargs.get("dim")
    mv, out = val(m), val(mask)
    if dim != 0 or mv is None or mv.dim() != 3 or out.dim() != 4:
        return None
    if tuple(out.shape) != (mv.shape[0], h, mv.shape[1], mv.shape[2]):
        return None
    return m


def broadcast_attention_mask(gm: fx.GraphModule, ctx) -> int:
    """SDPA attn_mask built per head -> unsqueeze(m, 1) broadcast over heads (one per mask source)."""
    graph, n, cache = gm.graph, 0, {}
    for sdpa in [s for s in graph.nodes if s.op == "call_function" and s.target is aten.scaled_dot_product_attention.default]:
        pos = 3 if len(sdpa.args) > 3 else None
        mask = sdpa.args[3] if pos else sdpa.kwargs.get("attn_mask")
        m = _per_head(mask)
        if m is None:
            continue
        if m not in cache:
            if val(m).dim() == 4:
                cache[m] = m
            else:
                with graph.inserting_after(m):
                    cache[m] = ctx.call(aten.unsqueeze.default, (m, 1), like=mask)
        if pos:
            sdpa.update_arg(3, cache[m])
        else:
            sdpa.update_kwarg("attn_mask", cache[m])
        n += 1
    log.info("broadcast_attention_mask: %d SDPA mask(s) broadcast over heads", n)
    return n
