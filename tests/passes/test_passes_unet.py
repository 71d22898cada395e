"""Whole-model equivalence: exported tiny UNets (diffusers', and ours once it exists) before/after
passes.optimize, property-based. Tolerance: fp32, max |optimized - eager| <= 1e-5 * max(1, max |eager|)."""
import io

import pytest
import torch
from diffusers import UNet2DConditionModel as DiffusersUNet
from diffusers.models.attention_processor import AttnProcessor
from hypothesis import HealthCheck, given, settings, strategies as st

from compiled_unet import passes
from tests.closeness import assert_close

BASE = dict(layers_per_block=1, norm_num_groups=4, cross_attention_dim=8, sample_size=8,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def tiny_unet(cls=DiffusersUNet, channels=(8, 16), head_dim=2, seed=0, **kw):
    torch.manual_seed(seed)
    unet = cls(**BASE, block_out_channels=channels, attention_head_dim=head_dim, **kw).eval()
    with torch.no_grad():  # diffusers zero-inits some layers; random weights exercise every path
        for p in unet.parameters():
            p.normal_(0, 0.3)
    return unet


def n_transformer_blocks(unet):
    return sum(1 for name, _ in unet.named_modules() if name.endswith("transformer_blocks.0"))


def n_freeu_filters(unet):
    return sum(len(b.resnets) for b in unet.up_blocks[:2])


def _export(unet, args, kwargs):
    """compiled_unet.export (works for both models: kwargs by name, return_dict=False) when available."""
    try:
        from compiled_unet import export
    except ImportError:
        export = None
    x, t, ehs = args
    if export is not None:
        return export(unet, x, t, ehs, **kwargs)
    return torch.export.export(unet.eval(), (x, t), dict(encoder_hidden_states=ehs, return_dict=False, **kwargs),
                               strict=False)


def _run(ep, x, t, ehs, **kwargs):
    with torch.no_grad():
        return ep.module()(x, t, encoder_hidden_states=ehs, return_dict=False, **kwargs)[0]


def check_model(g, unet, B, L, freeu, masked, processor, seed=0):
    gen = torch.Generator().manual_seed(seed)
    H = unet.config.sample_size
    x = torch.randn(B, 4, H, H, generator=gen)
    t = torch.randint(0, 1000, (B,), generator=gen)
    ehs = torch.randn(B, L, unet.config.cross_attention_dim, generator=gen)
    kwargs = {}
    if masked:
        m = (torch.rand(B, L, generator=gen) > 0.4).long()
        m[-1] = 0  # a batch row where every token is masked
        kwargs["encoder_attention_mask"] = m
    if freeu:
        unet.enable_freeu(**freeu)
    if processor == "classic":
        unet.set_attn_processor(AttnProcessor())
    elif processor == "sliced":
        unet.set_attention_slice(1)
    with torch.no_grad():
        ref = unet(x, t, ehs, **kwargs).sample
    ep = _export(unet, (x, t, ehs), kwargs)
    ep2, rep = passes.optimize(ep)
    got = _run(ep2, x, t, ehs, **kwargs)
    assert_close(got, ref, scale_tol=1e-5)
    n_attn = n_transformer_blocks(unet)
    assert g.complex_or_fft(ep2) == []
    assert rep["fuse_qkv"] == 2 * n_attn                       # self QKV + cross KV per block
    assert g.count(ep2, "scaled_dot_product_attention") == 2 * n_attn
    assert g.count(ep2, "bmm", "softmax", "repeat_interleave", "dropout", "_assert") == 0
    masks = [n.args[3] for n in ep2.graph.nodes if "scaled_dot_product" in str(n.target) and len(n.args) > 3]
    assert all(m is None or m.meta["val"].shape[1] == 1 for m in masks)  # one mask shared by all heads
    if isinstance(unet, DiffusersUNet):  # ours builds the broadcast mask itself
        assert rep["broadcast_attention_mask"] == (n_attn if masked else 0)
    heads = unet.config.attention_head_dim  # diffusers' naming quirk: this is the number of heads
    assert rep["attention_to_sdpa"] == {"sdpa": 0, "classic": 2 * n_attn, "sliced": 2 * n_attn * B * heads}[processor]
    assert rep["merge_sliced_attention"] == (2 * n_attn if processor == "sliced" else 0)
    assert rep["freeu_fourier"] == (n_freeu_filters(unet) if freeu else 0)
    return ep2, rep


freeu_values = st.one_of(st.none(), st.fixed_dictionaries(
    {k: st.floats(0.1, 1.6) for k in ("s1", "s2", "b1", "b2")}))


def _our_unet():
    try:
        import compiled_unet
    except ImportError:
        return None
    return getattr(compiled_unet, "UNet2DConditionModel", None)


@settings(max_examples=5, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(channels=st.sampled_from([(8, 16), (16, 16)]), head_dim=st.sampled_from([2, 4]), B=st.integers(1, 2),
       L=st.integers(1, 6), freeu=freeu_values, masked=st.booleans(),
       processor=st.sampled_from(["sdpa", "classic", "sliced"]), seed=st.integers(0, 3),
       model=st.sampled_from(["diffusers", "ours"]))
def test_unet_equivalence(g, channels, head_dim, B, L, freeu, masked, processor, seed, model):
    cls = _our_unet() if model == "ours" else None
    unet = tiny_unet(cls=cls or DiffusersUNet, channels=channels, head_dim=head_dim, seed=seed)
    check_model(g, unet, B, L, freeu, masked, processor, seed)


@pytest.mark.parametrize("freeu", [None, dict(s1=0.9, s2=0.2, b1=1.2, b2=1.4)])
@pytest.mark.parametrize("masked", [False, True])
def test_diffusers_unet_fixed_cases(g, freeu, masked):
    check_model(g, tiny_unet(), 2, 5, freeu, masked, "sdpa")


def test_diffusers_freeu_folds_backbone_where_a_conv_produces_it(g):
    unet = tiny_unet()
    _, rep = check_model(g, unet, 1, 3, dict(s1=0.9, s2=0.2, b1=1.2, b2=1.4), False, "sdpa")
    # up_blocks.0.resnets.1 reads conv2 + shortcut; up_blocks.1.resnets.0 reads the upsampler conv;
    # the other two read residual sums and keep one channel-scale multiply
    assert rep["freeu_backbone"] == 4 and rep["fold_channel_scale"] == 2


def test_diffusers_fused_projections_are_left_alone(g):
    unet = tiny_unet()
    unet.fuse_qkv_projections()
    x, t, ehs = torch.randn(1, 4, 8, 8), torch.tensor([10]), torch.randn(1, 3, 8)
    with torch.no_grad():
        ref = unet(x, t, ehs).sample
    ep2, rep = passes.optimize(_export(unet, (x, t, ehs), {}))
    assert rep["fuse_qkv"] == 0
    assert_close(_run(ep2, x, t, ehs), ref, scale_tol=1e-5)


def test_our_unet_equivalence(g):
    from compiled_unet import UNet2DConditionModel

    unet = tiny_unet(cls=UNet2DConditionModel)
    for freeu in (None, dict(s1=0.9, s2=0.2, b1=1.2, b2=1.4)):
        for masked in (False, True):
            check_model(g, unet, 2, 4, freeu, masked, "sdpa")


def test_optimized_program_round_trips(g):
    unet = tiny_unet()
    unet.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    x, t, ehs = torch.randn(2, 4, 8, 8), torch.tensor([1, 500]), torch.randn(2, 3, 8)
    m = torch.tensor([[1, 0, 1], [0, 0, 0]])
    ep2, _ = passes.optimize(_export(unet, (x, t, ehs), dict(encoder_attention_mask=m)))
    buf = io.BytesIO()
    torch.export.save(ep2, buf)
    buf.seek(0)
    ep3 = torch.export.load(buf)
    a = _run(ep2, x, t, ehs, encoder_attention_mask=m)
    b = _run(ep3, x, t, ehs, encoder_attention_mask=m)
    assert torch.equal(a, b)
    assert any(k.endswith("to_qkv.weight") for k in ep3.state_dict)
    assert g.complex_or_fft(ep3) == []
    dec = ep3.run_decompositions()
    assert_close(_run(dec, x, t, ehs, encoder_attention_mask=m), a, scale_tol=1e-5)
