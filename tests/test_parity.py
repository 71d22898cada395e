"""Property-based parity: `compiled_unet.UNet2DConditionModel` == diffusers' `UNet2DConditionModel`.

For configs drawn per family (tests/strategies.py) we build diffusers' model with randomised weights
(tests/oracle.py), build ours from the same kwargs, load diffusers' state_dict with strict=True and compare
`.sample` for return_dict=True and False under the oracle's fp32 tolerance (rel-L2 <= 1e-5, max-abs <=
1e-4 * max(1, max|ref|)). `test_strategies_build_valid_diffusers_models` proves the strategies themselves
against diffusers and runs even while our model is missing.

Run: HYPOTHESIS_PROFILE=ci python -m pytest tests/test_parity.py -q
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import warnings

import pytest
import torch
from hypothesis import given, note, settings
from hypothesis import strategies as st

import oracle as O
import strategies as S
from compiled_unet import UNet2DConditionModel as OURS


def _examples(fraction: float = 1.0) -> settings:
    """A share of the active profile's example budget (ci: 10, dev: 40) for one test."""
    return settings(max_examples=max(1, round(settings.default.max_examples * fraction)))


def _context(cfg: dict, spec: S.InputSpec | None) -> str:
    text = f"config = {cfg!r}"
    if spec is not None:
        text += f"\ninputs = {S.describe_spec(spec)}"
    return text


def build_pair(cfg: dict, seed: int = 0):
    """diffusers' randomised model and ours carrying the same weights (strict load), both in eval mode."""
    theirs = O.build_diffusers_unet(cfg, seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = OURS(**copy.deepcopy(cfg))
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return theirs, ours.eval()


def check_parity(cfg: dict, spec: S.InputSpec, seed: int = 0) -> O.Parity:
    theirs, ours = build_pair(cfg, seed)
    inputs = S.build_inputs(cfg, spec)
    ref = O.run_unet(theirs, inputs, return_dict=True)
    worst = None
    for return_dict in (True, False):
        out = O.run_unet(ours, inputs, return_dict=return_dict)
        result = O.compare(out, ref, f"return_dict={return_dict}\n" + _context(cfg, spec))
        worst = result if worst is None or result.rel_l2 > worst.rel_l2 else worst
    return worst


def _parity_property(name, families, max_blocks=3):
    """A hypothesis test (named `name`, so each has its own example database entry) over `families`."""

    def prop(data):
        cfg = data.draw(S.unet_configs(families=families, max_blocks=max_blocks), label="config")
        spec = data.draw(S.input_specs(cfg), label="inputs")
        note(_context(cfg, spec))
        check_parity(cfg, spec)

    prop.__name__ = prop.__qualname__ = name
    prop.__doc__ = f"Parity on the {families!r} family."
    return given(data=st.data())(prop)


# --- the strategies, proven against diffusers (no dependency on our model) -------------------------------


def test_defaults_table_matches_diffusers():
    from diffusers import UNet2DConditionModel

    params = inspect.signature(UNet2DConditionModel.__init__).parameters
    for key, value in S.DEFAULTS.items():
        assert params[key].default == value, key
    structural = {"down_block_types", "up_block_types", "block_out_channels", "self"}
    assert set(params) - structural == set(S.DEFAULTS)


@_examples()
@given(data=st.data())
def test_strategies_build_valid_diffusers_models(data):
    """Every drawn runnable config+inputs runs in diffusers: finite output of the right shape, and the
    residual shapes the strategies compute equal diffusers' down_block_res_samples (forward hooks)."""
    cfg = data.draw(S.unet_configs(families=S.RUNNABLE_FAMILIES), label="config")
    spec = data.draw(S.input_specs(cfg), label="inputs")
    note(_context(cfg, spec))
    model = O.build_diffusers_unet(cfg, seed=1)
    out = O.run_unet(model, S.build_inputs(cfg, spec))
    facts = S.config_facts(cfg)
    assert out.shape == (spec.batch, facts["out_channels"], spec.height, spec.width)
    assert torch.isfinite(out).all()
    expected = S.residual_shapes(cfg, spec.batch, spec.height, spec.width)
    recorded = O.record_down_shapes(model, S.build_inputs(cfg, spec))
    assert recorded["down"] == expected["down"]
    assert recorded["mid"] == expected["mid"]
    intrablock = []  # T2I-Adapter targets: CrossAttn blocks' last layer, otherwise the block output
    for block, (sample_shape, res) in zip(model.down_blocks, recorded["per_block"]):
        if type(block).__name__ == "CrossAttnDownBlock2D":
            intrablock.append(res[-2] if block.downsamplers is not None else res[-1])
        else:
            intrablock.append(sample_shape)
    assert intrablock == expected["intrablock"]


def test_oracle_randomizes_every_parameter_and_detects_small_errors():
    """No parameter is left at diffusers' zero/one init, and a 1e-3 relative change in one attention
    projection is far outside the tolerance (so the tolerance is not vacuous)."""
    cfg = dict(SD15_TINY, attention_type="gated")
    model = O.build_diffusers_unet(cfg, seed=3)
    for name, param in model.named_parameters():
        assert param.numel() == 1 or param.std() > 0, name
        assert not torch.all(param == 0), name
    inputs = S.build_inputs(cfg, dataclasses.replace(_SPEC, gligen_boxes=2))
    ref = O.run_unet(model, inputs)
    assert O.compare(O.run_unet(O.build_diffusers_unet(cfg, seed=3), inputs), ref).rel_l2 == 0.0
    with torch.no_grad():
        model.down_blocks[0].attentions[0].transformer_blocks[0].attn2.to_k.weight.mul_(1 + 1e-3)
    assert not O.parity(O.run_unet(model, inputs), ref).ok


@_examples()
@given(cfg=S.unet_configs(families=S.CONSTRUCT_ONLY_FAMILIES))
def test_construct_only_families_fail_in_diffusers(cfg):
    """Skip blocks and dual_cross_attention build, but diffusers 0.42.1's own forward raises for them
    (see tests/strategies.py); if this starts passing, diffusers fixed them and they become parity cases."""
    model = O.build_diffusers_unet(cfg)
    spec = S.InputSpec(batch=1, height=4, width=4, seq_len=2, seed=0, timestep="int", encoder_mask=None,
                       attention_mask=None, fully_masked_row=False, timestep_cond=False, time_ids=0,
                       class_labels_int=False, gligen_boxes=0, lora_scale=None, controlnet=False, adapter=0,
                       adapter_mid=None, adapter_legacy=False, return_dict=True)
    with pytest.raises((TypeError, AttributeError, ValueError)):
        O.run_unet(model, S.build_inputs(cfg, spec))


# --- parity, one test per family ----------------------------------------------------------------------

# Each family gets the profile's full budget (ci: 10 examples); K blocks (32/64 channels) and GLIGEN
# (512-wide position net) are the heaviest, so they get a little less.
test_parity_sd = _examples()(_parity_property("test_parity_sd", "sd"))
test_parity_sdxl = _examples()(_parity_property("test_parity_sdxl", "sdxl"))
test_parity_unclip = _examples()(_parity_property("test_parity_unclip", "unclip"))
test_parity_kandinsky = _examples()(_parity_property("test_parity_kandinsky", "kandinsky"))
test_parity_attention_blocks = _examples()(_parity_property("test_parity_attention_blocks", "attn"))
test_parity_k_diffusion = _examples(0.8)(_parity_property("test_parity_k_diffusion", "k"))
test_parity_gligen = _examples(0.8)(_parity_property("test_parity_gligen", "gligen", max_blocks=2))
test_parity_mixed_blocks = _examples()(_parity_property("test_parity_mixed_blocks", "mixed"))


@_examples()
@given(data=st.data())
def test_parity_controlnet_and_adapter_residuals(data):
    """ControlNet (down + mid residuals) and T2I-Adapter residuals, as many as the config accepts."""
    cfg = data.draw(S.unet_configs(families=("sd", "sdxl", "attn", "mixed")), label="config")
    facts = S.config_facts(cfg)
    spec = data.draw(S.input_specs(cfg), label="inputs")
    adapter = facts["adapter_max"]
    mid_ok = adapter == facts["n_blocks"] and S._resolved(cfg)["mid_block_type"] is not None
    spec = dataclasses.replace(
        spec, controlnet=facts["controlnet_ok"], adapter=adapter,
        adapter_mid=data.draw(st.sampled_from((None, "match", "mismatch"))) if mid_ok else None,
        adapter_legacy=False if facts["controlnet_ok"] else spec.adapter_legacy and adapter > 0)
    check_parity(cfg, spec)


@_examples()
@given(cfg=S.unet_configs(families=S.CONSTRUCT_ONLY_FAMILIES))
def test_state_dict_parity_construct_only(cfg):
    """Skip blocks / dual cross attention: same state_dict keys and shapes (diffusers cannot run them)."""
    theirs = O.build_diffusers_unet(cfg)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ours = OURS(**copy.deepcopy(cfg))
    ref = {k: tuple(v.shape) for k, v in theirs.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert sorted(set(ref) - set(got)) == [], "missing keys"
    assert sorted(set(got) - set(ref)) == [], "unexpected keys"
    assert {k: s for k, s in got.items() if ref[k] != s} == {}, "shape mismatches"


# --- named tiny configurations ------------------------------------------------------------------------

SD15_TINY = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16, 16), layers_per_block=2,
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), norm_num_groups=4,
    cross_attention_dim=8, attention_head_dim=2,
)
SDXL_TINY = dict(
    sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=2,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    norm_num_groups=4, cross_attention_dim=8, attention_head_dim=(2, 4), transformer_layers_per_block=(1, 2),
    use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=4,
    projection_class_embeddings_input_dim=6 + 6 * 4,
)
_SPEC = S.InputSpec(batch=2, height=8, width=8, seq_len=5, seed=7, timestep="tensor1d_float",
                    encoder_mask=None, attention_mask=None, fully_masked_row=False, timestep_cond=False,
                    time_ids=0, class_labels_int=False, gligen_boxes=0, lora_scale=None, controlnet=False,
                    adapter=0, adapter_mid=None, adapter_legacy=False, return_dict=True)
NAMED = {
    "sd15": (SD15_TINY, _SPEC),
    "sd15_odd_size_masked": (SD15_TINY, dataclasses.replace(_SPEC, height=7, width=5, encoder_mask="bool",
                                                           fully_masked_row=True, timestep="int")),
    "sd15_controlnet_t2i": (SD15_TINY, dataclasses.replace(_SPEC, controlnet=True, adapter=3, adapter_mid="match")),
    "sdxl": (SDXL_TINY, dataclasses.replace(_SPEC, time_ids=6)),
    "sdxl_lcm": (dict(SDXL_TINY, time_cond_proj_dim=4),
                 dataclasses.replace(_SPEC, time_ids=6, timestep_cond=True, timestep="float")),
}


@pytest.mark.parametrize("name", sorted(NAMED))
def test_parity_named_configs(name):
    cfg, spec = NAMED[name]
    check_parity(cfg, spec)


# --- invalid configs: diffusers raises at construction, so must we ---------------------------------------

_INVALID = {
    "mismatched_block_lengths": dict(SD15_TINY, up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
    "channels_vs_blocks": dict(SD15_TINY, block_out_channels=(8, 16)),
    "unknown_down_block": dict(SD15_TINY, down_block_types=("Nope2D", "CrossAttnDownBlock2D", "DownBlock2D")),
    "unknown_mid_block": dict(SD15_TINY, mid_block_type="Nope"),
    "num_attention_heads_set": dict(SD15_TINY, num_attention_heads=2),
    "attention_head_dim_length": dict(SD15_TINY, attention_head_dim=(2, 2)),
    "layers_per_block_length": dict(SD15_TINY, layers_per_block=(1, 1)),
    "only_cross_attention_length": dict(SD15_TINY, only_cross_attention=(True,)),
    "projection_without_input_dim": dict(SD15_TINY, class_embed_type="projection"),
    "encoder_hid_type_without_dim": dict(SD15_TINY, encoder_hid_dim_type="text_proj"),
    "ip_image_proj": dict(SD15_TINY, encoder_hid_dim_type="ip_image_proj", encoder_hid_dim=8),
    "unknown_addition": dict(SD15_TINY, addition_embed_type="nope"),
    "unknown_time_embedding": dict(SD15_TINY, time_embedding_type="nope"),
    "odd_fourier_dim": dict(SD15_TINY, time_embedding_type="fourier", time_embedding_dim=9),
    "unknown_act_fn": dict(SD15_TINY, act_fn="nope"),
}


@pytest.mark.parametrize("name", sorted(_INVALID))
def test_invalid_config_rejected_by_diffusers(name):
    """Guards the table below: each entry really is rejected by diffusers."""
    with pytest.raises(ValueError):
        O.build_diffusers_unet(_INVALID[name])


@pytest.mark.parametrize("name", sorted(_INVALID))
def test_invalid_config_rejected_by_ours(name):
    with pytest.raises(ValueError):
        OURS(**copy.deepcopy(_INVALID[name]))
