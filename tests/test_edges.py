"""Parity at the edges of forward's inputs and of the constructor: what diffusers accepts, we accept and
compute the same; what is truly bad stays a ValueError/TypeError naming the argument.

Every parity test builds diffusers' UNet and ours from the same config, loads diffusers' (randomised)
state_dict into ours and compares outputs in fp32. Tolerance: max-abs <= 1e-4 x max(1, max|diffusers|)
(both run the same fp32 weights and ops; only summation order may differ).
"""
import copy
import warnings

import numpy as np
import pytest
import torch

import compiled_unet
from compiled_unet import UNet2DConditionModel
from tests.cases import BASE, randomize_

diffusers = pytest.importorskip("diffusers")
diffusers.utils.logging.set_verbosity_error()

# Kandinsky 2.2's decoder, tiny: the text states come from added_cond_kwargs["image_embeds"].
KANDINSKY22 = dict(BASE, down_block_types=("ResnetDownsampleBlock2D", "SimpleCrossAttnDownBlock2D"),
                   up_block_types=("SimpleCrossAttnUpBlock2D", "ResnetUpsampleBlock2D"),
                   mid_block_type="UNetMidBlock2DSimpleCrossAttn", resnet_time_scale_shift="scale_shift",
                   addition_embed_type="image", encoder_hid_dim_type="image_proj", encoder_hid_dim=6,
                   out_channels=8)
# AudioLDM / MusicLDM: cross_attention_dim equals each block's width and the pipelines pass
# encoder_hidden_states=None, so diffusers' "cross"-attention attends over the hidden states.
AUDIOLDM = dict(BASE, cross_attention_dim=(8, 16), class_embed_type="simple_projection",
                projection_class_embeddings_input_dim=6, class_embeddings_concat=True)
# Added-KV (SimpleCrossAttn) layers fall back the same way when added_kv_proj_dim equals the width.
SIMPLE = dict(BASE, down_block_types=("SimpleCrossAttnDownBlock2D", "ResnetDownsampleBlock2D"),
              up_block_types=("ResnetUpsampleBlock2D", "SimpleCrossAttnUpBlock2D"), mid_block_type=None)


def _pair(config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = randomize_(diffusers.UNet2DConditionModel(**config)).eval()
    ours = UNet2DConditionModel(**config).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    return ours, theirs


def _run(model, *args, **kwargs):
    with torch.no_grad():
        return model(*copy.deepcopy(args), **copy.deepcopy(kwargs), return_dict=False)[0]


def _assert_parity(got: torch.Tensor, ref: torch.Tensor):
    scale = max(1.0, ref.abs().max().item())
    err = (got - ref).abs().max().item()
    assert err <= 1e-4 * scale, f"max-abs {err:.3e} > 1e-4 x scale {scale:.3f}"


def _inputs(batch=2, hw=(8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 4, *hw, generator=g), torch.tensor([10.0, 500.0][:batch])


# -- encoder_hidden_states=None --------------------------------------------------------------------
@pytest.fixture(scope="module")
def kandinsky():
    return _pair(KANDINSKY22)


def test_image_proj_takes_no_encoder_hidden_states(kandinsky):
    ours, theirs = kandinsky
    x, t = _inputs()
    added = {"image_embeds": torch.randn(2, 6, generator=torch.Generator().manual_seed(1))}
    # Kandinsky 2.2's decoder pipeline call.
    ref = _run(theirs, sample=x, timestep=t, encoder_hidden_states=None, added_cond_kwargs=added)
    _assert_parity(_run(ours, sample=x, timestep=t, encoder_hidden_states=None, added_cond_kwargs=added), ref)
    _assert_parity(_run(ours, x, t, None, added_cond_kwargs=added), ref)
    _assert_parity(_run(ours, x, t, added_cond_kwargs=added), ref)  # ours also lets it be left out
    # States nothing reads are ignored, as in diffusers (even with another batch or width).
    junk = torch.randn(1, 3, 5)
    _assert_parity(_run(ours, x, t, junk, added_cond_kwargs=added), _run(theirs, x, t, junk, added_cond_kwargs=added))


def test_image_proj_without_image_embeds_names_the_key(kandinsky):
    x, t = _inputs()
    with pytest.raises(ValueError, match=r"`added_cond_kwargs`.*\['image_embeds'\]"):
        _run(kandinsky[0], x, t, None)


def test_image_proj_exports_without_encoder_hidden_states(kandinsky):
    ours, theirs = kandinsky
    x, t = _inputs()
    added = {"image_embeds": torch.randn(2, 6)}
    ep = compiled_unet.export(ours, x, t, added_cond_kwargs=added)
    with torch.no_grad():
        got = ep.module()(x, t, added_cond_kwargs=added)[0]
        got_none = ep.module()(x, t, None, added_cond_kwargs=added)[0]
    ref = _run(theirs, x, t, None, added_cond_kwargs=added)
    _assert_parity(got, ref)
    _assert_parity(got_none, ref)


@pytest.mark.parametrize("config", [AUDIOLDM, SIMPLE], ids=["audioldm", "added_kv"])
def test_cross_attention_without_states_attends_over_hidden_states(config):
    ours, theirs = _pair(config)
    x, t = _inputs()
    kwargs = {"class_labels": torch.randn(2, 6)} if config is AUDIOLDM else {}
    # MusicLDM's pipeline call: encoder_hidden_states=None.
    _assert_parity(_run(ours, x, t, encoder_hidden_states=None, **kwargs),
                   _run(theirs, x, t, encoder_hidden_states=None, **kwargs))


def test_none_where_no_fallback_fits_names_the_layer():
    ours = UNet2DConditionModel(**BASE)  # cross_attention_dim 8, mid block width 16
    x, t = _inputs()
    with pytest.raises(ValueError, match=r"`encoder_hidden_states`.*mid_block\.attentions\.0.*width 8 != its width 16"):
        _run(ours, x, t, None)
    text_proj = UNet2DConditionModel(**BASE, encoder_hid_dim=12)
    with pytest.raises(ValueError, match=r"`encoder_hidden_states`.*encoder_hid_dim_type='text_proj'"):
        _run(text_proj, x, t, None)
    dual = UNet2DConditionModel(**{**AUDIOLDM, "dual_cross_attention": True})
    with pytest.raises(ValueError, match=r"`encoder_hidden_states`.*dual_cross_attention"):
        _run(dual, x, t, None, class_labels=torch.randn(2, 6))


# -- timestep as NumPy scalars, masks as [B, 1, L] --------------------------------------------------
@pytest.fixture(scope="module")
def sd():
    return _pair(BASE)


@pytest.mark.parametrize("timestep", [np.int64(500), np.float64(500.5), 500, 500.5], ids=repr)
def test_number_timesteps_like_diffusers(sd, timestep):
    ours, theirs = sd
    x, _ = _inputs()
    e = torch.randn(2, 5, 8)
    _assert_parity(_run(ours, x, timestep, e), _run(theirs, x, timestep, e))


def test_float32_numpy_timestep_is_a_float(sd):
    # diffusers fails on np.float32 (it builds an int64 tensor from it); we take it as the float it is.
    x, _ = _inputs()
    e = torch.randn(2, 5, 8)
    assert torch.equal(_run(sd[0], x, np.float32(500.5), e), _run(sd[0], x, 500.5, e))


@pytest.mark.parametrize("timestep", [True, "500", [10, 500], np.array([10.0, 500.0])], ids=repr)
def test_bad_timesteps_name_the_argument(sd, timestep):
    x, _ = _inputs()
    with pytest.raises(ValueError, match="`timestep`"):
        _run(sd[0], x, timestep, torch.randn(2, 5, 8))


def test_three_dim_keep_masks_like_diffusers(sd):
    ours, theirs = sd
    x, t = _inputs()
    e = torch.randn(2, 5, 8)
    mask = torch.tensor([[1, 1, 0, 1, 1], [1, 0, 0, 1, 0]])
    ref = _run(theirs, x, t, e, encoder_attention_mask=mask[:, None])
    _assert_parity(_run(ours, x, t, e, encoder_attention_mask=mask[:, None]), ref)
    _assert_parity(_run(ours, x, t, e, encoder_attention_mask=mask), ref)
    with pytest.raises(ValueError, match="`encoder_attention_mask`"):
        _run(ours, x, t, e, encoder_attention_mask=torch.ones(2, 2, 5))


# -- constructor: diffusers' config dicts as they are ----------------------------------------------
def _check_same_model(config, theirs):
    ours = UNet2DConditionModel(**config).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x, t = _inputs()
    e = torch.randn(2, 5, 8)
    _assert_parity(_run(ours, x, t, e), _run(theirs, x, t, e))
    return ours


def test_constructor_takes_a_diffusers_config(sd):
    theirs = sd[1]
    assert "_use_default_values" in theirs.config  # what diffusers registers for a model built in code
    ours = _check_same_model(theirs.config, theirs)
    assert UNet2DConditionModel.from_config(theirs.config).config == ours.config


def test_constructor_takes_a_from_pretrained_config(sd, tmp_path):
    sd[1].save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = diffusers.UNet2DConditionModel.from_pretrained(tmp_path).eval()
    private = {k for k in theirs.config if k.startswith("_")}
    assert {"_class_name", "_diffusers_version", "_name_or_path"} <= private
    _check_same_model(theirs.config, theirs)
    _check_same_model(dict(theirs.config), theirs)


def test_unknown_public_config_keys_are_named():
    with pytest.raises(TypeError, match=r"unknown config arguments \['also_bad', 'not_an_argument'\]"):
        UNet2DConditionModel(**BASE, not_an_argument=1, also_bad=2, _private_is_fine=3)
