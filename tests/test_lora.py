"""LoRA: parity with diffusers + PEFT loading the same weights, round trips, errors, export.

Tolerance (fp32): max-abs error <= 1e-4 x max(1, max|reference|). Both sides compute
`base(x) + B(A(x)) * scaling` with the same ATen ops, so unfused outputs agree exactly here (we measure
0.0); fused weights are built with a different matmul order than PEFT's (~1e-7).

The oracle loads the canonical PEFT form (`<path>.lora_A.weight`, per-layer alphas through
`network_alphas`) with `diffusers_unet.load_lora_adapter(..., prefix="unet")` (in diffusers 0.42.1
`load_attn_procs` only loads Custom Diffusion weights), while ours loads the drawn file format. Kohya files
are also checked against diffusers' own conversion (`_convert_non_diffusers_lora_to_diffusers`), with one
alpha for all layers: diffusers names the alphas of attention layers `...processor.to_q_lora.down.weight.alpha`,
which PEFT's alpha_pattern never matches, so per-layer kohya alphas are only right through the canonical form.
"""
import copy
import functools
import re
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import compiled_unet
from compiled_unet.lora import LoRAConv2d, LoRALinear
from tests.cases import BASE, CONFIGS, build, inputs_for
from tests.closeness import assert_close

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lora_to_diffusers  # noqa: E402


@functools.lru_cache(maxsize=None)
def _pristine(name):
    diffusers.utils.logging.set_verbosity_error()
    model = build(name)
    ref = diffusers.UNet2DConditionModel(**{**BASE, **CONFIGS[name]}).eval()
    ref.load_state_dict(model.state_dict())
    return model, ref


def _pair(name):
    """Fresh (ours, diffusers') with the same random weights."""
    model, ref = _pristine(name)
    return copy.deepcopy(model), copy.deepcopy(ref)


def _run(model, name, scale=None, **extra):
    args, kwargs = inputs_for(name)
    kwargs.update(extra)
    if scale is not None:
        kwargs["cross_attention_kwargs"] = {**kwargs.get("cross_attention_kwargs", {}), "scale": scale}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return model(*args, **kwargs).sample


@functools.lru_cache(maxsize=None)
def _base_out(name):
    """The output without LoRA."""
    return _run(_pristine(name)[0], name)


def _targets(name):
    return [p for p, m in _pristine(name)[0].named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]


def _lora_tensors(layer, rank, gen):
    """Random (A, B) for `layer` at `rank`, scaled so the adapter visibly moves the output."""
    if isinstance(layer, nn.Linear):
        a, b = (rank, layer.in_features), (layer.out_features, rank)
    else:
        a, b = (rank, layer.in_channels, *layer.kernel_size), (layer.out_channels, rank, 1, 1)
    return torch.randn(a, generator=gen) * 0.3, torch.randn(b, generator=gen) * 0.3


def _make_lora(name, ranks: dict, seed=0):
    """{path: (A, B)} for the given {path: rank}."""
    model = _pristine(name)[0]
    gen = torch.Generator().manual_seed(seed)
    return {p: _lora_tensors(model.get_submodule(p), r, gen) for p, r in ranks.items()}


def _as_format(lora: dict, alphas: dict, fmt: str) -> dict:
    """The same adapter spelled in one of the file formats people have; alphas as `.alpha` keys."""
    sd = {}
    for path, (a, b) in lora.items():
        if fmt == "kohya":
            stem = "lora_unet_" + path.replace(".", "_")
            sd[f"{stem}.lora_down.weight"], sd[f"{stem}.lora_up.weight"] = a, b
            if path in alphas:
                sd[f"{stem}.alpha"] = torch.tensor(alphas[path])
            continue
        if fmt == "old" and re.search(r"\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$", path):
            attn, proj = re.match(r"(.*\.attn[12])\.(to_q|to_k|to_v|to_out)", path).groups()
            down, up = f"{attn}.processor.{proj}_lora.down.weight", f"{attn}.processor.{proj}_lora.up.weight"
        elif fmt == "old":
            down, up = f"{path}.lora.down.weight", f"{path}.lora.up.weight"
        else:
            down, up = f"{path}.lora_A.weight", f"{path}.lora_B.weight"
        prefix = "unet." if fmt == "unet_prefix" else ""
        sd[prefix + down], sd[prefix + up] = a, b
        if path in alphas:
            sd[f"{prefix}{path}.alpha"] = torch.tensor(alphas[path])
    return sd


def _load_oracle(ref, lora: dict, alphas: dict, adapter_name: str):
    """diffusers + PEFT, canonical PEFT keys, alphas through network_alphas."""
    sd = {f"unet.{p}.lora_A.weight": a.clone() for p, (a, _) in lora.items()}
    sd.update({f"unet.{p}.lora_B.weight": b.clone() for p, (_, b) in lora.items()})
    network_alphas = {f"unet.{p}.alpha": v for p, v in alphas.items()} or None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref.load_lora_adapter(sd, adapter_name=adapter_name, prefix="unet", network_alphas=network_alphas)


# -- parity -------------------------------------------------------------------------------------------
@st.composite
def lora_cases(draw):
    name = draw(st.sampled_from(["sd", "sdxl"]))
    paths = draw(st.lists(st.sampled_from(_targets(name)), min_size=1, max_size=10, unique=True))
    ranks = {p: draw(st.integers(1, 4)) for p in paths}
    alpha_kind = draw(st.sampled_from(["none", "uniform", "per_layer"]))
    if alpha_kind == "uniform":
        value = draw(st.sampled_from([1.0, 3.0, 8.0]))
        alphas = {p: value for p in paths}
    elif alpha_kind == "per_layer":
        alphas = {p: draw(st.sampled_from([0.5, 2.0, 4.0, 16.0])) for p in paths}
    else:
        alphas = {}
    fmt = draw(st.sampled_from(["peft", "unet_prefix", "old", "kohya"]))
    alphas_via = draw(st.sampled_from(["keys", "network_alphas"])) if fmt != "kohya" else "keys"
    scale = draw(st.sampled_from([None, 0.0, 0.5, 1.7, -1.0]))
    seed = draw(st.integers(0, 2**16))
    return name, ranks, alphas, fmt, alphas_via, scale, seed


@settings(max_examples=10)
@given(lora_cases())
def test_parity_with_diffusers(case):
    name, ranks, alphas, fmt, alphas_via, scale, seed = case
    model, ref = _pair(name)
    lora = _make_lora(name, ranks, seed)
    if alphas_via == "network_alphas":
        sd = _as_format(lora, {}, fmt)
        network_alphas = {f"unet.{p}.alpha": v for p, v in alphas.items()}
        report = model.load_lora_adapter(sd, "x", network_alphas=network_alphas)
    else:
        report = model.load_lora_adapter(_as_format(lora, alphas, fmt), "x")
    assert report.loaded == sorted(ranks) and not report.unmatched
    _load_oracle(ref, lora, alphas, "x")
    out = _run(model, name, scale)
    assert_close(out, _run(ref, name, scale))
    if scale != 0.0:
        assert (out - _base_out(name)).abs().max() > 1e-3, "the adapter did not change the output"


def test_kohya_file_matches_diffusers_conversion(tmp_path):
    """A kohya .safetensors (every Linear/Conv2d of the UNet, one fp16 alpha, text-encoder keys too)."""
    from safetensors.torch import save_file
    model, ref = _pair("sd")
    ranks = {p: 2 + i % 3 for i, p in enumerate(_targets("sd"))}
    lora = _make_lora("sd", ranks, seed=3)
    sd = _as_format(lora, {p: 3.0 for p in ranks}, "kohya")
    sd = {k: (v.half() if k.endswith(".alpha") else v).contiguous() for k, v in sd.items()}
    te = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    sd[f"{te}.lora_down.weight"], sd[f"{te}.lora_up.weight"] = torch.randn(2, 4), torch.randn(4, 2)
    sd[f"{te}.alpha"] = torch.tensor(2.0)
    path = tmp_path / "kohya.safetensors"
    save_file(sd, str(path))

    report = model.load_lora_adapter(path, "k")
    assert report.loaded == sorted(ranks) and not report.unmatched
    assert report.other_components == sorted(k for k in sd if k.startswith("lora_te_"))

    converted, network_alphas = _convert_non_diffusers_lora_to_diffusers(dict(sd))
    converted = {k: v for k, v in converted.items() if k.startswith("unet.")}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref.load_lora_adapter(converted, adapter_name="k", prefix="unet", network_alphas=network_alphas)
    assert_close(_run(model, "sd", 0.6), _run(ref, "sd", 0.6))


def test_old_diffusers_format_matches_diffusers_conversion():
    """`to_q_lora.down` / `lora.down` keys go through diffusers' own conversion on the oracle side."""
    model, ref = _pair("sd")
    lora = _make_lora("sd", {p: 2 for p in _targets("sd")[::3]}, seed=5)
    sd = _as_format(lora, {}, "old")
    assert any("to_q_lora" in k for k in sd) and any(".lora.down." in k for k in sd)
    model.load_lora_adapter(sd, "o")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref.load_lora_adapter(dict(sd), adapter_name="o", prefix=None)
    assert_close(_run(model, "sd"), _run(ref, "sd"))


def test_file_saved_by_diffusers_with_metadata(tmp_path):
    """diffusers' save_lora_adapter writes its LoraConfig (alphas) as metadata; we read it back."""
    model, ref = _pair("sd")
    paths = _targets("sd")[5:40:4]
    lora = _make_lora("sd", {p: 3 for p in paths}, seed=7)
    _load_oracle(ref, lora, {p: [1.0, 6.0][i % 2] for i, p in enumerate(paths)}, "m")
    ref.save_lora_adapter(str(tmp_path), adapter_name="m", weight_name="m.safetensors")
    report = model.load_lora_adapter(tmp_path / "m.safetensors", "m")
    assert report.loaded == sorted(paths)
    assert_close(_run(model, "sd"), _run(ref, "sd"))


def test_multiple_adapters_weights_scale_and_disable():
    model, ref = _pair("sdxl")
    targets = _targets("sdxl")
    la = _make_lora("sdxl", {p: 2 for p in targets[::2]}, seed=1)
    lb = _make_lora("sdxl", {p: 3 for p in targets[::3]}, seed=2)
    alphas_b = {p: 1.5 for p in lb}
    model.load_lora_adapter(_as_format(la, {}, "peft"), "a")
    model.load_lora_adapter(_as_format(lb, alphas_b, "kohya"), "b")
    _load_oracle(ref, la, {}, "a")
    _load_oracle(ref, lb, alphas_b, "b")
    # The adapter loaded last is the active one, in both.
    assert model.active_adapters() == ref.active_adapters() == ["b"]
    assert_close(_run(model, "sdxl"), _run(ref, "sdxl"))
    for names, weights, scale in ((["a", "b"], [0.6, -1.2], None), (["b", "a"], 0.5, 0.3), ("a", None, -0.7),
                                  (["a", "b"], [1.0, 0.0], None)):
        model.set_adapters(names, weights)
        ref.set_adapters(names, weights)
        assert_close(_run(model, "sdxl", scale), _run(ref, "sdxl", scale))
    model.disable_lora()
    ref.disable_lora()
    assert torch.equal(_run(model, "sdxl"), _base_out("sdxl"))
    model.enable_lora()
    ref.enable_lora()
    assert_close(_run(model, "sdxl", 0.3), _run(ref, "sdxl", 0.3))
    # A runtime scale leaves no state behind (diffusers forgets set_adapters weights after scale=0).
    before = _run(model, "sdxl")
    _run(model, "sdxl", 0.0)
    assert torch.equal(_run(model, "sdxl"), before)
    # set_lora_scale multiplies every adapter, like a runtime scale but through the buffers.
    model.set_lora_scale(0.3)
    assert_close(_run(model, "sdxl"), _run(ref, "sdxl", 0.3))
    model.set_lora_scale(1.0)
    model.delete_adapters("a")
    ref.delete_adapters("a")
    assert model.active_adapters() == ["b"] and not any(".a." in k for k in model.state_dict())
    model.set_adapters("b", 2.0)
    ref.set_adapters("b", 2.0)
    assert_close(_run(model, "sdxl"), _run(ref, "sdxl"))


# -- round trips ----------------------------------------------------------------------------------------
def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_state_equal(model, expected):
    got = model.state_dict()
    assert list(got) == list(expected)
    bad = [k for k in expected if not torch.equal(got[k], expected[k])]
    assert not bad, f"changed: {bad[:5]}"


def test_load_fuse_unfuse_unload_round_trips():
    model, ref = _pair("sd")
    base_state = _state(model)
    base_types = {p: type(m) for p, m in model.named_modules()}
    lora = _make_lora("sd", {p: 2 for p in _targets("sd")}, seed=4)
    model.load_lora_adapter(_as_format(lora, {p: 4.0 for p in lora}, "peft"), "a")
    _load_oracle(ref, lora, {p: 4.0 for p in lora}, "a")
    # Base keys unchanged with an adapter loaded; adapter keys beside them.
    keys = list(model.state_dict())
    assert [k for k in keys if ".lora_" not in k] == list(base_state)
    assert "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora_A.a.weight" in keys
    assert isinstance(model.conv_in, LoRAConv2d) and isinstance(model.time_embedding.linear_1, LoRALinear)
    loaded_state, unfused = _state(model), _run(model, "sd")

    model.fuse_lora(lora_scale=0.8)
    ref.fuse_lora(lora_scale=0.8)
    fused = _run(model, "sd")
    assert_close(fused, _run(ref, "sd"))
    assert (fused - unfused).abs().max() > 1e-3
    model.unfuse_lora()
    _assert_state_equal(model, loaded_state)
    assert torch.equal(_run(model, "sd"), unfused)

    model.unload_lora()
    _assert_state_equal(model, base_state)
    assert {p: type(m) for p, m in model.named_modules()} == base_types
    assert torch.equal(_run(model, "sd"), _base_out("sd"))
    assert not model._forward_hooks and not model._forward_pre_hooks

    # fuse then unload bakes the LoRA into plain layers (diffusers' workflow).
    model.load_lora_adapter(_as_format(lora, {p: 4.0 for p in lora}, "peft"), "a")
    model.fuse_lora(lora_scale=0.8)
    model.unload_lora()
    ref.unload_lora()
    assert {p: type(m) for p, m in model.named_modules()} == base_types
    assert_close(_run(model, "sd"), _run(ref, "sd"))


def test_fuse_selected_adapters_keeps_the_others_live():
    model, _ = _pair("sd")
    targets = _targets("sd")
    model.load_lora_adapter(_as_format(_make_lora("sd", {p: 2 for p in targets[::2]}, 1), {}, "peft"), "a")
    model.load_lora_adapter(_as_format(_make_lora("sd", {p: 2 for p in targets[1::2]}, 2), {}, "peft"), "b")
    model.set_adapters(["a", "b"], [0.7, 1.3])
    both = _run(model, "sd")
    model.fuse_lora(adapter_names=["a"])
    assert_close(_run(model, "sd"), both)
    model.unfuse_lora()
    assert torch.equal(_run(model, "sd"), both)


# -- bad input ----------------------------------------------------------------------------------------
def test_unknown_keys_are_reported():
    model, _ = _pair("sd")
    base_state = _state(model)
    sd = _as_format(_make_lora("sd", {"conv_in": 2}, 0), {}, "peft")
    sd["down_blocks.0.attentions.0.no_such_layer.lora_A.weight"] = torch.zeros(2, 8)
    sd["lora_unet_down_blocks_9_resnets_0_conv1.lora_down.weight"] = torch.zeros(2, 8, 3, 3)
    sd["conv_in.something_else"] = torch.zeros(1)
    sd["down_blocks.0.resnets.0.norm1.lora_A.weight"] = torch.zeros(2, 8)  # GroupNorm: not a target
    with pytest.raises(ValueError, match="4 LoRA key") as err:
        model.load_lora_adapter(sd, "a")
    for key in ("no_such_layer", "down_blocks_9", "conv_in.something_else", "norm1.lora_A"):
        assert key in str(err.value)
    _assert_state_equal(model, base_state)  # nothing loaded
    with pytest.warns(UserWarning, match="match no layer"):
        report = model.load_lora_adapter(sd, "a", strict=False)
    assert report.loaded == ["conv_in"] and len(report.unmatched) == 4


def test_wrong_shapes_and_unsupported_variants():
    model, _ = _pair("sd")
    base_state = _state(model)
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k"  # Linear 8 -> 8
    sd = {f"{path}.lora_A.weight": torch.zeros(2, 5), f"{path}.lora_B.weight": torch.zeros(8, 2)}
    with pytest.raises(ValueError, match=re.escape(f"'{path}.lora_A.weight'") + r".*\(2, 5\).*\(2, 8\)"):
        model.load_lora_adapter(sd, "a")
    sd = {"lora_unet_conv_in.lora_down.weight": torch.zeros(2, 4, 3, 3),
          "lora_unet_conv_in.lora_up.weight": torch.zeros(8, 3, 1, 1)}
    with pytest.raises(ValueError, match=r"'lora_unet_conv_in.lora_up.weight'.*\(8, 3, 1, 1\).*\(8, 2, 1, 1\)"):
        model.load_lora_adapter(sd, "a")
    with pytest.raises(ValueError, match="only lora_A"):
        model.load_lora_adapter({f"{path}.lora_A.weight": torch.zeros(2, 8)}, "a")
    with pytest.raises(ValueError, match="DoRA"):
        model.load_lora_adapter({f"{path}.lora_magnitude_vector.weight": torch.zeros(8)}, "a")
    _assert_state_equal(model, base_state)
    model.load_lora_adapter({f"{path}.lora_A.weight": torch.zeros(2, 8), f"{path}.lora_B.weight": torch.zeros(8, 2)}, "a")
    with pytest.raises(ValueError, match="already in use"):
        model.load_lora_adapter({f"{path}.lora_A.weight": torch.zeros(2, 8), f"{path}.lora_B.weight": torch.zeros(8, 2)}, "a")
    with pytest.raises(ValueError, match="rank 2"):
        model.load_lora_adapter({f"{path}.lora_A.weight": torch.zeros(3, 8), f"{path}.lora_B.weight": torch.zeros(8, 3)},
                                "a", hotswap=True)
    with pytest.raises(ValueError, match="unknown adapter"):
        model.set_adapters(["a", "nope"])
    with pytest.raises(ValueError, match="Length of adapter names"):
        model.set_adapters(["a"], [1.0, 2.0])


# -- export ---------------------------------------------------------------------------------------------
def test_export_with_adapter_follows_weight_and_scale_updates():
    model, _ = _pair("sd")
    targets = _targets("sd")
    ranks = {p: 2 for p in targets[::2]}
    model.load_lora_adapter(_as_format(_make_lora("sd", ranks, 1), {p: 4.0 for p in ranks}, "peft"), "a")
    args, kwargs = inputs_for("sd")
    ep = compiled_unet.export(model, *args, **copy.deepcopy(kwargs))
    assert not any(isinstance(m, torch.fx.GraphModule) for _, m in ep.graph_module.named_children())
    # A/B and the scaling are inputs of the program (lifted parameters / buffers), not constants.
    lifted = set(ep.graph_signature.parameters) | set(ep.graph_signature.buffers)
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    assert {f"{key}.lora_A.a.weight", f"{key}.lora_B.a.weight", f"{key}.lora_scaling.a"} <= lifted
    program = ep.module()

    def exported():
        with torch.no_grad():
            return program(*args, **{**copy.deepcopy(kwargs), "return_dict": False})[0]

    def check():
        out = exported()
        assert_close(out, _run(model, "sd"), scale_tol=1e-6)
        return out

    first = check()
    # The program's state is the model's own tensors: updates in place reach it without a new export.
    assert ep.state_dict[f"{key}.lora_A.a.weight"] is model.get_submodule(key).lora_A["a"].weight
    model.set_lora_scale(0.25)
    assert (check() - first).abs().max() > 1e-3
    model.set_adapters("a", -2.0)
    check()
    # Swap in another adapter of the same ranks (and other alphas) without re-exporting.
    model.load_lora_adapter(_as_format(_make_lora("sd", ranks, 2), {p: 1.0 for p in ranks}, "kohya"), "a", hotswap=True)
    swapped = check()
    fresh, _ = _pair("sd")
    fresh.load_lora_adapter(_as_format(_make_lora("sd", ranks, 2), {p: 1.0 for p in ranks}, "peft"), "a")
    fresh.set_adapters("a", -2.0)
    fresh.set_lora_scale(0.25)
    assert_close(swapped, _run(fresh, "sd"), scale_tol=1e-6)
    # Writing the exported program's state directly works the same way.
    with torch.no_grad():
        ep.state_dict[f"{key}.lora_scaling.a"].fill_(0.0)
    assert_close(exported(), _run(model, "sd"), scale_tol=1e-6)


def test_export_bakes_the_call_scale():
    """cross_attention_kwargs["scale"] is a Python number: the program keeps the exported value."""
    model, _ = _pair("sd")
    ranks = {p: 2 for p in _targets("sd")[::4]}
    model.load_lora_adapter(_as_format(_make_lora("sd", ranks, 1), {}, "peft"), "a")
    args, kwargs = inputs_for("sd")
    kwargs["cross_attention_kwargs"] = {"scale": 0.5}
    ep = compiled_unet.export(model, *args, **copy.deepcopy(kwargs))
    with torch.no_grad():
        out = ep.module()(*args, **{**copy.deepcopy(kwargs), "return_dict": False})[0]
    assert_close(out, _run(model, "sd", 0.5), scale_tol=1e-6)
    assert all(m.runtime_scale == 1.0 for m in model.modules() if isinstance(m, (LoRALinear, LoRAConv2d)))


def test_lora_under_qkv_fusion():
    """Fused QKV projections call adapted layers one by one, so their LoRA still applies."""
    model, _ = _pair("sd")
    paths = [p for p in _targets("sd") if re.search(r"attn[12]\.to_[qkv]$", p)][:4]
    model.load_lora_adapter(_as_format(_make_lora("sd", {p: 2 for p in paths}, 6), {}, "peft"), "q")
    with_lora = _run(model, "sd")
    assert (with_lora - _base_out("sd")).abs().max() > 1e-3
    model.fuse_qkv_projections()
    assert_close(_run(model, "sd"), with_lora, scale_tol=1e-5)
