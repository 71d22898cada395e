"""Inductor's C++ kernels built in shared translation units (compiled_unet/backends/cpp_units.py): the same
machine code, so bitwise the same answers; fewer compiler runs; torch's own path when a unit cannot be built."""
import os

import pytest
import torch
import torch._inductor.config
from torch._inductor.utils import fresh_cache

from compiled_unet.backends import cpp_units
from compiled_unet.progress import CompileProgress, count_cpp_kernels


def several_kernels(x, y):
    # reductions and matmuls between pointwise chains: Inductor cannot fuse across them, so it emits several kernels
    a = (x.sin() + y).relu()
    b = (a @ y).softmax(-1)
    c = (b @ x).cos() * 3
    return c.sum(0), b.amax(1), (a - c).tanh()


def _kernel_libraries(folder) -> list[str]:
    """The shared libraries holding kernels' Python bindings (not Inductor's SIMD probes)."""
    found = [os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs if f.endswith(".so")]
    return [p for p in found if b"PyInit_kernel" in open(p, "rb").read()]


def _compile(folder, batched: bool, inputs, progress=None):
    graph = torch.fx.symbolic_trace(several_kernels)
    os.makedirs(folder, exist_ok=True)
    with fresh_cache(dir=str(folder)), torch._inductor.config.patch(compile_threads=2), \
            count_cpp_kernels(progress), cpp_units.batched_cpp_kernels(batched):
        compiled = torch._inductor.compile(graph, inputs)
        kernel_libraries = _kernel_libraries(folder)
    return compiled, kernel_libraries


@pytest.mark.slow
def test_shared_units_give_bitwise_the_same_answers_from_fewer_libraries(tmp_path):
    inputs = [torch.randn(32, 32), torch.randn(32, 32)]
    plain, plain_libs = _compile(tmp_path / "plain", False, inputs)
    progress = CompileProgress(enabled=False)
    batched, batched_libs = _compile(tmp_path / "batched", True, inputs, progress)
    assert len(plain_libs) >= 3, "the test graph should make several kernels"
    # one unit (at most _UNIT_KERNELS kernels): the kernels seen while Inductor generated code are the ones its module
    # then ran, or they would have been built a second time in another unit
    assert len(plain_libs) <= cpp_units._UNIT_KERNELS and len(batched_libs) == 1
    # every kernel still counted by the progress line, each done when its unit is
    assert progress.kernels_total == len(plain_libs) and progress.kernels_done == progress.kernels_total
    x, y = torch.randn(32, 32), torch.randn(32, 32)
    for got, want, eager in zip(batched(x, y), plain(x, y), several_kernels(x, y)):
        assert torch.equal(got, want)                                # same kernels, same machine code
        torch.testing.assert_close(got, eager)                       # default fp32 tolerances


@pytest.mark.slow
def test_a_unit_that_fails_to_build_falls_back_to_one_kernel_at_a_time(tmp_path, monkeypatch):
    inputs = [torch.randn(16, 16), torch.randn(16, 16)]
    monkeypatch.setattr(cpp_units._Unit, "source", lambda self: "this is not C++;\n")
    with pytest.warns(RuntimeWarning, match="building them one by one"):
        compiled, libs = _compile(tmp_path / "broken", True, inputs)
    assert len(libs) >= 3                                            # torch's per-kernel libraries
    x, y = torch.randn(16, 16), torch.randn(16, 16)
    for got, want in zip(compiled(x, y), several_kernels(x, y)):
        torch.testing.assert_close(got, want)


def test_only_plain_kernel_sources_share_a_unit():
    kernel = '#include <torch/csrc/inductor/cpp_prefix.h>\nextern "C"  void  kernel(const float* in_ptr0)\n{\n}\n'
    assert cpp_units._batchable(kernel)
    assert not cpp_units._batchable("#define N 4\n" + kernel)            # would leak into later kernels
    assert not cpp_units._batchable(kernel + kernel.split("\n", 1)[1])  # two entry points
    assert not cpp_units._batchable('static int helper;\n' + kernel)     # top-level code before the kernel
    assert not cpp_units._batchable("void other(){}\n")


def test_kernel_calls_are_read_from_the_generated_code_exactly():
    source = '#include <x.h>\nextern "C"  void  kernel(const float* in_ptr0)\n{\n    a = "\\n";\n}\n'
    body = f"async_compile.cpp_pybinding(['const float*', 'int64_t'], r'''{source}''')"
    assert cpp_units._cpp_pybinding_call(body) == (["const float*", "int64_t"], source)
    assert cpp_units._cpp_pybinding_call("async_compile.triton('k', '''...''')") is None
    assert cpp_units._cpp_pybinding_call("async_compile.cpp_pybinding(argtypes, src)") is None   # not literals
    assert cpp_units._cpp_pybinding_call("not python (") is None
