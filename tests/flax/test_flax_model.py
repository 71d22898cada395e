"""FlaxUNet2DConditionModel against our PyTorch model (the oracle) on the same weights.

Each family is a tiny config from tests/cases.py: the PyTorch model gets seeded random weights, they are
converted with `compiled_unet.flax.convert`, and the Flax model runs under `jax.jit` in float32.
Tolerance: relative L2 <= 1e-5 (what the issue asks; measured ~1e-6 here, float32 op-order noise).
"""
from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

jax = pytest.importorskip("jax")  # the `flax` extra is installed in CI; missing it fails there (conftest)
import jax.numpy as jnp  # noqa: E402

from compiled_unet.checkpoint import CheckpointError  # noqa: E402
from compiled_unet.flax import FlaxUNet2DConditionModel, FlaxUNet2DConditionOutput  # noqa: E402
from compiled_unet.flax import layers as flax_layers  # noqa: E402
from compiled_unet.flax.convert import params_from_torch, params_to_torch  # noqa: E402
from tests.cases import BASE, CONFIGS, build, inputs_for  # noqa: E402

REL_L2 = 1e-5


def _j(x):
    if x is None:
        return None
    if isinstance(x, dict):
        return {k: _j(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_j(v) for v in x)
    return jnp.asarray(x.numpy())


def _nhwc(x: torch.Tensor):
    return jnp.asarray(x.permute(0, 2, 3, 1).numpy())


def _rel_l2(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def _flax_kwargs(kw: dict) -> dict:
    out = {"encoder_hidden_states": _j(kw["encoder_hidden_states"])}
    for k in ("added_cond_kwargs", "class_labels", "timestep_cond", "encoder_attention_mask", "attention_mask"):
        if k in kw:
            out[k] = _j(kw[k])
    return out


def _run_flax(model, params, sample, t, **kw):
    fn = jax.jit(lambda p, s, ts, k: model.apply({"params": p}, s, ts, **k).sample)
    return np.asarray(fn(params, _j(sample), _j(t), kw))


def _assert_weights_round_trip(torch_model, params):
    back = params_to_torch(params, torch_model.config)
    sd = torch_model.state_dict()
    assert sorted(back) == sorted(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.numpy().dtype and np.array_equal(back[k], v.numpy()), k  # bit-exact


# One per family the Flax port covers (tests/cases.py): SD, SDXL (text_time, linear projection, 2 transformer
# layers), UnCLIP (SimpleCrossAttn + ResnetDown/Upsample + scale_shift + timestep class embedding), Attn blocks
# (+ class embeds concat, mish/gelu time acts, time_cond_proj), Fourier time (+ center input, gelu, 2 groups,
# 1x1 / 5x5 convs), Kandinsky image_hint.
FAMILIES = ["sd", "sdxl", "unclip", "attn_blocks", "fourier", "image_hint"]


@pytest.mark.parametrize("name", FAMILIES)
def test_flax_matches_torch_fp32_under_jit(name):
    tm = build(name)
    (sample, t), kw = inputs_for(name)
    with torch.no_grad():
        ref = tm(sample, t, **kw).sample.numpy()
    fm = FlaxUNet2DConditionModel(**{**BASE, **CONFIGS[name]})
    params = params_from_torch(tm.state_dict(), tm.config)
    out = _run_flax(fm, params, sample, t, **_flax_kwargs(kw))
    assert out.shape == ref.shape
    assert _rel_l2(out, ref) <= REL_L2, f"{name}: rel L2 {_rel_l2(out, ref):.2e} > {REL_L2}"
    _assert_weights_round_trip(tm, params)


def _extra_cases(b: int = 2):
    """Embedding/option variants beyond tests/cases.py: (config, forward kwargs, (H, W))."""
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return {
        # odd latent size (upsample_size forwarded), "text" added embedding, projection class embedding,
        # per-block only_cross_attention, text_proj encoder_hid_proj
        "text_add_proj_class_odd": (
            dict(addition_embed_type="text", encoder_hid_dim=6, addition_embed_type_num_heads=2,
                 class_embed_type="projection", projection_class_embeddings_input_dim=5,
                 only_cross_attention=(True, False), mid_block_only_cross_attention=False),
            dict(encoder_hidden_states=r(b, 5, 6), class_labels=r(b, 5)), (7, 9)),
        # text_image added embedding + text_image_proj, simple_projection class, no mid block, relu, eps, padding 0
        "text_image": (
            dict(encoder_hid_dim_type="text_image_proj", encoder_hid_dim=6, addition_embed_type="text_image",
                 class_embed_type="simple_projection", projection_class_embeddings_input_dim=5, mid_block_type=None,
                 act_fn="relu", norm_eps=1e-3, downsample_padding=0),
            dict(encoder_hidden_states=r(b, 5, 6), class_labels=r(b, 5),
                 added_cond_kwargs={"image_embeds": r(b, 8), "text_embeds": r(b, 8)}), (8, 8)),
        # image added embedding + image_proj, identity class, time_embedding_dim, plain mid block with scale
        "image_proj_identity": (
            dict(encoder_hid_dim_type="image_proj", encoder_hid_dim=6, addition_embed_type="image",
                 class_embed_type="identity", time_embedding_dim=24, mid_block_type="UNetMidBlock2D",
                 mid_block_scale_factor=0.7),
            dict(encoder_hidden_states=r(b, 5, 8), class_labels=r(b, 24),
                 added_cond_kwargs={"image_embeds": r(b, 6)}), (8, 8)),
        # UnCLIP blocks cross-only, resnet_out_scale_factor, post/time-embedding activations
        "unclip_variants": (
            {**CONFIGS["unclip"], "resnet_out_scale_factor": 2.0, "only_cross_attention": True,
             "mid_block_only_cross_attention": False, "class_embed_type": None, "timestep_post_act": "silu",
             "time_embedding_act_fn": "silu"},
            dict(encoder_hidden_states=r(b, 5, 8)), (8, 8)),
    }


@pytest.mark.parametrize("name", list(_extra_cases()))
def test_flax_matches_torch_embedding_variants(name):
    from tests.cases import randomize_
    from compiled_unet import UNet2DConditionModel
    extra, kw, hw = _extra_cases()[name]
    cfg = {**BASE, **extra}
    tm = randomize_(UNet2DConditionModel(**cfg), 0).eval()
    sample, t = torch.randn(2, 4, *hw, generator=torch.Generator().manual_seed(4)), torch.tensor([10.0, 500.0])
    with torch.no_grad():
        ref = tm(sample, t, **kw).sample.numpy()
    params = params_from_torch(tm.state_dict(), tm.config)
    out = _run_flax(FlaxUNet2DConditionModel(**cfg), params, sample, t, **_j(kw))
    assert _rel_l2(out, ref) <= REL_L2, f"{name}: rel L2 {_rel_l2(out, ref):.2e} > {REL_L2}"


def test_controlnet_residuals_masks_and_memory_efficient_split_heads(monkeypatch):
    """SD family with ControlNet residuals (NHWC, as diffusers' Flax ControlNet gives them), an encoder
    attention mask, and use_memory_efficient_attention + split_head_dim with query chunks forced small
    so chunking really happens: still rel L2 <= 1e-5 against PyTorch eager."""
    monkeypatch.setattr(flax_layers, "QUERY_CHUNK", 16)  # 64 pixel tokens -> 4 chunks
    tm = build("sd")
    (sample, t), kw = inputs_for("sd")
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        # NCHW shapes of the down path's outputs: conv_in, block 0 (resnet, downsampler), block 1 (resnet)
        shapes = [(2, 8, 8, 8), (2, 8, 8, 8), (2, 8, 4, 4), (2, 16, 4, 4)]
        residuals = [0.1 * torch.randn(s, generator=g) for s in shapes]
        mid = 0.1 * torch.randn(2, 16, 4, 4, generator=g)
        mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.float32)
        ref = tm(sample, t, **kw, down_block_additional_residuals=residuals, mid_block_additional_residual=mid,
                 encoder_attention_mask=mask).sample.numpy()
    params = params_from_torch(tm.state_dict(), tm.config)
    fkw = dict(_flax_kwargs(kw), encoder_attention_mask=_j(mask),
               down_block_additional_residuals=tuple(_nhwc(r) for r in residuals),
               mid_block_additional_residual=_nhwc(mid))
    fm = FlaxUNet2DConditionModel(**{**BASE, **CONFIGS["sd"]}, use_memory_efficient_attention=True,
                                  split_head_dim=True)
    out = _run_flax(fm, params, sample, t, **fkw)
    assert _rel_l2(out, ref) <= REL_L2, _rel_l2(out, ref)


@pytest.mark.parametrize("memory_efficient,split", [(True, False), (False, True), (True, True)])
def test_attention_layouts_give_the_same_numbers(monkeypatch, memory_efficient, split):
    """Layout/memory options change no math: each query row is computed as unchunked (<= 1e-6 rel L2)."""
    monkeypatch.setattr(flax_layers, "QUERY_CHUNK", 8)
    k1, k2, k3, k4 = jax.random.split(jax.random.PRNGKey(0), 4)
    q = jax.random.normal(k1, (2, 32, 12))
    k = jax.random.normal(k2, (2, 7, 12))
    v = jax.random.normal(k3, (2, 7, 12))
    bias = jnp.where(jax.random.uniform(k4, (2, 1, 7)) > 0.3, 0.0, -10000.0)
    ref = flax_layers.attention_core(q, k, v, 3, 0.5, bias)
    out = flax_layers.attention_core(q, k, v, 3, 0.5, bias, memory_efficient=memory_efficient, split_head_dim=split)
    assert _rel_l2(out, ref) <= 1e-6


def test_init_weights_jitted_matches_conversion_tree():
    fm = FlaxUNet2DConditionModel(**BASE)
    params = fm.init_weights(jax.random.PRNGKey(0))
    tm = build("sd")
    ref = params_from_torch(tm.state_dict(), tm.config)
    shapes = jax.tree_util.tree_map(lambda a: (a.shape, str(a.dtype)), params)
    assert shapes == jax.tree_util.tree_map(lambda a: (a.shape, str(a.dtype)), ref)


def test_output_replace_and_tuple():
    fm = FlaxUNet2DConditionModel(**BASE)
    shapes = fm.param_shapes()
    (sample, t), kw = inputs_for("sd")
    fkw = _flax_kwargs(kw)
    as_tuple = jax.eval_shape(lambda p: fm.apply({"params": p}, _j(sample), _j(t), return_dict=False, **fkw), shapes)
    assert isinstance(as_tuple, tuple) and len(as_tuple) == 1 and as_tuple[0].shape == tuple(sample.shape)
    out = FlaxUNet2DConditionOutput(sample=jnp.zeros((1, 4, 2, 2)))
    new = out.replace(sample=jnp.ones((1, 4, 2, 2)))
    assert float(new.sample.sum()) == 16.0 and float(out.sample.sum()) == 0.0  # a copy, not a mutation
    assert new[0] is new.sample and new.to_tuple() == (new.sample,)
    leaves = jax.tree_util.tree_leaves(new)  # a pytree: jit/vmap can return it
    assert len(leaves) == 1


def test_unsupported_and_invalid_configs_are_named_at_construction():
    with pytest.raises(ValueError, match=r"down_block_types.*KDownBlock2D.*not supported by compiled_unet.flax"):
        FlaxUNet2DConditionModel(**{**BASE, "down_block_types": ("KDownBlock2D", "DownBlock2D")})
    with pytest.raises(ValueError, match=r"attention_type.*gated.*not supported"):
        FlaxUNet2DConditionModel(**{**BASE, "attention_type": "gated"})
    with pytest.raises(ValueError, match=r"dual_cross_attention"):
        FlaxUNet2DConditionModel(**{**BASE, "dual_cross_attention": True})
    with pytest.raises(ValueError, match=r"act_fn"):  # UNetConfig's own validation, same message as torch
        FlaxUNet2DConditionModel(**{**BASE, "act_fn": "tanh"})
    with pytest.raises(TypeError, match=r"norm_groups"):
        FlaxUNet2DConditionModel.from_config({**BASE, "norm_groups": 8})


def _torch_checkpoint(tmp_path, **save_kw):
    tm = build("sdxl")
    folder = tmp_path / "pt"
    tm.save_pretrained(folder, **save_kw)
    return tm, folder


def test_from_pretrained_pytorch_layouts(tmp_path):
    # Sharded safetensors with a variant, read by our torch-side reader.
    tm, folder = _torch_checkpoint(tmp_path, variant="fp16x", max_shard_size="20KB")
    assert any("-of-" in n for n in os.listdir(folder))
    model, params = FlaxUNet2DConditionModel.from_pretrained(folder, from_pt=True, variant="fp16x")
    assert model.config == tm.config
    _assert_weights_round_trip(tm, params)
    # Pickle only on request.
    tm.save_pretrained(tmp_path / "bin", safe_serialization=False)
    with pytest.raises(CheckpointError, match="allow_pickle"):
        FlaxUNet2DConditionModel.from_pretrained(tmp_path / "bin", from_pt=True)
    _, params = FlaxUNet2DConditionModel.from_pretrained(tmp_path / "bin", from_pt=True, allow_pickle=True)
    _assert_weights_round_trip(tm, params)


def test_unknown_config_key_is_an_error_naming_it(tmp_path):
    tm, folder = _torch_checkpoint(tmp_path)
    cfg = json.loads((folder / "config.json").read_text())
    cfg["norm_groups_typo"] = 8
    (folder / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="norm_groups_typo"):
        FlaxUNet2DConditionModel.from_pretrained(folder, from_pt=True)


@pytest.mark.parametrize("fmt", ["flax", "pt"])
def test_save_pretrained_round_trip(tmp_path, fmt):
    tm = build("sdxl")
    model = FlaxUNet2DConditionModel.from_config(tm.config, split_head_dim=True)
    params = params_from_torch(tm.state_dict(), tm.config)
    model.save_pretrained(tmp_path / "out", params, format=fmt)
    names = sorted(os.listdir(tmp_path / "out"))
    assert "config.json" in names and not any(n.startswith(".") for n in names)  # no temp files left
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    if fmt == "flax":
        assert "diffusion_flax_model.msgpack" in names and cfg["_class_name"] == "FlaxUNet2DConditionModel"
        loaded, loaded_params = FlaxUNet2DConditionModel.from_pretrained(tmp_path / "out")
        assert loaded.split_head_dim
        with pytest.raises(CheckpointError, match="from_pt=True"):
            tm.save_pretrained(tmp_path / "ptonly")
            FlaxUNet2DConditionModel.from_pretrained(tmp_path / "ptonly")
    else:
        assert "diffusion_pytorch_model.safetensors" in names and cfg["_class_name"] == "UNet2DConditionModel"
        loaded, loaded_params = FlaxUNet2DConditionModel.from_pretrained(tmp_path / "out", from_pt=True)
        from compiled_unet import UNet2DConditionModel
        reloaded = UNet2DConditionModel.from_pretrained(tmp_path / "out")  # our torch model reads it too
        _assert_weights_round_trip(reloaded, params)
    assert loaded.config == tm.config
    _assert_weights_round_trip(tm, loaded_params)


def test_flax_checkpoint_with_wrong_tree_is_named(tmp_path):
    tm = build("sd")
    model = FlaxUNet2DConditionModel.from_config(tm.config)
    params = params_from_torch(tm.state_dict(), tm.config)
    params["conv_in"]["kernel_typo"] = params["conv_in"].pop("kernel")
    with pytest.raises(ValueError, match="conv_in/kernel"):
        model.save_pretrained(tmp_path / "bad", params)


@pytest.mark.parametrize("approximate", [False, True])
def test_geglu_gelu_choice(approximate):
    """Exact (erf) GELU by default, as PyTorch's; tanh GELU (diffusers 0.39 Flax's) with gelu_approximate=True.
    Oracle: torch's F.gelu with approximate="none"/"tanh" on the same numbers; float32, rel L2 <= 1e-6."""
    layer = flax_layers.GEGLU(3, approximate)
    x = jax.random.normal(jax.random.PRNGKey(0), (4, 5)) * 3
    params = layer.init(jax.random.PRNGKey(1), x)
    out = layer.apply(params, x)
    h = np.asarray(x) @ np.asarray(params["params"]["proj"]["kernel"]) + np.asarray(params["params"]["proj"]["bias"])
    a, gate = torch.from_numpy(h).chunk(2, dim=-1)
    ref = (a * torch.nn.functional.gelu(gate, approximate="tanh" if approximate else "none")).numpy()
    assert _rel_l2(out, ref) <= 1e-6
    other = (a * torch.nn.functional.gelu(gate, approximate="none" if approximate else "tanh")).numpy()
    assert _rel_l2(out, other) > 1e-5  # the two choices are distinguishable at this scale
