"""The benchmark harness runs end to end (not how fast anything is): bench.py's smoke mode, gpu.sh --dry,
the record/plot writers, and `compiled-unet bench`.

The smoke run compiles one Inductor graph (the tiny preset through compiled_unet.compile); with
TORCHINDUCTOR_CACHE_DIR at the checkout's .cache/inductor (scripts/env.sh) reruns hit the cache.
"""
from __future__ import annotations

import io
import json
import math
import os
import struct
import subprocess
import sys
import textwrap

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, *filter(None, [os.environ.get("PYTHONPATH")])]))
    env.setdefault("TORCHINDUCTOR_CACHE_DIR", os.path.join(ROOT, ".cache", "inductor"))
    env["PYTHON"] = sys.executable  # gpu.sh runs $PYTHON (default: python on PATH)
    return env


def _png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    length, kind = struct.unpack(">I4s", data[8:16])
    assert kind == b"IHDR"
    return struct.unpack(">II", data[16:24])


@pytest.mark.slow
def test_bench_smoke(tmp_path):
    """Tiny preset on CPU: diffusers eager, ours eager, ours compiled (one Inductor compile): every variant
    has finite timings, a speed-up and an error; the JSON, the PNG and no RESULTS.md row are written."""
    out = tmp_path / "rec.json"
    md = tmp_path / "RESULTS.md"
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench", "--smoke", "--variants",
                           "eager,ours-eager,ours-inductor", "--json", str(out), "--results-md", str(md)],
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rec = json.loads(out.read_text())
    names = [v["name"] for v in rec["variants"]]
    assert names == ["diffusers-eager", "ours-eager", "ours-inductor"]
    assert rec["roles"]["a"] == "diffusers-eager" and rec["case"]["preset"] == "tiny"
    for v in rec["variants"]:
        assert v["error"] is None, v
        for key in ("median_ms", "min_ms", "max_ms", "speedup_vs_eager", "rel_l2_err"):
            assert isinstance(v[key], float) and math.isfinite(v[key]), (v["name"], key, v[key])
        assert v["min_ms"] <= v["median_ms"] <= v["max_ms"] and len(v["times_ms"]) == 3
        assert v["peak_forward_bytes"] > 0
    by = {v["name"]: v for v in rec["variants"]}
    assert by["ours-eager"]["rel_l2_err"] <= 1e-5 and by["ours-inductor"]["rel_l2_err"] <= 1e-4
    assert by["ours-inductor"]["first_call_s"] > 0 and by["ours-inductor"]["options"]["prepack_weights"] is True
    assert rec["machine"]["cpu"] and rec["machine"]["torch"]
    w, h = _png_size(out.with_suffix(".png").read_bytes())
    assert w > 100 and h > 100
    assert not md.exists()  # --smoke never appends to RESULTS.md
    assert "ours-inductor" in proc.stdout.split("speed-up =")[0].splitlines()[-1]  # the table is printed


def test_gpu_sh_dry():
    """The GPU script's dry mode (CPU, tiny preset, eager variants) runs and prints its summary last."""
    proc = subprocess.run(["bash", os.path.join(ROOT, "benchmarks", "gpu.sh"), "--dry"], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = proc.stdout.split("=== summary")[-1]
    assert "tiny 8x8 batch 1" in summary and "diffusers-eager" in summary and "ours-eager" in summary


def test_benchmarks_run_from_a_bare_checkout():
    """On a machine where the project is not installed (the GPU machine), nothing maps the top-level passes/
    folder to `compiled_unet.passes`: importing `benchmarks` maps it (benchmarks/_bare_checkout.py). Simulated
    here by removing the editable install's finder; an installed package would still win."""
    code = textwrap.dedent("""
        import sys
        sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
        try:
            import compiled_unet
            raise SystemExit("compiled_unet imported without the editable finder: the test shows nothing")
        except ImportError:
            pass
        for name in [m for m in sys.modules if m.startswith("compiled_unet")]:
            del sys.modules[name]
        import benchmarks, compiled_unet
        print(compiled_unet.passes.__file__)
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert proc.stdout.strip() == os.path.join(ROOT, "passes", "__init__.py")


def test_records_and_plot(tmp_path):
    """RESULTS.md rows append atomically under the header; the PNG chart is a valid image."""
    from benchmarks import bench
    from benchmarks._io import append_row_atomic
    from benchmarks.plot import ratio_chart

    variants = [dict(name="diffusers-eager", role="a", median_ms=10.0, speedup_vs_eager=1.0, speedup_vs_recipe=0.5,
                     compile_cold_s=None, rel_l2_err=0.0),
                dict(name="diffusers-compile", role="b", median_ms=5.0, speedup_vs_eager=2.0, speedup_vs_recipe=1.0,
                     compile_cold_s=60.0, rel_l2_err=1e-7),
                dict(name="ours-inductor", role="d", median_ms=4.0, speedup_vs_eager=2.5, speedup_vs_recipe=1.25,
                     compile_cold_s=30.0, rel_l2_err=2e-7)]
    md = tmp_path / "RESULTS.md"
    record = dict(date="2026-01-01", machine_line="cpu; torch x", case={"describe": "tiny 8x8 batch 1 float32 cpu"},
                  baseline="diffusers 0.42.1", roles={"a": "diffusers-eager", "b": "diffusers-compile"},
                  variants=variants, _md=str(md))
    # An existing file: the first table, then other sections. New rows go into the round-2 table (created
    # once, at the end), never after whatever section happens to be last.
    md.write_text(bench.RESULTS_HEADER + "| old row |\n\n## Flax\n\nprose\n")
    for _ in range(2):
        append_row_atomic(str(md), bench.RESULTS_HEADER_V2, bench._results_row(record, str(tmp_path / "r.json")))
    append_row_atomic(str(md), bench.RESULTS_HEADER_V2, "| 2026-01-02 | later |")
    text = md.read_text()
    assert text.startswith(bench.RESULTS_HEADER + "| old row |\n\n## Flax\n\nprose\n")
    assert text.count("## Round 2") == 1 and text.count("| 2026-01-01 |") == 2
    lines = text.splitlines()
    assert lines[-1] == "| 2026-01-02 | later |" and lines[-2].startswith("| 2026-01-01 |")
    row = lines[-2]
    assert "4.0 (ours-inductor)" in row and "2.50x" in row and "1.25x" in row and "60 / 30 (0.50x)" in row
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    png = ratio_chart("t", [(v["name"], [v["speedup_vs_eager"], None]) for v in variants], ["a", "b"])
    w, h = _png_size(png)
    # A decoder (Pillow, which matplotlib depends on) reads the whole image at the size the header states.
    from PIL import Image
    img = Image.open(io.BytesIO(png))
    img.load()
    assert img.size == (w, h) and w > 100 and h > 100


def test_cli_bench_routes_to_benchmarks(capsys):
    from compiled_unet import cli

    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--help"])
    assert e.value.code == 0
    assert "--compile-times" in capsys.readouterr().out
    with pytest.raises(SystemExit) as e:
        cli.main(["bench", "--variants", "nope"])
    assert e.value.code == 2
    assert "unknown variant 'nope'" in capsys.readouterr().err


def test_recipe_config_merges_over_the_recipe():
    """gpu.sh's short-lease mode turns the recipe's coordinate descent off; the rest of the recipe stays."""
    import torch

    from benchmarks.variants import RECIPES, recipe_for

    cuda = torch.device("cuda")
    recipe = recipe_for(cuda, "reduce-overhead", {"coordinate_descent_tuning": False})
    assert recipe["mode"] == "reduce-overhead" and recipe["inductor_config"]["coordinate_descent_tuning"] is False
    assert recipe["inductor_config"]["conv_1x1_as_mm"] is True and recipe["fuse_qkv"] is True
    assert RECIPES["cuda"]["inductor_config"]["coordinate_descent_tuning"] is True  # the table is not modified


def test_the_runs_peak_is_the_better_of_before_and_after_the_rounds():
    """A peak probe that lands in a slow minute must not make "% of peak" exceed what the machine did: the run's
    peak is the better matmul and the better conv of the two probes, and both probes stay in the record."""
    from benchmarks import measure

    def probe(mm, conv):
        return {"matmul": {"n": 2048, "gflops": mm}, "conv3x3": {"channels": 640, "size": 32, "gflops": conv},
                "gflops": max(mm, conv)}

    peak = measure.better_peak(probe(190.0, 339.0), probe(200.0, 420.0))
    assert peak["gflops"] == 420.0 and peak["matmul"]["gflops"] == 200.0 and peak["conv3x3"]["gflops"] == 420.0
    assert (peak["before_gflops"], peak["after_gflops"]) == (339.0, 420.0)
    assert measure.better_peak(probe(210.0, 400.0), probe(190.0, 380.0))["gflops"] == 400.0


def test_a_row_taken_under_an_isa_cap_says_so(monkeypatch):
    """An AVX-512 CPU told to run AVX2 (ATEN_CPU_CAPABILITY, ONEDNN_MAX_CPU_ISA, MKL_ENABLE_INSTRUCTIONS) is an
    AVX2 measurement on AVX-512 hardware: its row names the caps beside the flags the CPU lists."""
    from benchmarks import measure

    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    monkeypatch.delenv("MKL_ENABLE_INSTRUCTIONS", raising=False)
    isa = measure.cpu_flags()
    assert isa["caps"]["ONEDNN_MAX_CPU_ISA"] == "AVX2" and "MKL_ENABLE_INSTRUCTIONS" not in isa["caps"]
    line = measure.describe({"cpu": "CPU", "cores": 2, "torch_threads": 2, "cpu_isa": isa, "torch": "x"})
    assert "capped: " in line and "ONEDNN_MAX_CPU_ISA=AVX2" in line
    from compiled_unet.backends.vec_isa import ISA_CAP_VARIABLES

    for k in ISA_CAP_VARIABLES:
        monkeypatch.delenv(k, raising=False)
    assert "capped" not in measure.describe({"cpu": "CPU", "cores": 2, "torch_threads": 2,
                                             "cpu_isa": measure.cpu_flags(), "torch": "x"})


def test_roofline_counts_each_layers_flops_and_weight_bytes():
    """The per-layer bound: each matmul-class op takes at least max(FLOPs / peak, weight bytes / bandwidth)."""
    import torch

    from benchmarks import roofline

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.Flatten(), torch.nn.Linear(8 * 4 * 4, 5))
    x = torch.randn(2, 3, 4, 4)
    ops = roofline.matmul_ops(model, lambda: model(x))
    conv_flops, linear_flops = 2 * (2 * 8 * 4 * 4) * 3 * 9, 2 * 2 * 128 * 5
    assert [f for f, _ in ops] == [conv_flops, linear_flops]
    # Each op reads its own weight and bias, once; activations are not weights.
    assert [b for _, b in ops] == [4 * (8 * 3 * 9 + 8), 4 * (5 * 128 + 5)]

    b = roofline.bounds([(2_000_000_000, 1_000_000_000), (4_000_000_000, 0)], peak_gflops=100.0, gbytes_per_s=10.0)
    assert math.isclose(b["compute_ms"], 60.0)                  # 6 GFLOP at 100 GFLOP/s
    assert math.isclose(b["per_layer_ms"], 100.0 + 40.0)        # the first op waits for its 1 GB of weights
    assert math.isclose(b["overlapped_ms"], 100.0)              # all weight traffic under all compute, at best
    assert math.isclose(b["best_percent_of_peak"]["per_layer"], 100 * 60 / 140)
