"""FX passes on exported ATen graphs of UNet2DConditionModel (ours or diffusers').

Every pass is a callable ``pass_fn(gm: torch.fx.GraphModule, ctx: PassContext) -> int`` that rewrites
``gm.graph`` in place and returns how many rewrites it made (0 is reported, never hidden). A pass
creates nodes with ``ctx.call`` (which sets ``node.meta["val"]``) and weights with ``ctx.add_constant`` /
``ctx.add_parameter`` (which register them in the program's graph signature). After each pass the runner
removes dead writes, dead code and unused weights and lints; the module's code is regenerated once, after the
last pass.

    from compiled_unet import passes     # the repo's passes/ folder, installed as compiled_unet.passes
    ep2, report = passes.optimize(torch.export.export(unet, args, kwargs))
    print(report)            # rewrites per pass, node and op counts after each pass

Passes match the graph torch.export produces (the training IR: aten.linear, aten.conv2d,
aten.scaled_dot_product_attention, in-place slice writes). Matchers are hand-written node walks rather
than traced pattern functions because static shapes appear as literal arguments (view sizes,
repeat counts) that a traced pattern would pin to one shape.
"""
import torch

from ._context import OptimizeConfig, PassContext, free_storage
from ._runner import (PassReport, PassStat, cleanup, lazy_graph_module, op_counts, optimize, pass_name,
                      with_weights)
from .attention_mask import broadcast_attention_mask
from .attention_sdpa import attention_to_sdpa
from .constant_fold import constant_fold
from .fold_channel_scale import fold_channel_scale
from .freeu_backbone import freeu_backbone
from .freeu_fourier import freeu_fourier
from .fuse_qkv import fuse_qkv
from .linear_to_conv1x1 import linear_to_conv1x1
from .prepack_mkl_linear import prepack_mkl_linear, unpack_mkl_linear
from .prepack_onednn import prepack_onednn
from .remove_asserts import remove_asserts
from .remove_dropout import remove_dropout
from .remove_noops import remove_noops
from .sliced_attention import SliceAttention, merge_sliced_attention

# The default order. Clean-ups first (they expose the patterns), FreeU before QKV fusion, hand-written
# and sliced attention become SDPA before the mask rewrite (which works on SDPA), folding last.
DEFAULT_PASSES = (
    remove_asserts,
    remove_dropout,
    remove_noops,
    freeu_backbone,
    freeu_fourier,
    fold_channel_scale,
    attention_to_sdpa,
    merge_sliced_attention,
    broadcast_attention_mask,
    fuse_qkv,
    constant_fold,
)

# Device-specific additions, run after the default list (see each pass's docstring for the measurement).
# On CPU, `compiled_unet.compile` swaps linear_to_conv1x1 for prepack_mkl_linear where MKL's GEMM measured faster
# (InductorOptions.linear_kernel).
CPU_PASSES = (linear_to_conv1x1,)


def default_passes(device=None) -> tuple:
    """The default pass list for a target device: DEFAULT_PASSES, plus CPU_PASSES on CPU."""
    kind = torch.device(device).type if device is not None else "cpu"
    return DEFAULT_PASSES + (CPU_PASSES if kind == "cpu" else ())


__all__ = [
    "CPU_PASSES", "DEFAULT_PASSES", "OptimizeConfig", "PassContext", "PassReport", "PassStat", "SliceAttention", "attention_to_sdpa",
    "broadcast_attention_mask", "cleanup", "constant_fold", "default_passes", "fold_channel_scale", "free_storage", "freeu_backbone", "freeu_fourier",
    "fuse_qkv", "lazy_graph_module", "linear_to_conv1x1", "merge_sliced_attention", "op_counts", "optimize", "pass_name", "prepack_mkl_linear", "prepack_onednn",
    "remove_asserts", "remove_dropout",
    "remove_noops", "unpack_mkl_linear", "with_weights",
]
