"""Token-wise linear layers on CPU: oneDNN 1x1 convolutions or MKL's packed GEMM, whichever measured faster on
this machine (backends/cpu_kernels.py, recorded once), or as `InductorOptions(linear_kernel=...)` says.
Compiled vs eager: max-abs <= 1e-4 x max(1, |eager|) (compiled_fixtures.assert_close_to_eager)."""
from __future__ import annotations

import os
import zipfile

import pytest
import torch

import compiled_unet
from cases import build, inputs_for
from compiled_fixtures import assert_close_to_eager
from compiled_unet.backends import InductorOptions, cpu_kernels

needs_both = pytest.mark.skipif(not (cpu_kernels.mkl_available() and torch.backends.mkldnn.is_available()),
                                reason="this torch build lacks MKL or oneDNN; only one linear kernel exists")


@pytest.fixture
def fresh_cache(tmp_path):
    from torch._inductor.runtime.cache_dir_utils import temporary_cache_dir

    cpu_kernels.faster_linear_kernel.cache_clear()
    with temporary_cache_dir(str(tmp_path)):
        yield tmp_path
    cpu_kernels.faster_linear_kernel.cache_clear()


@needs_both
@pytest.mark.parametrize("onednn_ms, mkl_ms, chosen", [(10.0, 9.0, "mkl"), (10.0, 9.6, "onednn"), (9.0, 10.0, "onednn")])
def test_measured_once_per_machine_with_a_margin_for_mkl(fresh_cache, monkeypatch, onednn_ms, mkl_ms, chosen):
    calls = []
    monkeypatch.setattr(cpu_kernels, "measure_linear_kernels",
                        lambda: (calls.append(1), {"onednn": onednn_ms, "mkl": mkl_ms})[1])
    assert cpu_kernels.faster_linear_kernel() == chosen
    cpu_kernels.faster_linear_kernel.cache_clear()  # a new process: the record answers, nothing is measured
    assert cpu_kernels.faster_linear_kernel() == chosen
    assert calls == [1]
    assert len(os.listdir(fresh_cache / "compiled_unet_linear_kernel")) == 1


@needs_both
def test_an_isa_cap_is_another_machine_for_the_choice(fresh_cache, monkeypatch):
    # MKL_ENABLE_INSTRUCTIONS / ONEDNN_MAX_CPU_ISA change which kernels run: the AVX-512 answer does not hold.
    calls = []
    monkeypatch.setattr(cpu_kernels, "measure_linear_kernels",
                        lambda: (calls.append(1), {"onednn": 10.0, "mkl": 9.0})[1])
    cpu_kernels.faster_linear_kernel()
    cpu_kernels.faster_linear_kernel.cache_clear()
    monkeypatch.setenv("MKL_ENABLE_INSTRUCTIONS", "AVX2")
    cpu_kernels.faster_linear_kernel()
    assert calls == [1, 1]
    assert len(os.listdir(fresh_cache / "compiled_unet_linear_kernel")) == 2


@needs_both
def test_the_measurement_times_both_kernels():
    times = cpu_kernels.measure_linear_kernels(rounds=2)
    assert set(times) == {"onednn", "mkl"} and all(v > 0 for v in times.values())


@needs_both
def test_mkl_packed_linear_runs_as_a_graph_op_on_the_pinned_torch():
    assert cpu_kernels.mkl_packed_op_runs()  # torch 2.13; older releases fall back (tests/xla)


def test_linear_kernel_option_is_checked():
    with pytest.raises(ValueError, match="linear_kernel must be 'onednn', 'mkl' or None"):
        InductorOptions(linear_kernel="cublas")
    assert InductorOptions().resolve(torch.device("cpu"), torch.bfloat16).linear_kernel == "onednn"
    assert InductorOptions(linear_kernel="onednn").resolve(torch.device("cpu")).linear_kernel == "onednn"


@needs_both
@pytest.mark.parametrize("kernel", ["mkl", "onednn"])
def test_each_linear_kernel_compiles_matches_eager_and_swaps_weights(kernel):
    model, (sample, timestep), kwargs = build("sd"), *inputs_for("sd", batch=2, hw=(8, 8))
    compiled = compiled_unet.compile(model, sample, timestep, **kwargs,
                                     options=InductorOptions(linear_kernel=kernel))
    ran = {s.name: s.rewrites for s in compiled.report.stats}
    assert ("prepack_mkl_linear" in ran) == (kernel == "mkl") and ("linear_to_conv1x1" in ran) == (kernel == "onednn")
    with torch.no_grad():
        assert_close_to_eager(compiled(sample, timestep, **kwargs).sample, model(sample, timestep, **kwargs).sample)
        new = {k: v * 1.01 for k, v in model.state_dict().items()}
        compiled.swap_weights(compiled.derive_weights(new))  # MKL's packed weights re-packed like oneDNN's
        model.load_state_dict(new)
        assert_close_to_eager(compiled(sample, timestep, **kwargs).sample, model(sample, timestep, **kwargs).sample)


@needs_both
def test_a_saved_jit_graph_is_a_package_of_the_weights_it_runs_without_the_custom_op(tmp_path):
    """The jit graph calls MKL through a custom op (Inductor lowers MKL's packed linear for frozen constants only);
    a package must not need it (it loads without compiled_unet, in C++ too): saving turns those calls back into
    linears, which the package's freezing packs for MKL itself. And it holds the weights the graph runs at the
    time of saving: after swap_weights, the new ones (oneDNN- and MKL-packed, and the fused QKV weights), not
    the program's original ones (saving them was a silently different model). Loaded package vs the new
    weights' eager: max-abs <= 1e-4 x scale; the original weights' output differs from it by ~1."""
    model, (sample, timestep), kwargs = build("sd"), *inputs_for("sd", batch=2, hw=(8, 8))
    compiled = compiled_unet.compile(model, sample, timestep, **kwargs, options=InductorOptions(linear_kernel="mkl"))
    other = build("sd", seed=8)
    compiled.swap_weights(other.state_dict())  # in the compiling process: derived through the passes
    path = compiled_unet.save(compiled, tmp_path / "mkl.pt2")
    with zipfile.ZipFile(path) as z:
        texts = [z.read(n) for n in z.namelist() if not n.endswith(".so")]
    assert texts and not any(b"compiled_unet::mkl_linear" in t or b"compiled_unet.mkl_linear" in t for t in texts)
    with torch.no_grad():
        assert_close_to_eager(compiled_unet.load(path)(sample, timestep, **kwargs).sample,
                              other(sample, timestep, **kwargs).sample)
