"""Drop runtime assertion and metadata-check nodes (shapes are static; they only block rewrites)."""
import logging

import torch
import torch.fx as fx

log = logging.getLogger("passes")
aten = torch.ops.aten

_ASSERTS = {
    getattr(aten, name).default
    for name in ("_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range", "sym_constrain_range_for_size",
                 "_assert_async")
    if hasattr(aten, name) and hasattr(getattr(aten, name), "default")
}
if hasattr(aten, "_assert_async") and hasattr(aten._assert_async, "msg"):
    _ASSERTS.add(aten._assert_async.msg)


def remove_asserts(gm: fx.GraphModule, ctx) -> int:
    """Erase assertion/metadata nodes (_assert_tensor_metadata, _assert_scalar, ...); returns how many."""
    n = 0
    for node in list(gm.graph.nodes):
        if node.op == "call_function" and node.target in _ASSERTS and not node.users:
            gm.graph.erase_node(node)
            n += 1
    log.info("remove_asserts: %d node(s) erased", n)
    return n
