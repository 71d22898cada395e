"""Fold weight-only subgraphs (no user input upstream) into constants of the program."""
import logging

import torch
import torch.fx as fx

from ._context import is_view_op, mutated_bases, val, view_base

log = logging.getLogger("passes")

_MAX_NUMEL = 1 << 24


def constant_fold(gm: fx.GraphModule, ctx) -> int:
    """Replace each computed node that depends only on frozen tensors and feeds a runtime node by a constant.

    Views of a single weight are left alone (folding them would only copy the weight), as is anything
    written in place."""
    graph, n = gm.graph, 0
    bases = mutated_bases(graph)
    runtime: dict[fx.Node, bool] = {}
    for node in graph.nodes:  # runtime[x]: x depends on a user input or a non-frozen tensor
        if node.op == "placeholder":
            runtime[node] = not ctx.is_frozen(node)
        elif node.op == "call_function":
            t = node.target
            impure = isinstance(t, torch._ops.OpOverload) and (
                t._schema.is_mutable or torch.Tag.nondeterministic_seeded in t.tags)
            runtime[node] = impure or view_base(node) in bases or any(runtime.get(a, True) for a in node.all_input_nodes)
        else:
            runtime[node] = True
    for node in list(graph.nodes):
        if node.op != "call_function" or runtime[node] or not isinstance(val(node), torch.Tensor):
            continue
        if not any(runtime.get(u, True) for u in node.users):
            continue  # not on the frontier: a later node folds it
        if is_view_op(node.target) and all(a.op == "placeholder" for a in node.all_input_nodes):
            continue
        if val(node).numel() > _MAX_NUMEL:
            continue
        t = ctx.evaluate(node, max_nodes=10_000)
        if t is None:
            continue
        c = ctx.add_constant(f"_folded.{node.name}", t)
        node.replace_all_uses_with(c)
        n += 1
    log.info("constant_fold: %d weight-only subgraph(s) folded", n)
    return n
