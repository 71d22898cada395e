"""Model methods: attention slicing, QKV fusion and attention processors, against diffusers and export.

Tolerance (fp32): max-abs error <= 1e-5 x max(1, max|reference|). Sliced and classic attention run the
same ATen ops as diffusers (we measure 0.0); SDPA vs explicit softmax and one fused matmul vs three
separate ones reorder float sums, which stays around 1e-6 on these tiny models.
"""
import copy
import functools
import re

import pytest
import torch
import torch.utils._pytree as pytree
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

import compiled_unet
from compiled_unet import processors as ours
from compiled_unet.attention import Attention
from tests.cases import BASE, CONFIGS, build, inputs_for
from tests.closeness import assert_close

diffusers = pytest.importorskip("diffusers")
from diffusers.models import attention_processor as theirs  # noqa: E402

RTOL = 1e-5
FAMILIES = ["sd", "unclip"]


def _inputs(name):
    args, kwargs = inputs_for(name)
    # A padded encoder mask, so the sliced paths slice a per-head mask too.
    kwargs["encoder_attention_mask"] = torch.tensor([[1, 1, 0, 1, 0], [1, 0, 0, 0, 0]])
    return args, kwargs


def _run(model, args, kwargs):
    with torch.no_grad():
        return model(*args, **copy.deepcopy(kwargs)).sample


def _diffusers_twin(name, model):
    ref = diffusers.UNet2DConditionModel(**{**BASE, **CONFIGS[name]}).eval()
    ref.load_state_dict(model.state_dict())
    return ref


def _layers(model):
    return [m for m in model.modules() if isinstance(m, Attention)]


def _export_matches_eager(model, args, kwargs):
    ref = _run(model, args, kwargs)
    ep = compiled_unet.export(model, *args, **copy.deepcopy(kwargs))
    assert not any(isinstance(m, torch.fx.GraphModule) for _, m in ep.graph_module.named_children())
    with torch.no_grad():
        out = ep.module()(*args, **{**copy.deepcopy(kwargs), "return_dict": False})[0]
    assert_close(out, ref, scale_tol=1e-6)
    return ep


@functools.lru_cache(maxsize=None)
def _pair(name):
    """(ours, diffusers') with the same weights, built once; tests reset the processors they change."""
    model = build(name)
    ref = _diffusers_twin(name, model)
    # diffusers' own reset refuses our processor classes: restore its original ones (it pops from the dict).
    original = ref.attn_processors
    ref.set_default_attn_processor = lambda: ref.set_attn_processor(dict(original))
    return model, ref


# -- set_attention_slice ------------------------------------------------------------------------------
def _per_layer_list(model):
    # None (default processor), 1 and the full head count, cycling over the layers.
    return [[None, 1, m.sliceable_head_dim][i % 3] for i, m in enumerate(_layers(model))]


@pytest.mark.parametrize("slice_size", ["auto", "max", 1, 2, "list"])
@pytest.mark.parametrize("name", FAMILIES)
def test_attention_slice_matches_diffusers(name, slice_size):
    model, ref = _pair(name)
    args, kwargs = _inputs(name)
    unsliced = _run(model, args, kwargs)
    size = _per_layer_list(model) if slice_size == "list" else slice_size
    try:
        model.set_attention_slice(copy.copy(size))
        ref.set_attention_slice(copy.copy(size))
        # Same layers, same processor kinds and slice sizes, keyed by the same paths.
        mine, other = model.attn_processors, ref.attn_processors
        assert list(mine) == list(other)
        for key in mine:
            if type(other[key]).__name__.startswith("Sliced"):
                assert type(mine[key]).__name__ == type(other[key]).__name__
                assert mine[key].slice_size == other[key].slice_size
        out = _run(model, args, kwargs)
        assert_close(out, _run(ref, args, kwargs), scale_tol=RTOL)
        assert_close(out, unsliced, scale_tol=RTOL)
    finally:
        model.set_default_attn_processor()
        ref.set_default_attn_processor()


@settings(max_examples=6)
@given(data=st.data())
def test_attention_slice_drawn_lists_match_diffusers(data):
    model, ref = _pair("sd")
    sizes = [data.draw(st.one_of(st.none(), st.integers(1, m.sliceable_head_dim))) for m in _layers(model)]
    args, kwargs = _inputs("sd")
    model.set_attention_slice(list(sizes))
    ref.set_attention_slice(list(sizes))
    try:
        assert_close(_run(model, args, kwargs), _run(ref, args, kwargs), scale_tol=RTOL)
    finally:
        model.set_default_attn_processor()
        ref.set_default_attn_processor()


def _message(fn):
    with pytest.raises(ValueError) as info:
        fn()
    return str(info.value)


@pytest.mark.parametrize("bad", ["too_big", "short_list", "long_list", "list_too_big"])
@pytest.mark.parametrize("name", FAMILIES)
def test_attention_slice_errors_match_diffusers(name, bad):
    model, ref = _pair(name)
    n = len(_layers(model))
    big = max(m.sliceable_head_dim for m in _layers(model)) + 1
    size = {"too_big": big, "short_list": [1] * (n - 1), "long_list": [1] * (n + 1),
            "list_too_big": [1] * (n - 1) + [big]}[bad]
    mine = _message(lambda: model.set_attention_slice(copy.copy(size)))
    other = _message(lambda: ref.set_attention_slice(copy.copy(size)))
    # diffusers prints its config object in the length message: compare around it.
    config = re.compile(r"but .* has", re.S)
    assert config.sub("but <config> has", mine) == config.sub("but <config> has", other)
    # Validation comes first: no layer was changed.
    assert {type(p) for p in model.attn_processors.values()} <= {ours.AttnProcessor2_0, ours.AttnAddedKVProcessor2_0}


@pytest.mark.parametrize("size", [0, -1, 1.5, True])
def test_attention_slice_rejects_non_positive_sizes(size):
    model = build("sd")
    with pytest.raises(ValueError, match="slice size must be a positive int"):
        model.set_attention_slice(size)


def test_attention_slice_auto_on_one_head_layers():
    # diffusers gives slice 0 here and divides by zero at the first call; ours slices one head at a time.
    model = build("sd")
    for m in _layers(model):
        m.sliceable_head_dim = 1
    model.set_attention_slice("auto")
    assert {p.slice_size for p in model.attn_processors.values()} == {1}


class _PeakLiveBytes(TorchDispatchMode):
    """Peak bytes of tensor storages created under the mode and still alive, sampled after every ATen op."""

    def __init__(self):
        super().__init__()
        self.live, self.peak = {}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.live = {k: v for k, v in self.live.items() if not v[0].expired()}
        for t in pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()
                ref = StorageWeakRef(storage)
                self.live.setdefault(ref.cdata, (ref, storage.nbytes()))
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


def test_attention_slice_lowers_peak_memory():
    # 8 heads over 1024 tokens: full scores are 8 x 1024 x 1024 fp32 = 32 MiB; one-head slices 4 MiB.
    layer = Attention(query_dim=64, heads=8, dim_head=8).eval()
    x = torch.randn(1, 1024, 64)
    peaks = {}
    for label, slice_size in [("full", None), ("auto", 4), ("max", 1)]:
        layer.set_processor(ours.AttnProcessor() if slice_size is None else ours.SlicedAttnProcessor(slice_size))
        with torch.no_grad():
            reference = None if label == "full" else peaks["out"]
            with _PeakLiveBytes() as mode:
                out = layer(x)
            peaks[label] = mode.peak
            if reference is None:
                peaks["out"] = out
            else:
                assert_close(out, reference, scale_tol=RTOL)
    mib = 2**20
    assert peaks["full"] >= 32 * mib
    assert peaks["auto"] <= 0.6 * peaks["full"], {k: v for k, v in peaks.items() if k != "out"}
    assert peaks["max"] <= 0.2 * peaks["full"], {k: v for k, v in peaks.items() if k != "out"}


# -- QKV fusion ---------------------------------------------------------------------------------------
def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same_state(a, b):
    assert list(a) == list(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


class _CountMatmuls(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in (torch.ops.aten.addmm.default, torch.ops.aten.mm.default, torch.ops.aten.bmm.default)
        return func(*args, **(kwargs or {}))


def _expected_saved_matmuls(model) -> int:
    saved = 0
    for m in _layers(model):
        if m.added_kv_proj_dim is not None:
            saved += 1 + (0 if m.only_cross_attention else 2)
        else:
            saved += 1 if m.is_cross_attention else 2
    return saved


@pytest.mark.parametrize("name", ["sd", "unclip", "sdxl"])
def test_fuse_unfuse_round_trip(name):
    model = build(name)
    args, kwargs = _inputs(name) if name != "sdxl" else inputs_for(name)
    before = _state(model)
    with _CountMatmuls() as unfused_count:
        unfused = _run(model, args, kwargs)
    model.fuse_qkv_projections()
    assert all(m.fused_projections for m in _layers(model))
    _assert_same_state(before, model.state_dict())  # diffusers' keys and values while fused
    with _CountMatmuls() as fused_count:
        fused = _run(model, args, kwargs)
    assert unfused_count.count - fused_count.count == _expected_saved_matmuls(model) > 0
    assert_close(fused, unfused, scale_tol=RTOL)
    model.unfuse_qkv_projections()
    _assert_same_state(before, model.state_dict())
    assert torch.equal(_run(model, args, kwargs), unfused)


def test_fused_state_dict_loads_into_diffusers_and_back():
    model = build("sd")
    model.fuse_qkv_projections()
    ref = _diffusers_twin("sd", model)  # strict load of the fused model's state_dict
    args, kwargs = _inputs("sd")
    assert_close(_run(model, args, kwargs), _run(ref, args, kwargs), scale_tol=RTOL)
    fresh = build("sd", seed=3)
    fresh.fuse_qkv_projections()
    fresh.load_state_dict(model.state_dict())  # fused weights follow loaded ones: no stale copy
    assert_close(_run(fresh, args, kwargs), _run(ref, args, kwargs), scale_tol=RTOL)


@pytest.mark.parametrize("name", FAMILIES)
def test_fused_with_slicing_and_diffusers_processors(name):
    model = build(name)
    args, kwargs = _inputs(name)
    ref = _run(model, args, kwargs)
    model.fuse_qkv_projections()
    model.set_attention_slice("max")
    assert_close(_run(model, args, kwargs), ref, scale_tol=RTOL)
    model.set_attn_processor(theirs.AttnProcessor2_0() if name == "sd" else theirs.AttnAddedKVProcessor2_0())
    assert_close(_run(model, args, kwargs), ref, scale_tol=RTOL)


# -- processors ---------------------------------------------------------------------------------------
class _UserProcessor:
    """Written against diffusers' Attention helpers only; `gain` arrives through cross_attention_kwargs."""

    def __init__(self):
        self.calls = 0

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 gain=1.0, **kwargs):
        self.calls += 1
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        mask = attn.prepare_attention_mask(attention_mask, context.shape[1], hidden_states.shape[0])
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k, v = attn.head_to_batch_dim(attn.to_k(context)), attn.head_to_batch_dim(attn.to_v(context))
        out = attn.batch_to_head_dim(torch.bmm(attn.get_attention_scores(q, k, mask), v))
        return attn.to_out[1](attn.to_out[0](out)) * gain


def test_user_processor_and_kwargs():
    model = build("sd")
    args, kwargs = _inputs("sd")
    ref = _run(model, args, kwargs)
    user = _UserProcessor()
    model.set_attn_processor(user)
    assert set(map(id, model.attn_processors.values())) == {id(user)}
    assert_close(_run(model, args, kwargs), ref, scale_tol=RTOL)
    assert user.calls == len(_layers(model))
    # One layer by path; `gain` reaches it (and our processors ignore it).
    model.set_default_attn_processor()
    key = next(k for k in model.attn_processors if k.endswith("attn2.processor"))
    model.set_attn_processor({**model.attn_processors, key: user})
    assert _run(model, args, {**kwargs, "cross_attention_kwargs": {"gain": 1.0}}).allclose(ref, atol=1e-5)
    changed = _run(model, args, {**kwargs, "cross_attention_kwargs": {"gain": 0.5}})
    assert (changed - ref).abs().max() > 1e-3


_PROCESSORS = {
    "sd": [ours.AttnProcessor, lambda: ours.SlicedAttnProcessor(1), theirs.AttnProcessor, theirs.AttnProcessor2_0,
           lambda: theirs.SlicedAttnProcessor(1)],
    "unclip": [ours.AttnAddedKVProcessor, lambda: ours.SlicedAttnAddedKVProcessor(3), theirs.AttnAddedKVProcessor,
               theirs.AttnAddedKVProcessor2_0, lambda: theirs.SlicedAttnAddedKVProcessor(3)],
}


@pytest.mark.parametrize("name, index", [(n, i) for n in FAMILIES for i in range(5)])
def test_processors_match_default(name, index):
    model, ref_model = _pair(name)
    args, kwargs = _inputs(name)
    ref = _run(model, args, kwargs)
    try:
        processor = _PROCESSORS[name][index]()
        model.set_attn_processor(processor)
        ref_model.set_attn_processor(processor)
        out = _run(model, args, kwargs)
        assert_close(out, ref, scale_tol=RTOL)
        assert_close(out, _run(ref_model, args, kwargs), scale_tol=RTOL)  # the same processor on diffusers' layers
    finally:
        model.set_default_attn_processor()
        ref_model.set_default_attn_processor()
    assert {type(p) for p in model.attn_processors.values()} <= {ours.AttnProcessor2_0, ours.AttnAddedKVProcessor2_0}


def test_unknown_processor_key_is_named():
    model = build("sd")
    procs = {**model.attn_processors, "down_blocks.9.attn.processor": ours.AttnProcessor()}
    with pytest.raises(ValueError, match=r"unknown keys \['down_blocks\.9\.attn\.processor'\]"):
        model.set_attn_processor(procs)
    procs = dict(model.attn_processors)
    missing = procs.popitem()[0]
    with pytest.raises(ValueError, match=re.escape(f"missing keys ['{missing}']")):
        model.set_attn_processor(procs)


# -- export after each method -------------------------------------------------------------------------
@pytest.mark.parametrize("name", FAMILIES)
def test_export_after_slicing_and_fusion(name):
    model = build(name)
    args, kwargs = _inputs(name)
    model.set_attention_slice("auto")
    _export_matches_eager(model, args, kwargs)
    model.set_default_attn_processor()
    model.fuse_qkv_projections()
    ep = _export_matches_eager(model, args, kwargs)
    # Fused projections stay diffusers' parameters in the program: no to_qkv appears.
    assert not any("qkv" in k or "to_kv" in k for k in ep.state_dict)


def test_export_with_user_processor():
    model = build("sd")
    model.set_attn_processor(_UserProcessor())
    args, kwargs = _inputs("sd")
    _export_matches_eager(model, args, kwargs)
