"""Op categories for overlays and charts: matmul / conv / attention / norm / elementwise / layout / other.

A category is chosen from the ATen op's name (the overload packet, e.g. "conv2d" for aten.conv2d.default),
so it works on any exported UNet (ours or diffusers'), before or after the passes. Non-op nodes
(placeholders, output) are "io".
"""
from __future__ import annotations

import torch.fx as fx

from ..inspect_graph import op_name

CATEGORIES = ("attention", "matmul", "conv", "norm", "elementwise", "layout", "other", "io")

# Colours for Model Explorer node backgrounds and chart bars (colour-blind-safe Okabe-Ito palette).
COLORS = {
    "attention": "#D55E00", "matmul": "#0072B2", "conv": "#009E73", "norm": "#CC79A7",
    "elementwise": "#F0E442", "layout": "#DDDDDD", "other": "#999999", "io": "#FFFFFF",
}

_EXACT = {
    "attention": {"scaled_dot_product_attention", "_scaled_dot_product_flash_attention",
                  "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention_for_cpu",
                  "_scaled_dot_product_cudnn_attention", "softmax", "_softmax", "_safe_softmax"},
    "matmul": {"linear", "mm", "bmm", "addmm", "matmul", "baddbmm", "einsum", "_weight_int8pack_mm"},
    "conv": {"conv2d", "conv1d", "conv3d", "convolution", "_convolution", "conv_transpose2d",
             "mkldnn_convolution", "_convolution_pointwise"},
    "norm": {"group_norm", "native_group_norm", "layer_norm", "native_layer_norm", "batch_norm",
             "_native_batch_norm_legit_no_training", "rms_norm", "_fused_rms_norm"},
    "layout": {"view", "reshape", "_unsafe_view", "permute", "transpose", "t", "expand", "unsqueeze", "squeeze",
               "flatten", "cat", "stack", "split", "split_with_sizes", "chunk", "slice", "select", "narrow",
               "contiguous", "clone", "getitem", "to", "_to_copy", "alias", "detach", "repeat",
               "repeat_interleave", "index", "index_select", "copy_", "copy", "slice_scatter", "pad",
               "constant_pad_nd", "lift_fresh_copy", "upsample_nearest2d", "_upsample_nearest_exact2d",
               "_assert_tensor_metadata", "empty", "zeros", "ones",
               "full", "arange", "zeros_like", "ones_like", "empty_like", "new_zeros", "new_ones", "fill_"},
}
_ELEMENTWISE = {"add", "sub", "mul", "div", "neg", "exp", "log", "sin", "cos", "sqrt", "rsqrt", "pow", "silu",
                "gelu", "relu", "sigmoid", "tanh", "mish", "clamp", "where", "abs", "erf", "maximum", "minimum",
                "mean", "sum", "var", "std", "real", "imag", "reciprocal", "floor", "ceil", "round", "eq", "ne",
                "lt", "gt", "le", "ge", "logical_not", "bitwise_not", "softplus", "hardtanh", "leaky_relu",
                "rsub", "addcmul", "lerp", "masked_fill", "fft_fftn", "fft_ifftn", "fft_fftshift",
                "fft_ifftshift", "amax", "amin", "max", "min", "baddbmm_"}


def category_of_op(name: str) -> str:
    """Category of an op name as `inspect_graph.op_name` gives it ("conv2d", "add.Tensor" -> "add")."""
    base = name.split(".")[0]
    stem = base[:-1] if base.endswith("_") and not base.startswith("_") else base  # in-place: mul_ -> mul
    for cat, names in _EXACT.items():
        if base in names or stem in names:
            return cat
    if base in _ELEMENTWISE or stem in _ELEMENTWISE:
        return "elementwise"
    return "other"


def category(node: fx.Node) -> str:
    if node.op != "call_function":
        return "io"
    return category_of_op(op_name(node))
