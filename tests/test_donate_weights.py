"""`compile(..., donate_weights=True)`: each parameter's memory is freed as soon as the passes stop reading it
(the CPU jit default packs every convolution and linear weight), so the compile holds the packed weights instead
of the model's copy plus the packed one. The model given up refuses to run; the compiled UNet is exact.
Compiled vs an identical untouched model's eager: max-abs <= 1e-4 x max(1, |eager|)."""
from __future__ import annotations

import pytest
import torch

import compiled_unet
from cases import build, inputs_for
from compiled_fixtures import assert_close_to_eager


def _bytes(model: torch.nn.Module) -> int:
    return sum(p.untyped_storage().nbytes() for p in model.parameters())


def test_donated_weights_are_freed_and_the_compiled_unet_is_exact():
    model, twin = build("sd"), build("sd")  # same seed: the twin keeps its weights to give the reference
    (sample, timestep), kwargs = inputs_for("sd", batch=2, hw=(8, 8))
    before = _bytes(model)
    compiled = compiled_unet.compile(model, sample, timestep, **kwargs, donate_weights=True)
    assert compiled.options.prepack_weights  # the CPU jit default: every conv/linear weight is packed
    freed = compiled.report.donated_bytes
    # Every convolution weight is packed, so freed; what stays are norms, biases, embeddings and (MKL route)
    # the linear weights MKL keeps beside its packed copy.
    conv = sum(m.weight.numel() * 4 for m in twin.modules() if isinstance(m, torch.nn.Conv2d))
    assert freed >= conv and before - _bytes(model) == freed
    assert all(m.weight.untyped_storage().nbytes() == 0 for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    with torch.no_grad():
        ref = twin(sample, timestep, **kwargs).sample
        assert_close_to_eager(compiled(sample, timestep, **kwargs).sample, ref)
        with pytest.raises(RuntimeError, match="donate_weights=True"):
            model(sample, timestep, **kwargs)
    # New weights still map through the passes (they need the donated weights' shapes only).
    other = build("sd", seed=8)
    compiled.swap_weights(other.state_dict())
    with torch.no_grad():
        assert_close_to_eager(compiled(sample, timestep, **kwargs).sample, other(sample, timestep, **kwargs).sample)
    assert all(p.untyped_storage().nbytes() > 0 for p in other.parameters())  # a swap donates nothing


def test_a_plain_compile_keeps_no_second_copy_of_the_weights():
    """Without donating, the caller's model keeps its weights and the compiled UNet holds only what its graph runs
    on (packed copies, small unpacked weights): once the model is dropped, no convolution weight of it is alive
    (`pipe.unet = compile(pipe.unet)` then holds the weights once, not twice). `derive_weights` / `swap_weights`
    still map new weights through the passes. Compiled vs eager: max-abs <= 1e-4 x max(1, |eager|)."""
    import gc
    import weakref

    model, twin = build("sd"), build("sd")
    (sample, timestep), kwargs = inputs_for("sd", batch=2, hw=(8, 8))
    compiled = compiled_unet.compile(model, sample, timestep, **kwargs)
    assert compiled.report.rewrites.get("prepack_onednn", 0) > 0
    conv_weights = [weakref.ref(m.weight) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        assert_close_to_eager(model(sample, timestep, **kwargs).sample, twin(sample, timestep, **kwargs).sample)
    del model
    gc.collect()
    alive = sum(r() is not None for r in conv_weights)
    assert alive == 0, f"{alive} of {len(conv_weights)} convolution weights of the dropped model kept alive"
    with torch.no_grad():
        assert_close_to_eager(compiled(sample, timestep, **kwargs).sample, twin(sample, timestep, **kwargs).sample)
    other = build("sd", seed=8)
    compiled.swap_weights(other.state_dict())
    with torch.no_grad():
        assert_close_to_eager(compiled(sample, timestep, **kwargs).sample, other(sample, timestep, **kwargs).sample)


@pytest.mark.slow
def test_a_donated_aot_package_packs_in_the_passes_and_is_exact(tmp_path):
    """AOT: a package freezes its weights (Inductor packs them while the model's copy is alive); donating, the
    passes pack the convolutions and free each original, freezing keeps the packed ones, and every other weight
    is freed once the package holds it. The package saves, loads and answers like the untouched twin
    (max-abs <= 1e-4 x scale)."""
    from compiled_unet.backends import InductorOptions

    model, twin = build("sd"), build("sd")
    (sample, timestep), kwargs = inputs_for("sd", batch=2, hw=(8, 8))
    compiled = compiled_unet.compile(model, sample, timestep, **kwargs, options=InductorOptions(aot=True),
                                     donate_weights=True)
    assert compiled.options.freezing and compiled.report.rewrites.get("prepack_onednn", 0) > 0
    assert all(m.weight.untyped_storage().nbytes() == 0 for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    # the package holds every weight: the rest (linears freed once freezing packed them, norms, biases) goes too
    left = [n for n, p in model.named_parameters() if p.untyped_storage().nbytes()]
    assert not left, left[:5]
    # counted: exactly the model's weights (the passes' own fused Q/K/V weights are freed too, not counted)
    assert compiled.report.donated_bytes == sum(p.numel() * p.element_size() for p in twin.parameters()), \
        (compiled.report.donated_bytes, sum(p.numel() * p.element_size() for p in twin.parameters()))
    loaded = compiled_unet.load(compiled_unet.save(compiled, tmp_path / "donated.pt2"))
    with torch.no_grad():
        ref = twin(sample, timestep, **kwargs).sample
        assert_close_to_eager(compiled(sample, timestep, **kwargs).sample, ref)
        assert_close_to_eager(loaded(sample, timestep, **kwargs).sample, ref)


def test_donate_weights_is_a_bool():
    model = build("sd")
    (sample, timestep), kwargs = inputs_for("sd", batch=2, hw=(8, 8))
    with pytest.raises(TypeError, match="donate_weights"):
        compiled_unet.compile(model, sample, timestep, **kwargs, donate_weights="yes")
