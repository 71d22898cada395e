"""Without torch_xla (the default environment), the XLA entry points fail with one clear line.

torch_xla's absence is simulated (sys.modules entry set to None), so this holds in .venv-xla too.
"""
import sys

import pytest

from compiled_unet.backends import xla


@pytest.fixture
def no_torch_xla(monkeypatch):
    for name in [n for n in sys.modules if n == "torch_xla" or n.startswith("torch_xla.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "torch_xla", None)


@pytest.mark.parametrize("call", [
    lambda: xla.compile_openxla(object()),
    lambda: xla.export_stablehlo(object(), "unused-path"),
    lambda: xla.load_stablehlo("unused-path"),
    lambda: xla.xla_device(),
    lambda: xla.compile_count(),
], ids=["compile_openxla", "export_stablehlo", "load_stablehlo", "xla_device", "compile_count"])
def test_entry_points_say_how_to_get_xla(no_torch_xla, call, tmp_path):
    with pytest.raises(xla.XLAEnvironmentMissing) as info:
        call()
    msg = str(info.value)
    assert msg.startswith("XLA environment missing: run bash scripts/env_xla.sh"), msg
    assert "\n" not in msg and "torch-xla 2.9.0" in msg
    assert info.value.__cause__ is None and info.value.__suppress_context__
    assert not (tmp_path / "unused-path").exists()


def test_available_is_false(no_torch_xla):
    assert xla.available() is False


def test_compile_backend_xla_says_how_to_get_xla(no_torch_xla):
    import compiled_unet
    from tests.cases import build, inputs_for
    args, kwargs = inputs_for("sd")
    with pytest.raises(xla.XLAEnvironmentMissing, match="^XLA environment missing"):
        compiled_unet.compile(build("sd"), *args, backend="xla", passes=None, **kwargs)
    with pytest.raises(ValueError, match="xla backend takes none"):
        from compiled_unet.backends import InductorOptions
        compiled_unet.compile(build("sd"), *args, backend="xla", options=InductorOptions(), **kwargs)
