"""CPU: convolutions with weight-only weights run as oneDNN kernels on weights packed once, here.

`conv2d(x, W, b)` becomes `mkldnn._convolution_pointwise(x, P, b, ...)` where
P = `mkldnn._reorder_convolution_weight(W, ..., input_size)` is computed now and added as a constant:
the weight layout oneDNN picks for this input size and this CPU. The same kernels Inductor's freezing
uses; results equal up to oneDNN's summation order.

Why: on CPU, Inductor packs weights only under freezing, and freezing makes weights constants of the
compiled code (no weight swap, and no sharing of one block's code between block instances). With the
packing done in the graph, an unfrozen compile runs as fast as a frozen one: SD1.5 32x32 with
`linear_to_conv1x1` before it, Inductor jit with `freezing=False`: 494 ms per step vs 491 ms frozen, first
call after 60 s vs 65 s (benchmarks/NOTES.md).

Not in the device pass lists (`default_passes`): `compiled_unet.compile` appends it for the float32 CPU jit
default (`InductorOptions(prepack_weights=True)`), because it belongs to that runtime:
- a packed tensor has layout torch._mkldnn (opaque: only oneDNN ops read it; `.to_dense()` gives the
  weight back), so nothing else may run on it afterwards; and its blocking is specific to this CPU's ISA;
- the jit runner takes packed weights as graph inputs (swap_weights re-runs the passes and re-packs); an
  AOTInductor package would rename these lifted constants, so `swap_weights` refuses there instead of leaving
  them stale.
Run it last.
"""
import logging

import torch
import torch.fx as fx

log = logging.getLogger("passes")
aten = torch.ops.aten


def _convolutions(graph: fx.Graph):
    """(node, x, w, b, stride, padding, dilation, groups) of each fp32 conv2d on a 4-D input."""
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target != aten.conv2d.default:
            continue
        x, w, b, stride, padding, dilation, groups = (list(node.args) + [None, [1, 1], [0, 0], [1, 1], 1][
            len(node.args) - 2:])[:7]
        xv = x.meta.get("val")
        if xv is None or xv.ndim != 4 or xv.dtype != torch.float32 or isinstance(padding, str):
            continue
        stride, padding, dilation = (list(v) if isinstance(v, (list, tuple)) else [v, v]
                                     for v in (stride, padding, dilation))
        yield node, x, w, b, stride, padding, dilation, groups


class ChannelsLastScratch:
    """One float32 buffer that every weight is copied into, channels-last, before its reorder.

    Why: given the input size, oneDNN's weight reorder first makes a channels-last copy of the weight
    (`contiguous(channels_last)`) and reorders that: for a 3x3 weight a fresh buffer as large as the weight,
    which the kernel maps in page by page. Half of the page faults of packing SD1.5 were these copies (1280x2560x3x3:
    118 MB); page faults, not arithmetic, bound the packing (benchmarks/NOTES.md). Reusing one buffer for all
    of them, faulted in once, leaves the reorder nothing to copy. Same bytes in, same packed weight out."""

    def __init__(self, numel: int):
        self._buffer = torch.empty(numel, dtype=torch.float32) if numel else None

    @staticmethod
    def needs_copy(weight_val) -> bool:
        return weight_val.ndim == 4 and not weight_val.is_contiguous(memory_format=torch.channels_last)

    def __call__(self, weight: torch.Tensor) -> torch.Tensor:
        if not self.needs_copy(weight) or self._buffer is None or weight.numel() > self._buffer.numel():
            return weight
        o, i, h, w = weight.shape
        return self._buffer[:weight.numel()].view(o, h, w, i).permute(0, 3, 1, 2).copy_(weight)


def prepack_onednn(gm: fx.GraphModule, ctx) -> int:
    """Rewrite fp32 conv2d with a weight-only weight into a packed oneDNN convolution; returns how many."""
    if not torch.backends.mkldnn.is_available():
        return 0
    weights = [c[2].meta.get("val") for c in _convolutions(gm.graph)]
    scratch = ChannelsLastScratch(max((v.numel() for v in weights
                                       if isinstance(v, torch.Tensor) and ChannelsLastScratch.needs_copy(v)), default=0))
    n = 0
    for node, x, w, b, stride, padding, dilation, groups in _convolutions(gm.graph):  # args read as rewritten
        weight = ctx.evaluate(w, may_alias=True)  # read once here: no copy of each weight
        if weight is None or weight.dtype != torch.float32:
            continue
        packed = torch.ops.mkldnn._reorder_convolution_weight(scratch(weight), padding, stride, dilation, groups,
                                                              list(x.meta["val"].shape))
        base = w.args[0] if w.op == "call_function" and w.args else w  # linear_to_conv1x1: view(W)
        source = ctx.fqn(w) or ctx.fqn(base)
        with gm.graph.inserting_before(node):
            pw = ctx.add_constant(f"onednn_packed.{source or n}", packed)
            y = ctx.call(torch.ops.mkldnn._convolution_pointwise.default,
                         (x, pw, b, padding, stride, dilation, groups, "none", [], ""), like=node)
        node.replace_all_uses_with(y)
        gm.graph.erase_node(node)
        del weight
        ctx.release(w)  # the unpacked weight goes now if nothing else reads it (a fused QKV weight)
        n += 1
    log.info("prepack_onednn: %d convolution(s) on packed weights", n)
    return n
