"""prepack_onednn (opt-in CPU pass): convolutions on weights packed once for oneDNN, equal to the original
program; with it, an unfrozen Inductor graph gets the packed kernels too.

Tolerance: the same convolutions in another oneDNN kernel, fp32 max-abs <= 1e-5 x max(1, |ref|).
"""
import pytest
import torch

from compiled_unet import passes
from tests.closeness import assert_close

pytestmark = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")


class ConvsAndTokens(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(4, 8, 3, padding=1)
        self.down = torch.nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False)
        self.tokens = torch.nn.Linear(8, 8)  # a 1x1 conv after linear_to_conv1x1: packed too

    def forward(self, x, scale):
        h = self.down(torch.nn.functional.silu(self.conv(x)))
        t = h.flatten(2).transpose(1, 2)
        return self.tokens(t) * scale, self.conv(x * scale)  # a conv on a runtime-scaled input: still packed


def test_convs_run_on_packed_weights_and_match(g):
    model = ConvsAndTokens().eval()
    x, scale = torch.randn(2, 4, 8, 8), torch.randn(())
    ep = g.export(model, x, scale)
    out, report = passes.optimize(ep, [passes.linear_to_conv1x1, passes.prepack_onednn])
    assert report["prepack_onednn"] == 4
    ops = g.ops(out)
    assert ops.get("aten.conv2d.default", 0) == 0 and ops["mkldnn._convolution_pointwise.default"] == 4
    assert any(k.startswith("onednn_packed.conv.weight") for k in out.constants)
    with torch.no_grad():
        ref = model(x, scale)
    for a, b in zip(out.module()(x, scale), ref):
        assert_close(a, b, scale_tol=1e-5)


def test_unfrozen_inductor_graph_calls_the_packed_kernel():
    """Without freezing Inductor packs nothing itself; the pass's packed weights reach its generated code."""
    from torch._inductor.utils import run_and_get_code

    from compiled_unet.backends.inductor import InductorOptions, JitRunner

    model = ConvsAndTokens().eval()
    x, scale = torch.randn(1, 4, 8, 8), torch.randn(())
    ep, _ = passes.optimize(torch.export.export(model, (x, scale)), [passes.linear_to_conv1x1, passes.prepack_onednn])
    options = InductorOptions(freezing=False, channels_last=False).resolve(torch.device("cpu"))
    runner, codes = run_and_get_code(lambda: JitRunner(ep, options, (x, scale), {}))
    assert "_convolution_pointwise" in "\n".join(codes)
    with torch.no_grad():
        ref = model(x, scale)
    for a, b in zip(runner((x, scale), {}), ref):
        assert_close(a, b, scale_tol=1e-4)


def test_not_in_any_default_list():
    assert passes.prepack_onednn not in passes.default_passes("cpu")
    assert passes.prepack_onednn not in passes.default_passes("cuda")


class _NamedWeights:
    """A stand-in runner that holds the weights under these names (as AOTInductor holds parameters)."""
    kind = "aot"

    def __init__(self, names):
        self.names = list(names)

    def constant_specs(self):
        return {n: None for n in self.names}

    def swap_refusal(self):
        return None  # unfrozen


def test_weight_swap_refuses_packed_constants_it_cannot_reach():
    """derive_weights re-runs the passes on new weights; the packed constants change with them, and a
    compiled graph that holds them under internal names could not follow: a clear error, never stale."""
    from compiled_unet.runtime.compiled import CompiledUNet
    from compiled_unet.runtime.signature import Signature

    model, x, scale = ConvsAndTokens().eval(), torch.randn(1, 4, 8, 8), torch.randn(())
    ep = torch.export.export(model, (x, scale))
    new_weights = ConvsAndTokens().state_dict()
    for pass_list, refused in (([passes.linear_to_conv1x1], False),
                               ([passes.linear_to_conv1x1, passes.prepack_onednn], True)):
        optimized, _ = passes.optimize(ep, pass_list)
        compiled = CompiledUNet(_NamedWeights(optimized.state_dict), Signature.from_call((x, scale), {}), None,
                                exported=ep, optimized=optimized, passes=pass_list)
        if refused:
            with pytest.raises(RuntimeError, match="internal names"):
                compiled.derive_weights(new_weights)
        else:
            derived = compiled.derive_weights(new_weights)
            assert set(derived) == set(optimized.state_dict)
            assert torch.equal(derived["conv.weight"], new_weights["conv.weight"])


class _Attn(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.to_q, self.to_k, self.to_v = (torch.nn.Linear(c, c, bias=False) for _ in range(3))

    def forward(self, x):
        return self.to_q(x) * self.to_k(x) + self.to_v(x)


class TwoAttentions(torch.nn.Module):
    def __init__(self, c=16):
        super().__init__()
        self.a, self.b = _Attn(c), _Attn(c)

    def forward(self, x):
        return self.b(self.a(x))


def test_fused_weights_are_freed_as_they_are_packed(monkeypatch):
    """Memory: each fused Q/K/V weight (made by fuse_qkv, read only by its conv) is dropped as soon as
    prepack_onednn has packed it, so the next packed weight can reuse its memory; the original Q/K/V weights
    stay (the model owns them); and the result matches the model (fp32 max-abs <= 1e-5 x max(1, |ref|))."""
    model, x = TwoAttentions().eval(), torch.randn(1, 8, 16)
    seen, contexts = [], []
    reorder = torch.ops.mkldnn._reorder_convolution_weight

    def spy_reorder(*args):
        seen.append(sorted(k for k in contexts[0].state_dict if "to_qkv" in k))
        return reorder(*args)

    def prepack(gm, ctx):
        contexts.append(ctx)
        return passes.prepack_onednn(gm, ctx)

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_convolution_weight", spy_reorder)
    out, report = passes.optimize(torch.export.export(model, (x,)),
                                  [passes.fuse_qkv, passes.linear_to_conv1x1, prepack])
    assert report["fuse_qkv"] == 2 and report["prepack"] == 2
    assert seen == [["a.to_qkv.weight", "b.to_qkv.weight"], ["b.to_qkv.weight"]]
    with torch.no_grad():
        assert_close(out.module()(x), model(x), scale_tol=1e-5)


def test_donated_projections_are_freed_before_the_next_group_is_fused(monkeypatch):
    """Memory, donated: fuse_qkv frees each module's separate Q/K/V weights right after fusing them, so the fused
    copies never pile up beside the originals (SDXL: 2.4 GB of them, the donated compile's peak 1.25x before);
    the fused program still matches an untouched copy of the model (fp32 max-abs <= 1e-5 x max(1, |ref|))."""
    import copy

    model, x = TwoAttentions().eval(), torch.randn(1, 8, 16)
    reference = copy.deepcopy(model)
    alive_at_each_fusion = []
    cat = torch.cat

    def spy_cat(tensors, *args, **kwargs):
        alive_at_each_fusion.append(sorted(name for name, p in model.named_parameters()
                                           if "to_" in name and p.untyped_storage().nbytes()))
        return cat(tensors, *args, **kwargs)

    ep = torch.export.export(model, (x,))
    monkeypatch.setattr(torch, "cat", spy_cat)
    out, report = passes.optimize(ep, [passes.fuse_qkv], passes.OptimizeConfig(donate_weights=True))
    monkeypatch.undo()
    assert report["fuse_qkv"] == 2
    # One concatenation per module (no biases): module a's, then module b's, when a's projections are gone.
    first, second = alive_at_each_fusion
    assert first == ["a.to_k.weight", "a.to_q.weight", "a.to_v.weight"] + [f"b.to_{k}.weight" for k in "kqv"]
    assert second == [f"b.to_{k}.weight" for k in "kqv"]
    with torch.no_grad():
        assert_close(out.module()(x), reference(x), scale_tol=1e-5)


def test_evaluate_copies_only_what_a_pass_keeps():
    """PassContext.evaluate reads weights without cloning them; a result that is a view of a weight comes back
    as a copy (what a pass keeps must not follow later in-place writes to the model), unless may_alias."""
    model = torch.nn.Linear(4, 4).eval()
    seen = {}

    def probe(gm, ctx):
        w = next(n for n in gm.graph.find_nodes(op="placeholder") if ctx.fqn(n) == "weight")
        with gm.graph.inserting_after(w):
            t = ctx.call(torch.ops.aten.t.default, (w,))
        seen["copy"], seen["alias"] = ctx.evaluate(t), ctx.evaluate(t, may_alias=True)
        gm.graph.erase_node(t)
        return 0

    passes.optimize(torch.export.export(model, (torch.randn(2, 4),)), [probe])
    weight = model.weight.detach()
    for t in seen.values():
        assert torch.equal(t, weight.t())
    assert seen["alias"].untyped_storage().data_ptr() == weight.untyped_storage().data_ptr()
    assert seen["copy"].untyped_storage().data_ptr() != weight.untyped_storage().data_ptr()


class ConvLayouts(torch.nn.Module):
    """3x3 convolutions (one strided, one grouped, one on a channels-last weight) and a 1x1."""

    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(4, 16, 3, padding=1)
        self.b = torch.nn.Conv2d(16, 8, 3, stride=2, padding=1)
        self.g = torch.nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.c = torch.nn.Conv2d(8, 8, 3, padding=1)
        self.c.weight.data = self.c.weight.data.contiguous(memory_format=torch.channels_last)
        self.p = torch.nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.p(self.c(self.g(self.b(self.a(x)))))


def test_weights_are_packed_through_one_channels_last_scratch_bitwise_as_before(monkeypatch):
    """oneDNN's reorder is handed each 3x3 weight as a channels-last copy in one reused buffer (so that it makes no
    copy of its own, which cost half of the page faults of packing SD1.5); the packed weights are bitwise those
    of reordering the plain contiguous weights, and the program matches the model (fp32 <= 1e-5 x max(1, |ref|))."""
    model, x = ConvLayouts().eval(), torch.randn(2, 4, 8, 8)
    reorder = torch.ops.mkldnn._reorder_convolution_weight
    given = []

    def spy_reorder(w, *args):
        given.append((w.is_contiguous(memory_format=torch.channels_last), w.untyped_storage().data_ptr(), tuple(w.shape)))
        return reorder(w, *args)

    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_convolution_weight", spy_reorder)
    out, report = passes.optimize(torch.export.export(model, (x,)), [passes.prepack_onednn])
    monkeypatch.undo()
    assert report["prepack_onednn"] == 5 and all(cl for cl, _, _ in given)
    scratch = {ptr for cl, ptr, shape in given if shape[2:] == (3, 3)} - {model.c.weight.untyped_storage().data_ptr()}
    assert len(scratch) == 1  # a, b and g through the one buffer; c is channels-last already, p is 1x1
    sizes = {"a": [2, 4, 8, 8], "b": [2, 16, 8, 8], "g": [2, 8, 4, 4], "c": [2, 8, 4, 4], "p": [2, 8, 4, 4]}
    strides = {"b": [2, 2]}
    for name, size in sizes.items():
        conv = getattr(model, name)
        expected = reorder(conv.weight.detach().contiguous(), list(conv.padding), strides.get(name, [1, 1]), [1, 1],
                           conv.groups, size)
        packed = out.constants[f"onednn_packed.{name}.weight"]
        assert torch.equal(packed.to_dense(), expected.to_dense()), name
    with torch.no_grad():
        assert_close(out.module()(x), model(x), scale_tol=1e-5)
