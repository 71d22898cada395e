"""Bad input gets a ValueError/TypeError naming the argument and what was expected."""
import pytest
import torch

from compiled_unet import UNet2DConditionModel
from tests.cases import BASE, build, inputs_for


@pytest.fixture(scope="module")
def sd():
    return build("sd")


def _call(model, **changes):
    (sample, t), kwargs = inputs_for("sd")
    kwargs = {"sample": sample, "timestep": t, **kwargs}
    kwargs.update(changes)
    return model(**{k: v for k, v in kwargs.items() if v is not _DROP})


_DROP = object()


@pytest.mark.parametrize("changes, names", [
    (dict(sample=torch.randn(2, 4, 8)), "`sample`"),
    (dict(sample=torch.randn(2, 3, 8, 8)), "`sample`: expected 4 channels"),
    (dict(sample=torch.zeros(2, 4, 8, 8, dtype=torch.long)), "floating-point"),
    (dict(timestep=torch.tensor([1, 2, 3])), "`timestep`"),
    (dict(timestep="10"), "`timestep`"),
    (dict(encoder_hidden_states=None), "`encoder_hidden_states`"),
    (dict(encoder_hidden_states=torch.randn(2, 5, 7)), "last dimension 8"),
    (dict(encoder_hidden_states=torch.randn(3, 5, 8)), "batch 2"),
    (dict(encoder_hidden_states=torch.randn(2, 8)), "3-D tensor"),
    (dict(encoder_attention_mask=torch.ones(2, 4)), "`encoder_attention_mask`: expected sequence length 5"),
    (dict(encoder_attention_mask=torch.ones(5)), "`encoder_attention_mask`"),
    (dict(timestep_cond=torch.randn(2, 3)), "`timestep_cond`"),
    (dict(mid_block_additional_residual=torch.randn(2, 16, 4, 4)), "`down_block_additional_residuals`"),
    (dict(down_intrablock_additional_residuals=[torch.randn(2, 8, 8, 8)] * 4), "`down_intrablock_additional_residuals`"),
])
def test_bad_forward_inputs(sd, changes, names):
    with pytest.raises(ValueError, match=names.replace("`", "`").replace("(", r"\(")):
        _call(sd, **changes)


def test_controlnet_residuals_wrong_count_and_shape(sd):
    good = [torch.randn(2, 8, 8, 8)] * 2 + [torch.randn(2, 8, 4, 4), torch.randn(2, 16, 4, 4)]
    with pytest.raises(ValueError, match="`down_block_additional_residuals`: expected 4 tensors"):
        _call(sd, down_block_additional_residuals=tuple(good[:3]), mid_block_additional_residual=torch.randn(2, 16, 4, 4))
    bad = list(good)
    bad[2] = torch.randn(2, 8, 4, 5)
    with pytest.raises(ValueError, match=r"`down_block_additional_residuals\[2\]`: expected shape \(2, 8, 4, 4\)"):
        _call(sd, down_block_additional_residuals=tuple(bad), mid_block_additional_residual=torch.randn(2, 16, 4, 4))
    with pytest.raises(ValueError, match="`mid_block_additional_residual`: expected shape"):
        _call(sd, down_block_additional_residuals=tuple(good), mid_block_additional_residual=torch.randn(2, 16, 2, 2))


def test_missing_conditioning_names_the_key():
    sdxl = build("sdxl")
    (sample, t), kwargs = inputs_for("sdxl")
    with pytest.raises(ValueError, match=r"`added_cond_kwargs`.*\['time_ids'\]"):
        sdxl(sample, t, kwargs["encoder_hidden_states"], added_cond_kwargs={"text_embeds": torch.randn(2, 8)})
    with pytest.raises(ValueError, match="`added_cond_kwargs\\['time_ids'\\]`"):
        sdxl(sample, t, kwargs["encoder_hidden_states"],
             added_cond_kwargs={"text_embeds": torch.randn(2, 8), "time_ids": torch.randn(2, 5)})
    hint = build("image_hint")
    (sample, t), kwargs = inputs_for("image_hint")
    with pytest.raises(ValueError, match=r"`added_cond_kwargs`.*\['hint'\]"):
        hint(sample, t, kwargs["encoder_hidden_states"], added_cond_kwargs={"image_embeds": torch.randn(2, 6)})
    unclip = build("unclip")
    (sample, t), kwargs = inputs_for("unclip")
    with pytest.raises(ValueError, match="`class_labels`: expected a tensor"):
        unclip(sample, t, kwargs["encoder_hidden_states"])


@pytest.mark.parametrize("changes, message", [
    (dict(up_block_types=("UpBlock2D",)), "same number of `down_block_types` as `up_block_types`"),
    (dict(block_out_channels=(8, 16, 32)), "`block_out_channels`"),
    (dict(down_block_types=("CrossAttnDownBlock2D", "NoSuchBlock2D")), "`down_block_types` has unknown block type 'NoSuchBlock2D'"),
    (dict(mid_block_type="Nope"), "`mid_block_type`"),
    (dict(attention_head_dim=(2, 2, 2)), "`attention_head_dim`"),
    (dict(layers_per_block=(1, 1, 1)), "`layers_per_block`"),
    (dict(only_cross_attention=(True,)), "`only_cross_attention`"),
    (dict(num_attention_heads=2), "`num_attention_heads`"),
    (dict(transformer_layers_per_block=((1,), (1,))), "`reverse_transformer_layers_per_block` is required"),
    (dict(act_fn="tanh"), "`act_fn`"),
    (dict(class_embed_type="projection"), "`projection_class_embeddings_input_dim`"),
    (dict(addition_embed_type="text_time"), "`addition_time_embed_dim`"),
    (dict(addition_embed_type="nope"), "`addition_embed_type`"),
    (dict(encoder_hid_dim_type="text_proj"), "`encoder_hid_dim` is required"),
    (dict(time_embedding_type="learned"), "`time_embedding_type`"),
    (dict(resnet_time_scale_shift="spatial"), "`resnet_time_scale_shift`"),
])
def test_bad_config(changes, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        UNet2DConditionModel(**{**BASE, **changes})


def test_unknown_config_key_is_a_type_error():
    with pytest.raises(TypeError, match="not_an_argument"):
        UNet2DConditionModel(**BASE, not_an_argument=1)
    with pytest.raises(TypeError, match="not_an_argument"):
        UNet2DConditionModel.from_config({**BASE, "not_an_argument": 1})


def test_from_config_ignores_private_keys_and_roundtrips():
    cfg = {**BASE, "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.42.1"}
    model = UNet2DConditionModel.from_config(cfg)
    again = UNet2DConditionModel.from_config(model.config)
    assert again.config == model.config
    assert model.config["block_out_channels"] == (8, 16) and model.config.in_channels == 4
