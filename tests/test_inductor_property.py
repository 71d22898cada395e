"""Property: Inductor CPU (export -> passes -> freezing jit) equals eager on drawn small configs and inputs.

Each example is a full Inductor compile (~30-90 s on 2 cores), so only a few are drawn; the families
(sd, sdxl, unclip, attn) cover cross-attention, added-KV attention, spatial attention and SDXL's added
time embedding. Tolerance: fp32 max-abs <= 1e-4 x max(1, |eager|) (Inductor reorders reductions and fuses).
"""
import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import compiled_unet
from tests import strategies as S
from tests.cases import randomize_
from tests.closeness import assert_close

pytestmark = pytest.mark.slow


@settings(max_examples=2, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_inductor_matches_eager_on_drawn_configs(data):
    cfg = data.draw(S.unet_configs(families=("sd", "sdxl", "unclip", "attn"), max_blocks=2), label="config")
    spec = data.draw(S.input_specs(cfg), label="inputs")
    model = randomize_(compiled_unet.UNet2DConditionModel(**cfg), seed=spec.seed % 1000).eval()
    inputs = S.build_inputs(cfg, spec)
    inputs.pop("return_dict")
    inputs.pop("cross_attention_kwargs", None)  # a Python LoRA scale: no LoRA loaded here
    sample, timestep = inputs.pop("sample"), inputs.pop("timestep")
    with torch.no_grad():
        ref = model(sample, timestep, **copy.deepcopy(inputs)).sample
    compiled = compiled_unet.compile(model, sample, timestep, **copy.deepcopy(inputs))
    out = compiled(sample, timestep, **copy.deepcopy(inputs)).sample
    assert_close(out, ref, scale_tol=1e-4, what=S.describe_spec(spec))


def test_compile_accepts_diffusers_unet():
    """compile() takes diffusers' own UNet2DConditionModel: export -> passes -> Inductor, equal to its eager."""
    diffusers = pytest.importorskip("diffusers")
    from tests.cases import BASE, inputs_for
    model = randomize_(diffusers.UNet2DConditionModel(**BASE)).eval()
    (sample, timestep), kwargs = inputs_for("sd")
    with torch.no_grad():
        ref = model(sample, timestep, **kwargs).sample
    compiled = compiled_unet.compile(model, sample, timestep, **kwargs)
    assert compiled.config.block_out_channels == (8, 16)  # diffusers' config, converted
    out = compiled(sample, timestep, **kwargs).sample
    assert_close(out, ref, scale_tol=1e-4)
