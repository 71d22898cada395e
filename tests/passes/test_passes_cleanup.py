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


def test_dead_code_rule_drops_unused_random_ops_and_keeps_writes():
    """The runner's DCE (torch.fx's, with our purity rule): an unused SDPA (tagged nondeterministic_seeded
    for its dropout) goes, an unused pure op goes, an in-place write into an input stays."""
    from compiled_unet.passes._runner import _has_effect

    aten = torch.ops.aten
    graph = torch.fx.Graph()
    x = graph.placeholder("x")
    graph.call_function(aten.scaled_dot_product_attention.default, (x, x, x))
    graph.call_function(aten.sin.default, (x,))
    write = graph.call_function(aten.add_.Tensor, (x, 1))
    graph.output(x)
    graph.eliminate_dead_code(is_impure_node=_has_effect)
    assert [n.target for n in graph.nodes if n.op == "call_function"] == [aten.add_.Tensor]
    assert write in graph.nodes


def test_writes_found_locally_match_the_graph_scan(g):
    """PassContext.dependencies finds in-place writes from a tensor's users (no graph scan): the same
    writes mutated_bases finds by scanning the whole graph."""
    from compiled_unet.passes._context import mutated_bases, view_base, writes_into

    class Writes(nn.Module):
        def forward(self, x):
            acc = torch.zeros(4, 4)
            acc[:2] = x[:2]                 # through a view
            acc[2:].mul_(3)                 # another view
            y = x.clone()
            y.add_(1)                       # directly
            return acc + y

    ep = g.export(Writes(), torch.randn(4, 4))
    scan = mutated_bases(ep.graph)
    assert sum(len(w) for w in scan.values()) >= 3
    for n in ep.graph.nodes:
        base = view_base(n)
        assert writes_into(base) == scan.get(base, [])


def test_signature_index_stays_in_step_with_the_graph(g):
    """Weights added and dropped by passes: the program's input specs name its placeholders, in order."""
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.to_q, self.to_k, self.to_v = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    class QKV(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = Attn()
            self.register_buffer("w", torch.randn(4))

        def forward(self, x):
            a = self.attn
            return a.to_q(x) * a.to_k(x) + a.to_v(x) * self.w.exp()    # exp(w): weight-only, folded

    ep2, rep = g.optimize(g.export(QKV(), torch.randn(2, 4)), passes.fuse_qkv, passes.constant_fold)
    assert rep["fuse_qkv"] == 1 and rep["constant_fold"] == 1
    names = [n.name for n in ep2.graph.nodes if n.op == "placeholder"]
    assert names == [s.arg.name for s in ep2.graph_signature.input_specs]
    assert set(ep2.state_dict) | set(ep2.constants) == {s.target for s in ep2.graph_signature.input_specs
                                                       if s.target is not None}


def _count_code_generations(monkeypatch) -> list:
    """Counts how often any graph's Python code is generated (torch.fx.Graph.python_code)."""
    calls = []
    real = torch.fx.Graph.python_code

    def counted(self, *args, **kwargs):
        calls.append(len(self.nodes))
        return real(self, *args, **kwargs)

    monkeypatch.setattr(torch.fx.Graph, "python_code", counted)
    return calls


def test_optimize_generates_code_once(g, monkeypatch):
    # The runner's working copy generates no code per pass (nor at its copy or its final recompile): only the
    # returned program's module makes it, once. Each generation of SD1.5's graph costs ~0.05 s.
    x = torch.randn(2, 3, 4)
    ep = g.export(Noisy(), x)
    calls = _count_code_generations(monkeypatch)
    ep2, rep = g.optimize(ep, passes.remove_asserts, passes.remove_dropout, passes.remove_noops)
    assert rep["remove_noops"] >= 4
    assert len(calls) == 1
    assert torch.equal(g.run(ep2, x), g.run(ep, x))


def test_lazy_graph_module_makes_code_when_needed(monkeypatch):
    gm = torch.fx.symbolic_trace(Noisy().eval())
    calls = _count_code_generations(monkeypatch)
    lazy = passes.lazy_graph_module(gm, gm.graph)
    lazy.recompile()
    assert calls == []                                   # not at construction, not at recompile
    x = torch.randn(2, 3, 4)
    assert torch.equal(lazy(x), gm(x)) and len(calls) == 1  # made at the first call
    assert "def forward" in lazy.code and len(calls) == 1    # and kept
