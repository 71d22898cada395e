"""Clean-up passes: asserts, dropout, no-ops, constant folding; the runner and its report."""
import io

import pytest
import torch
import torch.nn as nn

from compiled_unet import passes


class Noisy(nn.Module):
    def __init__(self):
        super().__init__()
        self.drop = nn.Dropout(0.5)
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        y = self.lin(x.to(torch.float32))          # same-dtype cast
        y = self.drop(y)                           # eval dropout
        y = y.permute(0, 2, 1).contiguous()        # contiguous feeding a non-view op
        y = torch.sin(y) / 1.0                     # x / 1
        return y.reshape(y.shape) + 0              # same-shape reshape, x + 0


def test_cleanups_fire_and_outputs_match(g):
    x = torch.randn(2, 3, 4)
    ep = g.export(Noisy(), x)
    ep2, rep = g.optimize(ep, passes.remove_asserts, passes.remove_dropout, passes.remove_noops)
    assert rep["remove_dropout"] == 1
    assert rep["remove_noops"] >= 4
    assert g.count(ep2, "dropout", "contiguous", "div", "to.dtype", "add") == 0
    assert g.count(ep2, "_assert") == 0
    assert torch.equal(g.run(ep2, x), g.run(ep, x))


class NotNoops(nn.Module):
    def forward(self, x):
        a = x.to(torch.float64)                    # a real cast
        b = x.permute(0, 2, 1).contiguous().view(-1)  # view needs the contiguous copy
        c = x.clone()
        c.add_(1)                                  # clone protects x from the in-place add
        return a, b, c, x * 2


def test_noops_negative(g):
    x = torch.randn(2, 3, 4)
    ep = g.export(NotNoops(), x)
    ep2, rep = g.optimize(ep, passes.remove_noops)
    assert rep["remove_noops"] == 0
    for got, ref in zip(g.run(ep2, x), NotNoops()(x)):
        assert torch.equal(got, ref)


def test_dropout_in_training_is_kept(g):
    m = nn.Dropout(0.5).train()
    ep = torch.export.export(m, (torch.randn(8),), strict=False)
    ep2, rep = g.optimize(ep, passes.remove_dropout)
    assert rep["remove_dropout"] == 0 and g.count(ep2, "dropout") == 1


class Folds(nn.Module):
    def __init__(self):
        super().__init__()
        self.register_buffer("w", torch.randn(4))

    def forward(self, x):
        freqs = torch.exp(torch.arange(4, dtype=torch.float32) * -0.5) * self.w   # weight-only
        acc = torch.zeros(4)
        acc[:2] = x[:2]                                                       # written in place: not foldable
        return x * freqs + acc


def test_constant_fold(g):
    x = torch.randn(4)
    m = Folds()
    ep = g.export(m, x)
    ep2, rep = g.optimize(ep, passes.constant_fold)
    assert rep["constant_fold"] == 1
    assert g.count(ep2, "arange", "exp") == 0 and g.count(ep2, "zeros") == 1
    assert torch.equal(g.run(ep2, x), m(x))
    # a buffer treated as a runtime tensor is not folded into the constant
    ep3, rep3 = g.optimize(ep, passes.constant_fold, config=passes.OptimizeConfig(fold_buffers=False))
    assert rep3["constant_fold"] == 1 and "b_w" in {n.name for n in ep3.graph.nodes}
    assert torch.equal(g.run(ep3, x), m(x))


def test_report_lists_every_pass_and_zero_counts(g):
    ep = g.export(nn.Linear(3, 3), torch.randn(2, 3))
    ep2, rep = passes.optimize(ep)
    assert list(rep.rewrites) == [passes.pass_name(p) for p in passes.DEFAULT_PASSES]
    assert rep["fuse_qkv"] == 0 and rep["freeu_fourier"] == 0
    table = rep.table(["aten.linear.default"])
    assert all(passes.pass_name(p) in table for p in passes.DEFAULT_PASSES)
    assert rep.nodes_before >= rep.nodes_after
    assert "linear" in str(rep)  or rep.ops_before == rep.ops_after


def test_result_is_a_normal_exported_program(g):
    x = torch.randn(2, 3, 4)
    ep2, _ = g.optimize(g.export(Noisy(), x))
    assert torch.equal(ep2.run_decompositions().module()(x), g.run(ep2, x))
    buf = io.BytesIO()
    torch.export.save(ep2, buf)
    buf.seek(0)
    assert torch.equal(g.run(torch.export.load(buf), x), g.run(ep2, x))


def test_custom_pass_signature(g):
    seen = {}

    def count_linears(gm, ctx):
        """Counts, rewrites nothing."""
        seen["n"] = sum(n.target is torch.ops.aten.linear.default for n in gm.graph.nodes)
        return 0

    ep2, rep = passes.optimize(g.export(nn.Linear(3, 3), torch.randn(2, 3)), [count_linears])
    assert seen == {"n": 1} and rep.rewrites == {"count_linears": 0}


def test_config_validates():
    with pytest.raises(TypeError):
        passes.OptimizeConfig(fold_buffers="yes")
