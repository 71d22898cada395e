"""Replace dropout that cannot drop anything (eval mode or p == 0) by its input."""
import logging

import torch
import torch.fx as fx

log = logging.getLogger("passes")
aten = torch.ops.aten

_DROPOUTS = {aten.dropout.default, aten.feature_dropout.default, aten.alpha_dropout.default,
             aten.feature_alpha_dropout.default}


def remove_dropout(gm: fx.GraphModule, ctx) -> int:
    """Replace dropout(x, p, train) by x when train is False or p == 0; returns how many."""
    n = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target not in _DROPOUTS:
            continue
        x = node.args[0]
        p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p")
        train = node.args[2] if len(node.args) > 2 else node.kwargs.get("train")
        if train is False or p == 0:
            node.replace_all_uses_with(x)
            gm.graph.erase_node(node)
            n += 1
    log.info("remove_dropout: %d dropout(s) removed", n)
    return n
