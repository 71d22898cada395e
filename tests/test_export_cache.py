"""compiled_unet/export_cache.py: a stored graph is the graph export gives, keyed by everything the trace reads;
anything the key cannot describe is exported every time; a damaged entry is a miss, never a wrong graph.

The end-to-end case (a second process, other weights, through Inductor) is in tests/test_compile_cache.py.
"""
from __future__ import annotations

import hashlib
import os
import pickle

import pytest
import torch
from torch._dynamo.utils import counters
from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

from cases import build, inputs_for
from compiled_unet import export_cache
from compiled_unet.compile import _export_with_freeu_inputs, _float_timestep
from compiled_unet.export import export


@pytest.fixture
def cache(tmp_path):
    with temporary_cache_dir(str(tmp_path)):
        counters[export_cache.COUNTERS].clear()
        yield tmp_path / export_cache.FOLDER


def _inputs(batch=2, hw=(8, 8)):
    (sample, timestep), kwargs = inputs_for("sd", batch=batch, hw=hw)
    return sample, _float_timestep(timestep, sample), kwargs


def _key(model, sample, t, kwargs):
    from compiled_unet.export import export_inputs

    args, kw = export_inputs(sample, t, **kwargs)
    return export_cache.key(model, args, kw)


def _export_twice(model, sample, t, kwargs):
    """(fresh program, the program the second call reads from the cache), checking the counters."""
    fresh, freeu = _export_with_freeu_inputs(model, sample, t, kwargs)
    assert counters[export_cache.COUNTERS]["export_cache_stored"] == 1, dict(counters[export_cache.COUNTERS])
    cached, freeu_again = _export_with_freeu_inputs(model, sample, t, kwargs)
    assert counters[export_cache.COUNTERS]["export_cache_hit"] == 1, dict(counters[export_cache.COUNTERS])
    assert freeu == freeu_again
    return fresh, cached


def _same_meta(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return (a.shape, a.stride(), a.dtype, a.device, a.storage_offset()) == (
            b.shape, b.stride(), b.dtype, b.device, b.storage_offset())
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same_meta(x, y) for x, y in zip(a, b))
    return a == b


def _assert_same_program(fresh, cached, model, sample, t, kwargs):
    assert cached.graph_module.code == fresh.graph_module.code
    assert cached.graph_signature == fresh.graph_signature
    assert cached.call_spec == fresh.call_spec and cached.module_call_graph == fresh.module_call_graph
    assert [n.name for n in cached.graph.nodes] == [n.name for n in fresh.graph.nodes]
    for a, b in zip(fresh.graph.nodes, cached.graph.nodes):
        assert a.meta.keys() == b.meta.keys(), a.name
        for k in a.meta:
            assert _same_meta(a.meta[k], b.meta[k]), (a.name, k)
    # The weights are the model's own tensors, attached by name, as export attaches them.
    assert list(cached.state_dict) == list(fresh.state_dict)
    assert all(cached.state_dict[k] is fresh.state_dict[k] for k in fresh.state_dict)
    assert cached.constants.keys() == fresh.constants.keys()
    with torch.no_grad():
        got = cached.module()(sample, t, **kwargs)
        want = model(sample, t, **kwargs, return_dict=False)
    assert torch.equal(got[0], fresh.module()(sample, t, **kwargs)[0])
    torch.testing.assert_close(got[0], want[0], rtol=0, atol=1e-5)  # same graph as eager: fp32, near-bitwise


def test_a_stored_graph_is_the_exported_graph_with_the_models_own_weights(cache):
    model = build("sd", seed=0)
    sample, t, kwargs = _inputs()
    fresh, cached = _export_twice(model, sample, t, kwargs)
    _assert_same_program(fresh, cached, model, sample, t, kwargs)
    assert len(os.listdir(cache)) == 1


def test_freeu_scales_stay_graph_inputs_through_the_cache(cache):
    model = build("sd", seed=0)
    model.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    sample, t, kwargs = _inputs()
    fresh, cached = _export_twice(model, sample, t, kwargs)
    assert "forward" not in vars(model)  # the tracing wrapper is gone either way
    assert any(s.arg.name.startswith("freeu") for s in cached.graph_signature.input_specs if s.kind.name == "USER_INPUT")
    assert cached.graph_module.code == fresh.graph_module.code
    scales = fresh.example_inputs[1]["freeu_scales"]
    with torch.no_grad():
        assert torch.equal(cached.module()(sample, t, **kwargs, freeu_scales=scales)[0],
                           fresh.module()(sample, t, **kwargs, freeu_scales=scales)[0])


def test_a_model_with_other_weights_reads_the_entry_and_gets_its_own_weights(cache):
    first, second = build("sd", seed=0), build("sd", seed=1)
    sample, t, kwargs = _inputs()
    _export_with_freeu_inputs(first, sample, t, kwargs)
    program, _ = _export_with_freeu_inputs(second, sample, t, kwargs)
    assert counters[export_cache.COUNTERS]["export_cache_hit"] == 1
    params = dict(second.named_parameters())
    assert all(program.state_dict[k] is params[k] for k in program.graph_signature.parameters)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(sample, t, **kwargs)[0],
                                   second(sample, t, **kwargs, return_dict=False)[0], rtol=0, atol=1e-5)


@pytest.mark.parametrize("change", ["shape", "dtype", "processor", "freeu", "attribute", "class_attribute", "tied",
                                    "source", "default_dtype"])
def test_the_key_changes_with_what_the_trace_reads(change, monkeypatch):
    model = build("sd", seed=0)
    sample, t, kwargs = _inputs()
    before = _key(model, sample, t, kwargs)
    assert before is not None and before == _key(build("sd", seed=3), sample, t, kwargs)  # weights are not in it
    if change == "shape":
        sample, t, kwargs = _inputs(hw=(16, 8))
    elif change == "dtype":
        sample = sample.double()
    elif change == "processor":
        from compiled_unet.processors import AttnProcessor

        model.set_attn_processor(AttnProcessor())
    elif change == "freeu":
        model.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    elif change == "attribute":
        next(m for m in model.modules() if type(m).__name__ == "Attention").scale *= 2
    elif change == "tied":  # one tensor for two convolutions: export gives it one input
        resnet = model.down_blocks[0].resnets[0]
        resnet.conv2.weight = resnet.conv1.weight
    elif change == "class_attribute":  # a forward reading self.<name> finds the class's value
        from compiled_unet.attention import Attention

        monkeypatch.setattr(Attention, "upcast_softmax_default", True, raising=False)
    elif change == "source":
        monkeypatch.setattr(export_cache, "_code_version", lambda: "another version of the library")
    elif change == "default_dtype":
        torch.set_default_dtype(torch.float64)
    try:
        after = _key(model, sample, t, kwargs)
    finally:
        torch.set_default_dtype(torch.float32)
    assert after is not None and after != before


def _replace_split_heads(monkeypatch):
    import compiled_unet.processors as processors

    monkeypatch.setattr(processors, "_split_heads", lambda x, heads: x)


def _replace_a_method(monkeypatch):
    from compiled_unet.attention import Attention

    monkeypatch.setattr(Attention, "forward", lambda self, *a, **k: None)


def _replace_sdpa(monkeypatch):
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", lambda *a, **k: None)


@pytest.mark.parametrize("refusal", ["hook", "instance_forward", "class_method", "library_function", "library_constant",
                                     "torch_function", "foreign_processor", "function_mode", "disabled"])
def test_what_the_key_cannot_describe_is_exported_every_time(refusal, monkeypatch):
    model = build("sd", seed=0)
    sample, t, kwargs = _inputs()
    if refusal == "hook":
        model.mid_block.register_forward_hook(lambda m, i, o: o * 2)
    elif refusal == "instance_forward":
        model.conv_in.forward = lambda x: x
    elif refusal == "class_method":
        _replace_a_method(monkeypatch)
    elif refusal == "library_function":
        _replace_split_heads(monkeypatch)
    elif refusal == "library_constant":
        import compiled_unet.blocks as blocks

        monkeypatch.setattr(blocks, "NO_CONDITIONING", blocks.Conditioning())
    elif refusal == "torch_function":
        _replace_sdpa(monkeypatch)
    elif refusal == "foreign_processor":
        class MyProcessor:
            def __call__(self, attn, hidden_states, *args, **kwargs):
                return hidden_states

        model.set_attn_processor(MyProcessor())
    elif refusal == "disabled":
        monkeypatch.setenv("COMPILED_UNET_EXPORT_CACHE", "0")
    if refusal == "function_mode":
        with torch.overrides.TorchFunctionMode():
            assert _key(model, sample, t, kwargs) is None
    else:
        assert _key(model, sample, t, kwargs) is None


def test_diffusers_unet_is_exported_every_time():
    from cases import BASE, CONFIGS
    from oracle import build_diffusers_unet

    sample, t, kwargs = _inputs()
    assert _key(build_diffusers_unet({**BASE, **CONFIGS["sd"]}), sample, t, kwargs) is None


class _GetattrOfOs:
    """Pickles as getattr(<an allowed function>, "__globals__"): from there anything is reachable; refused by name."""

    def __reduce__(self):
        return getattr, (export_cache._op_from, "__globals__")


class _NotAnOp:
    """Pickles as the entry's own op resolver asked for something that is not an operator."""

    def __reduce__(self):
        return export_cache._op_from, ("aten", "__class__", "__init__")


@pytest.mark.parametrize("damage", ["flipped_byte", "truncated", "foreign_global", "getattr", "not_an_op", "empty"])
def test_a_damaged_entry_is_a_miss_and_is_written_again(cache, damage):
    model = build("sd", seed=0)
    sample, t, kwargs = _inputs()
    fresh, _ = _export_with_freeu_inputs(model, sample, t, kwargs)
    (path,) = list(cache.iterdir())
    data = path.read_bytes()
    head = len(export_cache.FORMAT)
    if damage == "flipped_byte":
        i = len(data) // 2
        data = data[:i] + bytes([data[i] ^ 1]) + data[i + 1:]
    elif damage == "truncated":
        data = data[: len(data) // 3]
    elif damage in ("foreign_global", "getattr", "not_an_op"):  # well-formed files (right checksum) reaching code
        payload = pickle.dumps({"foreign_global": os.system, "getattr": _GetattrOfOs(), "not_an_op": _NotAnOp()}[damage])
        data = export_cache.FORMAT + hashlib.sha256(payload).digest() + payload
    else:
        data = b""
    path.write_bytes(data)
    program, _ = _export_with_freeu_inputs(model, sample, t, kwargs)
    stats = counters[export_cache.COUNTERS]
    assert stats["export_cache_damaged"] == 1 and stats["export_cache_hit"] == 0, dict(stats)
    assert program.graph_module.code == fresh.graph_module.code
    assert stats["export_cache_stored"] == 2  # exported again and written over the damaged entry
    _export_with_freeu_inputs(model, sample, t, kwargs)
    assert stats["export_cache_hit"] == 1


def test_compile_export_cache_false_neither_reads_nor_writes(cache):
    import compiled_unet

    with pytest.raises(TypeError, match="export_cache must be True or False"):
        compiled_unet.compile(build("sd"), *_inputs()[:2], export_cache="no")
    model = build("sd", seed=0)
    sample, t, kwargs = _inputs()
    _export_with_freeu_inputs(model, sample, t, kwargs, use_cache=False)
    assert not cache.exists() and not counters[export_cache.COUNTERS]
    assert export(model, sample, t, **kwargs).graph_module.code  # plain export() never touches the cache
    assert not cache.exists()


@pytest.mark.parametrize("payload, refusal", [
    (os.system, "names posix.system"), (_GetattrOfOs(), "names builtins.getattr"),
    (_NotAnOp(), "not an operator name"), (exec, "names builtins.exec"),
])
def test_the_entry_reader_builds_graph_pieces_only(payload, refusal):
    import io

    data = pickle.dumps(payload)
    with pytest.raises(pickle.UnpicklingError, match=refusal):
        export_cache._Unpickler(io.BytesIO(data), mode=None).load()


def test_entries_beyond_the_cap_go_least_recently_used_first(cache, monkeypatch):
    import time

    model = build("sd", seed=0)
    sample, t, kwargs = _inputs()
    program, _ = _export_with_freeu_inputs(model, sample, t, kwargs)
    args, kw = program.example_inputs
    for p in cache.iterdir():
        p.unlink()
    monkeypatch.setattr(export_cache, "MAX_ENTRIES", 2)
    keys = ["a" * 40, "b" * 40, "c" * 40]
    for i, k in enumerate(keys[:2]):
        export_cache.store(k, program)
        os.utime(cache / f"{k}.pkl", (1000 + i, 1000 + i))  # a then b, in the past
    assert export_cache.load(keys[0], model, args, kw) is not None  # a used now: newer than b
    time.sleep(0.01)
    export_cache.store(keys[2], program)  # one entry too many: b, the least recently used, goes
    left = {p.name[:40] for p in cache.iterdir() if p.suffix == ".pkl"}
    assert keys[2] in left and keys[0] in left and keys[1] not in left and len(left) == 2


def test_a_tied_model_never_reads_an_untied_models_graph(cache):
    untied, tied = build("sd", seed=0), build("sd", seed=0)
    resnet = tied.down_blocks[0].resnets[0]
    resnet.conv2.weight = resnet.conv1.weight
    sample, t, kwargs = _inputs()
    _export_with_freeu_inputs(untied, sample, t, kwargs)
    program, _ = _export_with_freeu_inputs(tied, sample, t, kwargs)
    assert counters[export_cache.COUNTERS]["export_cache_hit"] == 0
    with torch.no_grad():
        torch.testing.assert_close(program.module()(sample, t, **kwargs)[0],
                                   tied(sample, t, **kwargs, return_dict=False)[0], rtol=0, atol=1e-5)


def test_reading_an_entry_generates_the_graphs_code_once(cache, monkeypatch):
    # The program makes its module's code; a module made beside it for the metadata made it a second time
    # (~0.05 s for SD1.5).
    model = build("sd", seed=0)
    sample, t, kwargs = _inputs()
    _export_with_freeu_inputs(model, sample, t, kwargs)
    made = []
    real = torch.fx.Graph.python_code
    monkeypatch.setattr(torch.fx.Graph, "python_code", lambda self, *a, **k: made.append(1) or real(self, *a, **k))
    cached, _ = _export_with_freeu_inputs(model, sample, t, kwargs)
    assert counters[export_cache.COUNTERS]["export_cache_hit"] == 1
    assert len(made) == 1
