"""linear_to_conv1x1: token-wise linears become 1x1 convolutions (CPU pass list only).

Tolerance: the same dot products in another kernel, fp32 max-abs <= 1e-5 x max(1, |ref|).
"""
import torch

from compiled_unet import passes
from tests.closeness import assert_close


class TokensAndVector(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.tokens = torch.nn.Linear(8, 12)            # on [B, N, C]: rewritten
        self.no_bias = torch.nn.Linear(12, 6, bias=False)
        self.vector = torch.nn.Linear(8, 4)             # on [B, C]: left alone

    def forward(self, x, v):
        return self.no_bias(torch.relu(self.tokens(x))), self.vector(v)


def test_token_linears_become_1x1_convs(g):
    model = TokensAndVector().eval()
    x, v = torch.randn(2, 5, 8), torch.randn(2, 8)
    ep = g.export(model, x, v)
    out, report = passes.optimize(ep, [passes.linear_to_conv1x1])
    assert report["linear_to_conv1x1"] == 2
    ops = g.ops(out)
    assert ops["aten.conv2d.default"] == 2 and ops["aten.linear.default"] == 1
    with torch.no_grad():
        ref = model(x, v)
    for a, b in zip(out.module()(x, v), ref):
        assert_close(a, b, scale_tol=1e-5)


def test_cpu_default_list_adds_it_and_cuda_does_not():
    assert passes.default_passes("cpu")[-1] is passes.linear_to_conv1x1
    assert passes.linear_to_conv1x1 not in passes.default_passes("cuda")
    assert passes.default_passes("cuda") == passes.DEFAULT_PASSES


def test_not_fired_on_4d_inputs(g):
    class FourD(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = torch.nn.Linear(4, 4)

        def forward(self, x):
            return self.lin(x)

    ep = g.export(FourD(), torch.randn(1, 2, 3, 4))
    _, report = passes.optimize(ep, [passes.linear_to_conv1x1])
    assert report["linear_to_conv1x1"] == 0
