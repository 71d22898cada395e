"""torch.export captures our UNet as ONE graph whose output equals eager, for every family and optional input.

Tolerance: exported vs eager runs the same ATen ops, so we require max-abs <= 1e-6 * output scale.
"""
import copy

import pytest
import torch

import compiled_unet
from tests.cases import CONFIGS, build, inputs_for


def _assert_close(got: torch.Tensor, ref: torch.Tensor, rtol: float = 1e-6):
    scale = max(1.0, ref.abs().max().item())
    err = (got - ref).abs().max().item()
    assert err <= rtol * scale, f"max-abs {err:.3e} > {rtol:.0e} x scale {scale:.3f}"


def _export_and_compare(model, args, kwargs):
    with torch.no_grad():
        ref = model(*args, **copy.deepcopy(kwargs)).sample
    ep = compiled_unet.export(model, *args, **copy.deepcopy(kwargs))
    assert isinstance(ep, torch.export.ExportedProgram)
    # One graph: no nested graph modules, every call is an ATen/higher-order op.
    assert not any(isinstance(m, torch.fx.GraphModule) for _, m in ep.graph_module.named_children())
    with torch.no_grad():
        out = ep.module()(*args, **{**copy.deepcopy(kwargs), "return_dict": False})[0]
    _assert_close(out, ref)
    return ep


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_export_matches_eager(name):
    model = build(name)
    args, kwargs = inputs_for(name)
    _export_and_compare(model, args, kwargs)


@pytest.mark.parametrize("hw", [(7, 9), (5, 5)])
def test_export_odd_sizes(hw):
    model = build("sd")
    args, kwargs = inputs_for("sd", hw=hw)
    _export_and_compare(model, args, kwargs)


def test_export_masks_controlnet_and_python_timestep():
    model = build("sd")
    (sample, _), kwargs = inputs_for("sd", hw=(8, 8))
    kwargs["encoder_attention_mask"] = torch.tensor([[1, 1, 0, 1, 0], [1, 0, 0, 0, 0]])
    res = [torch.randn(2, 8, 8, 8), torch.randn(2, 8, 8, 8), torch.randn(2, 8, 4, 4), torch.randn(2, 16, 4, 4)]
    kwargs["down_block_additional_residuals"] = tuple(res)
    kwargs["mid_block_additional_residual"] = torch.randn(2, 16, 4, 4)
    ep = _export_and_compare(model, (sample, 3), kwargs)
    # A Python timestep is a constant of the graph: its input slot feeds nothing.
    placeholders = [n for n in ep.graph.nodes if n.op == "placeholder" and n.name == "timestep"]
    assert placeholders and all(not n.users for n in placeholders)


def test_export_adapter_residuals_and_freeu():
    model = build("sd")
    model.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    args, kwargs = inputs_for("sd")
    kwargs["down_intrablock_additional_residuals"] = [torch.randn(2, 8, 8, 8), torch.randn(2, 16, 4, 4)]
    _export_and_compare(model, args, kwargs)


def test_export_accepts_diffusers_unet():
    diffusers = pytest.importorskip("diffusers")
    from tests.cases import BASE, randomize_
    ref = randomize_(diffusers.UNet2DConditionModel(**BASE)).eval()
    args, kwargs = inputs_for("sd")
    _export_and_compare(ref, args, kwargs)


@pytest.mark.parametrize("source", ["ours", "diffusers"])
def test_program_is_called_like_the_model(source):
    """ep.module() takes the UNet's own calls: positional text, keyword text, return_dict left out or False."""
    if source == "diffusers":
        diffusers = pytest.importorskip("diffusers")
        from tests.cases import BASE, randomize_
        model = randomize_(diffusers.UNet2DConditionModel(**BASE)).eval()
    else:
        model = build("sd")
    (sample, t), kwargs = inputs_for("sd")
    text = kwargs["encoder_hidden_states"]
    with torch.no_grad():
        ref = model(sample, t, text).sample
    ep = compiled_unet.export(model, sample, t, text)
    # The program keeps torch.export's structure (backends read it) and the UNet's own weights and modules.
    assert ep.call_spec.in_spec == torch.utils._pytree.tree_flatten(
        ((sample, t), {"encoder_hidden_states": text, "return_dict": False}))[1]
    assert list(ep.state_dict) == [k for k in model.state_dict() if k in ep.state_dict]
    assert set(ep.state_dict) | set(ep.constants) >= {n for n, _ in model.named_parameters()}
    stacks = [n.meta["nn_module_stack"] for n in ep.graph.nodes if n.op == "call_function"]
    assert any(path == "down_blocks.0.attentions.0" for s in stacks for path, _ in s.values())
    program = ep.module()
    with torch.no_grad():
        for out in (program(sample, t, text), program(sample, t, encoder_hidden_states=text),
                    program(sample=sample, timestep=t, encoder_hidden_states=text),
                    program(sample, t, text, return_dict=False), program(sample, t, text, class_labels=None)):
            assert isinstance(out, tuple) and len(out) == 1
            _assert_close(out[0], ref)
    # Bound by the runtime's one Signature: the same messages as a compiled UNet's.
    with pytest.raises(ValueError, match="return_dict is True but the graph was compiled with False"):
        program(sample, t, text, return_dict=True)
    with pytest.raises(ValueError, match=r"compiled without \['class_labels'\]"):
        program(sample, t, text, class_labels=torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"missing \['encoder_hidden_states'\]"):
        program(sample, t)
