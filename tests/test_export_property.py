"""Property: for drawn configs and optional inputs, torch.export gives ONE graph whose output == eager.

Draws come from tests/strategies.py (every runnable family: sd, sdxl, unclip, kandinsky, attn, mixed,
k-diffusion, gligen). Tolerance: the exported program runs the same ATen ops as eager, so
max-abs <= 1e-5 x max(1, |eager|) (slack only for op-order differences in decomposed kernels).
"""
import copy

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import compiled_unet
from tests import strategies as S
from tests.cases import randomize_
from tests.closeness import assert_close


@settings(max_examples=8)
@given(data=st.data())
def test_drawn_configs_export_to_one_graph_equal_to_eager(data):
    cfg = data.draw(S.unet_configs(families=S.RUNNABLE_FAMILIES, max_blocks=2), label="config")
    spec = data.draw(S.input_specs(cfg), label="inputs")
    model = randomize_(compiled_unet.UNet2DConditionModel(**cfg), seed=spec.seed % 1000).eval()
    inputs = S.build_inputs(cfg, spec)
    inputs.pop("return_dict")
    sample, timestep = inputs.pop("sample"), inputs.pop("timestep")
    with torch.no_grad():
        ref = model(sample, timestep, **copy.deepcopy(inputs)).sample
    ep = compiled_unet.export(model, sample, timestep, **copy.deepcopy(inputs))
    assert not any(isinstance(m, torch.fx.GraphModule) for _, m in ep.graph_module.named_children())
    with torch.no_grad():
        out = ep.module()(sample, timestep, **copy.deepcopy(inputs), return_dict=False)[0]
    assert_close(out, ref, scale_tol=1e-5, what=S.describe_spec(spec))
