"""CPU: token-wise linear layers as MKL GEMMs on weights packed once, here (the alternative to
`linear_to_conv1x1` + `prepack_onednn` where MKL is the faster kernel).

`linear(x, W, b)` with x: [B, N, C] becomes `compiled_unet::mkl_linear(x.view(B*N, C), P, W, b).view(B, N, O)`
where P = `mkl._mkl_reorder_linear_weight(W, B*N)` is computed now and added as a constant: MKL's packed GEMM
layout for this row count. The op runs `mkl._mkl_linear`, the kernel Inductor's freezing uses for linears on
CPU (Inductor lowers that op only for frozen constants, so the unfrozen jit graph calls it through this
custom op). Results equal up to MKL's summation order. W stays an input (MKL falls back to it for another
row count).

Why: which kernel runs the transformer GEMMs faster depends on the CPU. On an Intel Xeon (2 cores, AVX-512)
MKL's packed GEMM ran SD1.5's linear shapes ~13% faster than oneDNN 1x1 convolutions (62.7 vs 70.8 ms over 16
shapes), the gap between ours and the freezing recipe there; on AMD EPYC the 1x1 convolutions were 1.4x
faster (benchmarks/NOTES.md). Run it after `fuse_qkv`, instead of `linear_to_conv1x1`.
"""
import logging
from typing import Optional

import torch
import torch.fx as fx

from ._context import token_linears

log = logging.getLogger("passes")
aten = torch.ops.aten


@torch.library.custom_op("compiled_unet::mkl_linear", mutates_args=())
def mkl_linear(x: torch.Tensor, packed: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    return torch.ops.mkl._mkl_linear(x, packed, weight, bias, x.shape[0])


@mkl_linear.register_fake
def _(x, packed, weight, bias):
    return x.new_empty((x.shape[0], weight.shape[0]))


def prepack_mkl_linear(gm: fx.GraphModule, ctx) -> int:
    """Rewrite fp32 3-D-input aten.linear with a weight-only weight into a packed MKL linear; returns how many."""
    if not (torch.backends.mkl.is_available() and hasattr(torch.ops.mkl, "_mkl_linear")):
        return 0
    n = 0
    for node, x, w, b in token_linears(gm.graph):
        if x.meta["val"].dtype != torch.float32:
            continue
        weight = ctx.evaluate(w, may_alias=True)
        if weight is None or weight.dtype != torch.float32:
            continue
        batch, tokens, channels = x.meta["val"].shape
        rows, out = batch * tokens, weight.shape[0]
        packed = torch.ops.mkl._mkl_reorder_linear_weight(weight.contiguous(), rows)
        with gm.graph.inserting_before(node):
            pw = ctx.add_constant(f"mkl_packed.{ctx.fqn(w) or n}", packed)
            x2 = ctx.call(aten.reshape.default, (x, [rows, channels]), like=node)
            y = ctx.call(torch.ops.compiled_unet.mkl_linear.default, (x2, pw, w, b), like=node)
            y = ctx.call(aten.reshape.default, (y, [batch, tokens, out]), like=node)
        node.replace_all_uses_with(y)
        gm.graph.erase_node(node)
        del weight
        n += 1
    log.info("prepack_mkl_linear: %d linear(s) on packed MKL weights", n)
    return n


def unpack_mkl_linear(gm: fx.GraphModule, ctx) -> int:
    """The inverse, for a graph that leaves the jit runtime (an AOTInductor package of a jit-compiled UNet): each
    `compiled_unet::mkl_linear` goes back to `aten.linear` on its original weight (Inductor's freezing packs it
    for MKL in the package again) and the packed constant is dropped, so the package needs no custom op."""
    n = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_function" or node.target != torch.ops.compiled_unet.mkl_linear.default:
            continue
        x, _packed, w, b = node.args
        with gm.graph.inserting_before(node):
            y = ctx.call(aten.linear.default, (x, w, b), like=node)
        node.replace_all_uses_with(y)
        gm.graph.erase_node(node)
        n += 1
    return n
