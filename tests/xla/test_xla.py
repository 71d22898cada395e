"""The XLA backend on the PJRT CPU device: dynamo's openxla backend and StableHLO artifacts, vs eager.

Tolerance (fp32): max-abs <= 1e-4 x max(1, output scale), as for the other backends (XLA's CPU kernels
reduce in other orders than ATen's; observed errors are ~5e-7 on the tiny model).
Compiles are shared per module: two openxla compiles and two StableHLO lowerings (plain and optimized).
"""
import json
import os
import subprocess
import sys
import time

import pytest
import torch

import compiled_unet
import compiled_unet.runtime
from compiled_unet.errors import DamagedArtifact
from compiled_unet.backends import xla
from tests.cases import build, inputs_for
from tests.closeness import assert_close

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VARIANTS = ("plain", "optimized")


def _assert_close(got, ref):
    """XLA vs eager: the same dtype, and max-abs <= 1e-4 x scale (tests/closeness.py)."""
    assert got.dtype == ref.dtype, (got.dtype, ref.dtype)
    assert_close(got, ref, scale_tol=1e-4)


@pytest.fixture(scope="module")
def case():
    torch.manual_seed(0)
    model = build("sd")
    args, kwargs = inputs_for("sd")
    args2, kwargs2 = inputs_for("sd", seed=7)      # same shapes, other values
    with torch.no_grad():
        ref = model(*args, **kwargs).sample
        ref2 = model(*args2, **kwargs2).sample
    ep = compiled_unet.export(model, *args, **kwargs)
    return dict(ep=ep, args=args, kwargs=kwargs, ref=ref, args2=args2, kwargs2=kwargs2, ref2=ref2)


@pytest.fixture(scope="module")
def openxla_modules(case):
    return {v: xla.compile_openxla(case["ep"], optimize=v == "optimized") for v in VARIANTS}


@pytest.fixture(scope="module")
def artifacts(case, tmp_path_factory):
    root = tmp_path_factory.mktemp("stablehlo")
    out = {}
    for v in VARIANTS:
        t0 = time.perf_counter()
        art = xla.export_stablehlo(case["ep"], root / v, optimize=v == "optimized")
        print(f"[xla] StableHLO export ({v}): {time.perf_counter() - t0:.1f} s")
        out[v] = art
    return out


@pytest.mark.parametrize("variant", VARIANTS)
def test_openxla_matches_eager_without_recompiling(case, openxla_modules, variant):
    fast = openxla_modules[variant]
    out = fast(*case["args"], **case["kwargs"])
    assert isinstance(out, tuple) and len(out) == 1 and out[0].device.type == "cpu"
    _assert_close(out[0], case["ref"])
    print(f"[xla] openxla first call ({variant}, trace + XLA compile + run): {fast.compile_seconds:.1f} s")
    before = xla.compile_count()
    # encoder_hidden_states positionally, as UNet2DConditionModel.forward takes it
    _assert_close(fast(*case["args2"], case["kwargs2"]["encoder_hidden_states"], return_dict=False)[0], case["ref2"])
    assert xla.compile_count() == before, "new inputs of the same shapes recompiled"


def test_openxla_rejects_other_shapes(case, openxla_modules):
    args, kwargs = inputs_for("sd", batch=1)
    with pytest.raises(ValueError, match=r"sample is \[1, 4, 8, 8\].*expected \[2, 4, 8, 8\]"):
        openxla_modules["plain"](*args, **kwargs)
    with pytest.raises(ValueError, match=r"compiled without \['class_labels'\]"):
        openxla_modules["plain"](*case["args"], **case["kwargs"], class_labels=torch.zeros(2))


def test_stablehlo_artifact_layout(artifacts):
    for v, art in artifacts.items():
        files = sorted(os.listdir(art.path))
        assert files == sorted(["compiled_unet_xla.json", xla.HLO_FILE, "constants", "data", "functions"]), files
        assert os.listdir(art.path / "data"), "weights were not saved"
        manifest = json.loads((art.path / "compiled_unet_xla.json").read_text())
        assert manifest["format"] == xla.FORMAT and manifest["optimized"] == (v == "optimized")
        sig = compiled_unet.runtime.Signature.from_json(manifest["signature"])
        assert [x.name for x in sig.leaves if x.is_tensor] == ["sample", "timestep", "encoder_hidden_states"]
        assert "stablehlo" in (art.stablehlo_text() or "")
        assert not [p for p in os.listdir(art.path.parent) if p.startswith(".")], "temp dirs left behind"


def test_stablehlo_from_disk_in_fresh_process(case, artifacts, tmp_path):
    """Both artifacts load and run in a new process that never builds the model."""
    torch.save({"args": case["args"], "kwargs": case["kwargs"]}, tmp_path / "inputs.pt")
    script = (
        "import sys, torch\n"
        "from compiled_unet.backends import xla\n"
        "inp = torch.load(sys.argv[1])\n"
        "outs = {}\n"
        "for name, path in zip(sys.argv[3::2], sys.argv[4::2]):\n"
        "    outs[name] = xla.load_stablehlo(path)(*inp['args'], **inp['kwargs'])[0]\n"
        "assert 'tests.cases' not in sys.modules\n"
        "torch.save(outs, sys.argv[2])\n"
    )
    argv = [sys.executable, "-c", script, str(tmp_path / "inputs.pt"), str(tmp_path / "outputs.pt")]
    for v, art in artifacts.items():
        argv += [v, str(art.path)]
    env = dict(os.environ, PJRT_DEVICE=os.environ.get("PJRT_DEVICE", "CPU"), PYTHONPATH=ROOT)
    t0 = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    print(f"[xla] fresh process: load + run both artifacts: {time.perf_counter() - t0:.1f} s")
    outs = torch.load(tmp_path / "outputs.pt")
    assert sorted(outs) == sorted(VARIANTS)
    for v in VARIANTS:
        _assert_close(outs[v], case["ref"])


def test_stablehlo_rejects_bad_inputs_and_paths(case, artifacts, tmp_path):
    art = xla.load_stablehlo(artifacts["plain"].path)
    args, kwargs = inputs_for("sd", seq=6)
    with pytest.raises(ValueError, match=r"encoder_hidden_states is \[2, 6, 8\].*expected \[2, 5, 8\]"):
        art(*args, **kwargs)
    with pytest.raises(ValueError, match="return_dict is True but the graph was compiled with False"):
        art(*case["args"], **case["kwargs"], return_dict=True)
    with pytest.raises(DamagedArtifact, match="not a compiled_unet StableHLO artifact"):
        xla.load_stablehlo(tmp_path)
    (tmp_path / "compiled_unet_xla.json").write_text("{broken")
    with pytest.raises(DamagedArtifact, match="damaged StableHLO artifact manifest"):
        compiled_unet.load(tmp_path)


def test_stablehlo_save_replaces_atomically(case, artifacts, tmp_path):
    """Saving over an existing artifact swaps the directory in one rename and leaves no temp dirs."""
    target = tmp_path / "unet"
    target.mkdir()
    (target / "stale.txt").write_text("old")
    xla.export_stablehlo(case["ep"], target, include_text=False)
    assert not (target / "stale.txt").exists()
    assert sorted(os.listdir(tmp_path)) == ["unet"]
    assert not (target / "functions" / "forward.mlir").exists()


def test_xla_errors_are_clear_without_torch_xla(monkeypatch, case):
    monkeypatch.setitem(sys.modules, "torch_xla", None)
    with pytest.raises(xla.XLAEnvironmentMissing, match="^XLA environment missing: run bash scripts/env_xla.sh"):
        xla.compile_openxla(case["ep"])
    assert not xla.available()


def test_compile_backend_xla_matches_eager(case):
    """`compiled_unet.compile(..., backend="xla")`: export -> passes -> openxla, behind the UNet's signature."""
    model = build("sd")
    args, kwargs = case["args"], case["kwargs"]
    compiled = compiled_unet.compile(model, *args, backend="xla", **kwargs)
    assert compiled.report is not None and compiled.report.rewrites["fuse_qkv"] > 0
    out = compiled(*args, **kwargs)
    _assert_close(out.sample, case["ref"])
    _assert_close(compiled(*case["args2"], **case["kwargs2"], return_dict=False)[0], case["ref2"])
    with pytest.raises(ValueError, match="sample"):
        compiled(torch.randn(1, 4, 8, 8), args[1][:1], **kwargs)


def test_save_and_load_an_xla_compiled_unet(case, tmp_path):
    """save() of an XLA-compiled UNet writes a StableHLO folder (atomically, parents created) that load() and
    the CLI's run verb read back; the second call of the loaded artifact runs without error."""
    model = build("sd")
    args, kwargs = case["args"], case["kwargs"]
    compiled = compiled_unet.compile(model, *args, backend="xla", **kwargs)
    path = compiled_unet.save(compiled, tmp_path / "new" / "unet-hlo")
    loaded = compiled_unet.load(path)
    assert loaded.signature == compiled.signature and loaded.config == compiled.config
    _assert_close(loaded(*args, **kwargs).sample, case["ref"])
    from compiled_unet.cli import main
    assert main(["run", str(path), "--repeats", "1"]) == 0


def test_cli_compile_xla_then_run(tmp_path, capsys):
    from compiled_unet.cli import main
    out = tmp_path / "tiny-hlo"
    assert main(["compile", "--preset", "tiny", "--shapes", "1x8x8", "--backend", "xla", "-o", str(out)]) == 0
    assert main(["run", str(out), "--repeats", "1"]) == 0
    assert "shape (1, 4, 8, 8)" in capsys.readouterr().out
