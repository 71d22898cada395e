"""Warm compiles: `compile(..., cache_dir=)` serves a second process from Inductor's FX graph and AOTAutograd
caches and our export cache (the UNet's graph, not exported again) (the float32 CPU jit default packs weights in the graph instead of freezing, and weights are inputs of
the compiled graph, so nothing in it bypasses the caches), and a copied cache folder does the same elsewhere.

Each compile runs in a fresh process (tests/compile_cache_child.py), as a restart or another machine would.
Correctness is checked against each process's own eager model: a cache entry is keyed by graph and shapes,
not by weight values, so a model with OTHER weights must hit the cache and still give ITS answer.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from compiled_fixtures import RTOL_SCALE
from closeness import assert_close

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def _compile_in_child(cache_dir: str, seed: int, out: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([HERE, ROOT, os.environ.get("PYTHONPATH", "")]),
               COMPILED_UNET_PROGRESS="0")
    env.pop("TORCHINDUCTOR_CACHE_DIR", None)  # the child must use cache_dir= only
    proc = subprocess.run([sys.executable, os.path.join(HERE, "compile_cache_child.py"), cache_dir, str(seed), out],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _kernels(folder: str) -> set[str]:
    return {os.path.relpath(os.path.join(d, f), folder) for d, _, fs in os.walk(folder) for f in fs if f.endswith(".so")}


@pytest.mark.slow
def test_second_process_and_copied_cache_compile_warm(tmp_path):
    cache, shipped = str(tmp_path / "cache"), str(tmp_path / "shipped")
    cold = _compile_in_child(cache, 0, str(tmp_path / "cold.pt"))
    assert cold["options"]["prepack_weights"] and not cold["options"]["freezing"]
    assert cold["inductor"].get("fxgraph_cache_miss") == 1 and cold["aot"].get("autograd_cache_saved") == 1, cold
    assert cold["export"] == {"export_cache_miss": 1, "export_cache_stored": 1}, cold  # compiled_unet/export_cache.py
    kernels = _kernels(cache)
    assert kernels, "the cold compile left no C++ kernels in cache_dir"

    warm = _compile_in_child(cache, 0, str(tmp_path / "warm.pt"))
    assert warm["inductor"].get("fxgraph_cache_hit") == 1 and warm["aot"].get("autograd_cache_hit") == 1, warm
    assert warm["export"] == {"export_cache_hit": 1}, warm  # the graph read back, not exported again
    assert _kernels(cache) == kernels, "the warm compile built C++ kernels again"
    # Same weights, same compiled code: bitwise the same answer.
    assert torch.equal(torch.load(str(tmp_path / "cold.pt")), torch.load(str(tmp_path / "warm.pt")))

    # The folder copied elsewhere (another machine with the same torch and ISA), and a model with other
    # weights: still warm, and the answer is that model's (compiled vs its own eager, max-abs <= 1e-4 x scale).
    shutil.copytree(cache, shipped)
    other = _compile_in_child(shipped, 1, str(tmp_path / "other.pt"))
    assert other["inductor"].get("fxgraph_cache_hit") == 1 and other["aot"].get("autograd_cache_hit") == 1, other
    assert other["export"] == {"export_cache_hit": 1}, other
    assert _kernels(shipped) == kernels
    out, ref = torch.load(str(tmp_path / "other.pt")), torch.load(str(tmp_path / "other.pt.eager"))
    assert_close(out, ref, scale_tol=RTOL_SCALE, what="warm compile with other weights vs its eager")
    assert not torch.allclose(out, torch.load(str(tmp_path / "cold.pt"))), "other weights gave seed 0's answer"
    for rec in (cold, warm, other):
        assert_close(torch.load(rec["out"]), torch.load(rec["out"] + ".eager"), scale_tol=RTOL_SCALE,
                     what=f"seed {rec['seed']} compiled vs eager")
    # What a warm compile buys, recorded in the test log (not asserted: timings are not tested).
    print(f"lowering: cold {cold['stages']['lowering']:.1f} s, warm {warm['stages']['lowering']:.1f} s, "
          f"shipped {other['stages']['lowering']:.1f} s")
