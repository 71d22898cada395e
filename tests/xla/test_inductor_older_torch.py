"""The Inductor backend on the oldest torch the project supports (the XLA environment's 2.9.1; the default
environment pins 2.13). Each case here failed on an older torch before it was fixed:
  * a bool graph input (`return_dict`) that Inductor < 2.13 refuses (seen on the GPU machine's torch 2.11);
  * the progress line's kernel counter calling `result(timeout)` on a future that takes no timeout;
  * an AOT package of convolutions packed by the passes: torch < 2.13 clones every buffer, packed ones too;
  * MKL's packed linear as a custom op of the jit graph: torch < 2.13 reads its opaque weight's storage.
Tolerance: max-abs <= 1e-4 x max(1, max |eager|) (fp32, the same math up to summation order).
"""
from __future__ import annotations

import io

import pytest
import torch

import compiled_unet
from compiled_unet.backends import InductorOptions
from compiled_unet.progress import CompileProgress
from tests.cases import build, inputs_for
from tests.closeness import assert_close


@pytest.fixture(scope="module")
def case():
    model = build("sd")
    (sample, timestep), kwargs = inputs_for("sd", batch=2, hw=(8, 8))
    with torch.no_grad():
        ref = model(sample, timestep, **kwargs).sample
    return model, sample, timestep, kwargs, ref


def test_jit_compile_with_the_kernel_counter(case):
    model, sample, timestep, kwargs, ref = case
    progress = CompileProgress(enabled=True, stream=io.StringIO())  # counts kernels (shows them if tqdm is here)
    compiled = compiled_unet.compile(model, sample, timestep, progress=progress, **kwargs)
    with torch.no_grad():
        assert_close(compiled(sample, timestep, **kwargs).sample, ref, scale_tol=1e-4)
    assert progress.kernels_total >= 1 and progress.kernels_done == progress.kernels_total
    runner = compiled._runner
    assert runner._user_leaf_kept.count(False) == 1  # return_dict never reached Inductor


def test_aot_package_with_packed_convolutions(case, tmp_path):
    model, sample, timestep, kwargs, ref = case
    compiled = compiled_unet.compile(model, sample, timestep, options=InductorOptions(aot=True), progress=False,
                                     **kwargs)
    assert "prepack_onednn" in compiled.report.rewrites  # the passes packed them; freezing kept the packed ones
    compiled_unet.save(compiled, tmp_path / "unet.pt2")
    loaded = compiled_unet.load(tmp_path / "unet.pt2")
    with torch.no_grad():
        assert_close(compiled(sample, timestep, **kwargs).sample, ref, scale_tol=1e-4)
        assert_close(loaded(sample, timestep, **kwargs).sample, ref, scale_tol=1e-4)


def test_mkl_linears_in_the_jit_graph_only_where_they_run():
    from compiled_unet.backends import cpu_kernels

    cpu = torch.device("cpu")
    if cpu_kernels.mkl_packed_op_runs():
        assert InductorOptions(linear_kernel="mkl").resolve(cpu).linear_kernel == "mkl"
    else:  # torch 2.9: the default never picks it, and asking for it says why
        assert InductorOptions().resolve(cpu).linear_kernel == "onednn"
        with pytest.raises(ValueError, match="linear_kernel='onednn'"):
            InductorOptions(linear_kernel="mkl").resolve(cpu)
    assert InductorOptions(linear_kernel="mkl", freezing=True).resolve(cpu).linear_kernel == "mkl"
