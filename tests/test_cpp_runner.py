"""serving/cpp: the C++ runner, built with CMake against the installed torch wheel, run on the shared tiny
AOTInductor buckets (tests/compiled_fixtures.py: no extra Inductor compile), compared with the Python runtime.

Tolerances: C++ vs Python on the same package: relative L2 <= 1e-6 (the same compiled code runs on the same
inputs; observed 0, bitwise equal). C++ vs eager: compiled_fixtures' max-abs <= 1e-4 x scale.
The build (one translation unit, ~20 s CPU) is cached under .cache/cpp_runner/<hash of sources + torch>.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import time

import pytest
import torch

import compiled_unet
from compiled_fixtures import assert_close_to_eager, bucket_example, saved_bundle, tiny

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SRC = os.path.join(ROOT, "serving", "cpp")
REL_L2 = 1e-6


def _build_key() -> str:
    h = hashlib.sha256(torch.__version__.encode())
    for name in sorted(os.listdir(SRC)):
        if name.endswith((".cpp", ".hpp", ".txt")):
            with open(os.path.join(SRC, name), "rb") as f:
                h.update(name.encode() + f.read())
    return h.hexdigest()[:16]


@pytest.fixture(scope="module")
def runner_binary() -> str:
    for tool in ("cmake", "make", "c++"):
        if shutil.which(tool) is None:
            pytest.skip(f"{tool} not found: the C++ runner test needs cmake, make and a C++ compiler")
    build = os.path.join(ROOT, ".cache", "cpp_runner", _build_key())
    binary = os.path.join(build, "compiled_unet_run")
    if not os.path.isfile(binary):
        import torch.utils

        t0 = time.perf_counter()
        for cmd in (["cmake", "-S", SRC, "-B", build, f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"],
                    ["cmake", "--build", build, "-j2"]):
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
            assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
        print(f"[cpp] cmake configure + build: {time.perf_counter() - t0:.1f} s")
    return binary


def _run(binary, *argv):
    return subprocess.run([binary, *map(str, argv)], capture_output=True, text=True, timeout=300)


def _rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.mark.parametrize("bucket", [0, 1])  # 1 takes an optional input (encoder_attention_mask): order matters
def test_cpp_runner_matches_python(runner_binary, tmp_path, bucket):
    from safetensors.torch import load_file, save_file

    package = os.path.join(saved_bundle(), f"bucket_{bucket}.pt2")
    loaded = compiled_unet.load(package)
    example = bucket_example(bucket)
    with torch.no_grad():
        python_out = loaded(**example).sample
        eager = tiny()[0](**example).sample

    described = _run(runner_binary, package, "--describe")
    assert described.returncode == 0, described.stderr
    listed = [line.split(":")[0].strip() for line in described.stdout.split("inputs (in order):\n")[1].splitlines()]
    assert listed == [x.name for x in loaded.signature.leaves if x.is_tensor]

    save_file({k: v.contiguous() for k, v in example.items()}, tmp_path / "inputs.safetensors")
    proc = _run(runner_binary, package, tmp_path / "inputs.safetensors", tmp_path / "out.safetensors", "--repeats", 3)
    assert proc.returncode == 0, proc.stderr
    print(f"[cpp] bucket {bucket}: {proc.stdout.strip()}")
    out = load_file(tmp_path / "out.safetensors")
    assert sorted(out) == ["sample"] and out["sample"].dtype == python_out.dtype
    rel = _rel_l2(out["sample"], python_out)
    print(f"[cpp] bucket {bucket}: rel L2 C++ vs Python = {rel:.3g}")
    assert rel <= REL_L2, f"C++ vs Python relative L2 {rel:.3g} > {REL_L2}"
    assert_close_to_eager(out["sample"], eager)
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".")], "temporary output left behind"


def test_cpp_runner_rejects_bad_inputs(runner_binary, tmp_path):
    from safetensors.torch import save_file

    package = os.path.join(saved_bundle(), "bucket_0.pt2")
    good = {k: v.contiguous() for k, v in bucket_example(0).items()}
    out = tmp_path / "out.safetensors"

    def rejected(inputs, *needles):
        proc = _run(runner_binary, package, inputs, out)
        assert proc.returncode != 0 and not out.exists(), proc.stdout
        for needle in needles:
            assert needle in proc.stderr, proc.stderr

    save_file({**good, "sample": torch.zeros(2, 4, 8, 9)}, tmp_path / "shape.safetensors")
    rejected(tmp_path / "shape.safetensors", "input 'sample' is [2, 4, 8, 9] float32; expected [2, 4, 8, 8] float32")
    save_file({**good, "encoder_hidden_states": good["encoder_hidden_states"].half()}, tmp_path / "dtype.safetensors")
    rejected(tmp_path / "dtype.safetensors", "input 'encoder_hidden_states' is [2, 5, 8] float16; expected")
    save_file({k: v for k, v in good.items() if k != "encoder_hidden_states"}, tmp_path / "missing.safetensors")
    rejected(tmp_path / "missing.safetensors", "missing input(s) ['encoder_hidden_states']")
    save_file({**good, "encoder_attention_mask": torch.ones(2, 5)}, tmp_path / "extra.safetensors")
    rejected(tmp_path / "extra.safetensors", "['encoder_attention_mask'] are not inputs of this graph")
    (tmp_path / "garbage.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    rejected(tmp_path / "garbage.safetensors", "garbage.safetensors: not a readable .safetensors file")
    rejected(tmp_path / "absent.safetensors", "absent.safetensors: cannot open")

    proc = _run(runner_binary, tmp_path / "garbage.safetensors", tmp_path / "shape.safetensors", out)
    assert proc.returncode != 0 and "not an AOTInductor .pt2 package" in proc.stderr, proc.stderr
