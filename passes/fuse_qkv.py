"""Fuse linear projections of one attention layer that read the same input into one matmul + split."""
import collections
import logging
import operator

import torch
import torch.fx as fx

from ._context import val

log = logging.getLogger("passes")
aten = torch.ops.aten

_FUSED_NAMES = {("to_q", "to_k", "to_v"): "to_qkv", ("to_k", "to_v"): "to_kv",
                ("add_k_proj", "add_v_proj"): "add_kv_proj", ("add_q_proj", "add_k_proj", "add_v_proj"): "add_qkv_proj"}


def _linear(node, ctx):
    """(x, weight, bias) of aten.linear with frozen 2-D weight (and bias), else None."""
    if node.op != "call_function" or node.target is not aten.linear.default:
        return None
    x, w = node.args[0], node.args[1]
    b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
    if ctx.tensor(w) is None or not ctx.is_frozen(w) or val(w).dim() != 2:
        return None
    if b is not None and (ctx.tensor(b) is None or not ctx.is_frozen(b)):
        return None
    return x, w, b


def _module(ctx, w):
    """FQN of the attention module owning weight w ('a.attn1' for 'a.attn1.to_q.weight')."""
    fqn = ctx.fqn(w) or w.name
    parts = fqn.split(".")
    return ".".join(parts[:-2]) if len(parts) > 2 else fqn, parts[-2] if len(parts) > 1 else fqn


def fuse_qkv(gm: fx.GraphModule, ctx) -> int:
    """Linears of one module reading the same tensor (Q,K,V; cross K,V; added K,V) -> linear + split."""
    graph, n = gm.graph, 0
    groups = collections.defaultdict(list)
    for node in graph.nodes:
        hit = _linear(node, ctx)
        if hit is not None:
            groups[(hit[0], _module(ctx, hit[1])[0])].append((node, *hit))
    for (x, module), members in groups.items():
        if len(members) < 2:
            continue
        ws = [ctx.tensor(m[2]) for m in members]
        if len({(w.shape[1], w.dtype, w.device) for w in ws}) != 1:
            log.info("fuse_qkv: %s projections differ in width/dtype/device; not fused", module)
            continue
        has_bias = {m[3] is not None for m in members}
        if len(has_bias) != 1:
            log.info("fuse_qkv: %s mixes biased and unbiased projections; not fused", module)
            continue
        leaves = tuple(_module(ctx, m[2])[1] for m in members)
        fused = _FUSED_NAMES.get(leaves, "fused_" + "_".join(leaves))
        w = ctx.add_parameter(f"{module}.{fused}.weight", torch.cat(ws, 0))
        b = ctx.add_parameter(f"{module}.{fused}.bias", torch.cat([ctx.tensor(m[3]) for m in members])) \
            if has_bias == {True} else None
        first = members[0][0]
        sizes = [t.shape[0] for t in ws]
        with graph.inserting_before(first):
            y = ctx.call(aten.linear.default, (x, w) if b is None else (x, w, b), like=first)
            parts = ctx.call(aten.split_with_sizes.default, (y, sizes, -1), like=first)
            for i, (node, *_rest) in enumerate(members):
                item = ctx.call(operator.getitem, (parts, i), like=node)
                node.replace_all_uses_with(item)
        for node, _x, weight, bias in members:
            graph.erase_node(node)
            # The separate weights go now, not at the clean-up after the pass: donated, their memory is freed
            # before the next group's fused copy is made (SDXL's 2.4 GB of fused weights had piled up: its donated
            # compile peaked at 1.26x the weights instead of 1.08x, benchmarks/NOTES.md).
            for tensor_node in (weight, bias):
                if tensor_node is not None:
                    ctx.release(tensor_node)
        n += 1
        log.info("fuse_qkv: %s %s -> %s", module, "+".join(leaves), fused)
    log.info("fuse_qkv: %d projection group(s) fused", n)
    return n
