"""CPU: token-wise linear layers as 1x1 convolutions over a channels_last view (oneDNN instead of MKL).

`linear(x, W, b)` with x: [B, N, C] becomes `conv2d(x', W[:, :, None, None], b)` where
x' = x.view(B, N, 1, C).permute(0, 3, 1, 2) is a [B, C, N, 1] tensor whose channels_last strides are x's
own memory (no copy), and the result is permuted and reshaped back to [B, N, O]. The same dot products in
another kernel: results equal up to fp32 summation order.

Why: with Inductor freezing on CPU, linears run as prepacked MKL GEMMs and convs as prepacked oneDNN
kernels; measured here (AMD EPYC, 2 cores, SD1.5 at 32x32), the transformer GEMMs ran 1.4x faster as oneDNN
1x1 convolutions (690 -> 491 ms per UNet forward; benchmarks/NOTES.md). Not in the device-neutral default
list: on CUDA cuBLAS GEMMs are the fast path. `passes.default_passes(device)` adds it for CPU.
"""
import logging

import torch
import torch.fx as fx

from ._context import token_linears

log = logging.getLogger("passes")
aten = torch.ops.aten


def linear_to_conv1x1(gm: fx.GraphModule, ctx) -> int:
    """Rewrite 3-D-input aten.linear into view/permute + 1x1 conv2d + permute/reshape; returns how many."""
    n = 0
    for node, x, w, b in token_linears(gm.graph):
        batch, tokens, channels = x.meta["val"].shape
        out = w.meta["val"].shape[0]
        with gm.graph.inserting_before(node):
            x4 = ctx.call(aten.view.default, (x, [batch, tokens, 1, channels]), like=node)
            x4 = ctx.call(aten.permute.default, (x4, [0, 3, 1, 2]), like=node)        # [B, C, N, 1]
            w4 = ctx.call(aten.view.default, (w, [out, channels, 1, 1]), like=node)
            y = ctx.call(aten.conv2d.default, (x4, w4, b), like=node)                  # [B, O, N, 1]
            y = ctx.call(aten.permute.default, (y, [0, 2, 3, 1]), like=node)
            y = ctx.call(aten.reshape.default, (y, [batch, tokens, out]), like=node)
        node.replace_all_uses_with(y)
        gm.graph.erase_node(node)
        n += 1
    log.info("linear_to_conv1x1: %d linear(s) now 1x1 convolutions", n)
    return n
