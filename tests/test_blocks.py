"""Parity where diffusers' whole UNet cannot run a documented combination, checked against the math.

- Skip blocks: diffusers builds them but its UNet2DConditionModel loop cannot unpack their 3 outputs;
  we compare our blocks to diffusers' block modules with the same weights (fp32, max-abs <= 1e-6 x scale).
- dual_cross_attention + encoder_attention_mask: diffusers 0.42 raises; the math is each inner
  Transformer2DModel with its token slice and mask slice, mixed 50/50.
- FreeU: our tensor-scaled FreeU equals diffusers' enable_freeu (fp32, exact math: max-abs <= 1e-6 x scale).
"""
import copy

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from compiled_unet import UNet2DConditionModel  # noqa: E402
from compiled_unet.blocks import AttnSkipDownBlock2D, AttnSkipUpBlock2D, BlockArgs, SkipDownBlock2D, SkipUpBlock2D  # noqa: E402
from tests.cases import BASE, inputs_for, randomize_  # noqa: E402
from tests.closeness import assert_close  # noqa: E402


def _skip_args(**kw):
    return BlockArgs(num_layers=2, in_channels=32, out_channels=32, temb_channels=16, resnet_eps=1e-6,
                     resnet_act_fn="silu", resnet_groups=None, prev_output_channel=32, **kw)


@pytest.mark.parametrize("ours_cls, theirs_name, attn", [
    (SkipDownBlock2D, "SkipDownBlock2D", False), (AttnSkipDownBlock2D, "AttnSkipDownBlock2D", True)])
def test_skip_down_blocks_match_diffusers(ours_cls, theirs_name, attn):
    from diffusers.models.unets import unet_2d_blocks as d
    extra = dict(attention_head_dim=8) if attn else {}
    theirs = getattr(d, theirs_name)(in_channels=32, out_channels=32, temb_channels=16, num_layers=2, **extra)
    ours = ours_cls(_skip_args(attention_head_dim=8))
    randomize_(theirs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x, temb, skip = torch.randn(2, 32, 8, 8), torch.randn(2, 16), torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        h1, r1, s1 = theirs.eval()(x, temb, skip)
        h2, r2, s2 = ours.eval()(x, temb, skip)
    assert_close(h2, h1, scale_tol=1e-6), assert_close(s2, s1, scale_tol=1e-6)
    assert len(r1) == len(r2) and all(torch.allclose(a, b, atol=1e-6) for a, b in zip(r1, r2))


@pytest.mark.parametrize("ours_cls, theirs_name, attn", [
    (SkipUpBlock2D, "SkipUpBlock2D", False), (AttnSkipUpBlock2D, "AttnSkipUpBlock2D", True)])
def test_skip_up_blocks_match_diffusers(ours_cls, theirs_name, attn):
    from diffusers.models.unets import unet_2d_blocks as d
    extra = dict(attention_head_dim=8) if attn else {}
    theirs = getattr(d, theirs_name)(in_channels=32, prev_output_channel=32, out_channels=32, temb_channels=16,
                                     num_layers=2, **extra)
    ours = ours_cls(_skip_args(attention_head_dim=8))
    randomize_(theirs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x, temb, skip = torch.randn(2, 32, 4, 4), torch.randn(2, 16), torch.randn(2, 3, 2, 2)
    res = (torch.randn(2, 32, 4, 4), torch.randn(2, 32, 4, 4))
    with torch.no_grad():
        h1, s1 = theirs.eval()(x, res, temb, skip)
        h2, s2 = ours.eval()(x, res, temb, skip)
    assert_close(h2, h1, scale_tol=1e-6), assert_close(s2, s1, scale_tol=1e-6)


def test_skip_blocks_run_in_the_unet_and_export():
    cfg = dict(block_out_channels=(32, 32), layers_per_block=1, in_channels=3, out_channels=3, cross_attention_dim=8,
               attention_head_dim=8, down_block_types=("SkipDownBlock2D", "AttnSkipDownBlock2D"),
               up_block_types=("AttnSkipUpBlock2D", "SkipUpBlock2D"), mid_block_type="UNetMidBlock2D", norm_num_groups=8)
    model = randomize_(UNet2DConditionModel(**cfg)).eval()
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        out = model(x, 5, torch.randn(1, 2, 8)).sample
    assert out.shape == (1, 3, 8, 8) and torch.isfinite(out).all()
    import compiled_unet
    ep = compiled_unet.export(model, x, torch.tensor([5.0]), torch.zeros(1, 2, 8))
    with torch.no_grad():
        assert_close(ep.module()(x, torch.tensor([5.0]), encoder_hidden_states=torch.zeros(1, 2, 8), return_dict=False)[0],
                     model(x, torch.tensor([5.0]), torch.zeros(1, 2, 8)).sample, scale_tol=1e-6)


def test_dual_cross_attention_with_encoder_mask_matches_the_math():
    cfg = {**BASE, "dual_cross_attention": True}
    theirs = randomize_(diffusers.UNet2DConditionModel(**cfg)).eval()
    ours = UNet2DConditionModel(**cfg).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    (sample, t), kwargs = inputs_for("sd", seq=334)
    ehs = kwargs["encoder_hidden_states"]
    mask = torch.ones(2, 334)
    mask[0, 5:40] = 0
    mask[1, 100:300] = 0
    # diffusers 0.42's blocks pass `encoder_attention_mask` to DualTransformer2DModel, whose forward
    # does not accept it, so diffusers cannot run dual attention at all. The math: each inner
    # Transformer2DModel (diffusers' own) gets its token slice and its mask slice; outputs mix 50/50.
    state = {"bias": None}

    def dual_with_mask(self, hidden_states, encoder_hidden_states, attention_mask=None, cross_attention_kwargs=None,
                       return_dict=True, **kw):
        encoded, start, bias = [], 0, state["bias"]
        for i, length in enumerate(self.condition_lengths):
            tr = self.transformers[self.transformer_index_for_condition[i]]
            out = tr(hidden_states, encoder_hidden_states=encoder_hidden_states[:, start:start + length],
                     encoder_attention_mask=None if bias is None else bias[..., start:start + length],
                     return_dict=False)[0]
            encoded.append(out - hidden_states)
            start += length
        out = encoded[0] * self.mix_ratio + encoded[1] * (1 - self.mix_ratio) + hidden_states
        return (out,)

    from diffusers.models.transformers.dual_transformer_2d import DualTransformer2DModel as D
    original = D.forward
    D.forward = dual_with_mask
    try:
        with torch.no_grad():
            ref_unmasked = theirs(sample, t, ehs).sample
            state["bias"] = ((1 - mask) * -10000.0).unsqueeze(1)
            ref = theirs(sample, t, ehs).sample
    finally:
        D.forward = original
    with torch.no_grad():
        got = ours(sample, t, ehs, encoder_attention_mask=mask).sample
        unmasked = ours(sample, t, ehs).sample
    assert_close(unmasked, ref_unmasked, scale_tol=1e-6)
    assert_close(got, ref, scale_tol=1e-6)
    assert (got - unmasked).abs().max() > 1e-4  # the mask changed the result


@pytest.mark.parametrize("hw", [(8, 8), (6, 10)])
def test_freeu_matches_diffusers(hw):
    cfg = {**BASE, "block_out_channels": (8, 16, 16), "down_block_types": ("CrossAttnDownBlock2D",) * 2 + ("DownBlock2D",),
           "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 2}
    theirs = randomize_(diffusers.UNet2DConditionModel(**cfg)).eval()
    ours = UNet2DConditionModel(**cfg).eval()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    (sample, t), kwargs = inputs_for("sd", hw=hw)
    theirs.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    ours.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    with torch.no_grad():
        ref = theirs(sample, t, **copy.deepcopy(kwargs)).sample
        got = ours(sample, t, **copy.deepcopy(kwargs)).sample
    assert_close(got, ref, scale_tol=1e-5)
    assert "freeu" not in "".join(ours.state_dict())  # scales are not checkpoint keys
    ours.disable_freeu()
    theirs.disable_freeu()
    with torch.no_grad():
        assert_close(ours(sample, t, **copy.deepcopy(kwargs)).sample, theirs(sample, t, **copy.deepcopy(kwargs)).sample,
                     scale_tol=1e-6)
