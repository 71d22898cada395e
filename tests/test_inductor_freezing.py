"""CPU freezing really reaches Inductor: weights are prepacked into oneDNN/MKL kernels.

`torch.compile(options={"freezing": True})` alone does not enable freezing (Inductor reads it outside the
options patch); JitRunner patches the config while compiling. Checked on a one-conv, one-linear program
(seconds to compile) by reading the generated code.
"""
import torch
import pytest
from torch._inductor.utils import run_and_get_code

from compiled_unet.backends.inductor import InductorOptions, JitRunner
from tests.cases import ConvLinear
from tests.closeness import assert_close


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
def test_jit_cpu_freezing_prepacks_weights():
    model = ConvLinear().eval()
    x = torch.randn(1, 8, 8, 8)
    ep = torch.export.export(model, (x,))
    # Freezing is an option of the jit runtime (the float32 CPU jit default packs in the graph instead:
    # tests/passes/test_passes_prepack.py, tests/test_compile_cache.py).
    options = InductorOptions(freezing=True).resolve(torch.device("cpu"))
    assert options.freezing and options.channels_last and not options.prepack_weights
    runner, codes = run_and_get_code(lambda: JitRunner(ep, options, (x,), {}))
    code = "\n".join(codes)
    assert "_convolution_pointwise" in code, "conv was not prepacked (freezing not applied)"
    out = runner(*runner.prepare((x,), {}))  # the runner protocol: prepare, then call
    with torch.no_grad():
        ref = model(x)[0]
    assert_close(out[0], ref)  # another kernel: max-abs <= 1e-4 x scale


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="needs oneDNN")
def test_aot_cpu_package_is_frozen_and_prepacked(tmp_path):
    """The CPU AOT default freezes, and freezing reaches AOTInductor: Inductor applies it only with grad mode
    off, which aot_compile must set itself (without it the package ran unpacked convs, 3.8x slower)."""
    import zipfile

    from compiled_unet.backends.inductor import AotRunner, aot_compile

    model = ConvLinear().eval()
    x = torch.randn(1, 8, 8, 8)
    ep = torch.export.export(model, (x,))
    options = InductorOptions(aot=True).resolve(torch.device("cpu"))
    assert options.freezing
    path = aot_compile(ep, options, str(tmp_path / "m.pt2"), {})
    with zipfile.ZipFile(path) as z:
        code = "\n".join(z.read(n).decode() for n in z.namelist() if n.endswith("wrapper.cpp"))
    assert "mkldnn__convolution_pointwise" in code, "the AOT package's conv was not prepacked"
    runner = AotRunner(path, {})
    out = runner(*runner.prepare((x,), {}))
    with torch.no_grad():
        ref = model(x)[0]
    assert_close(out[0], ref)  # another kernel: max-abs <= 1e-4 x scale
