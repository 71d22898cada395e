"""Compiled artifacts shared by test_inductor.py and test_buckets.py: each is built once per process.

Inductor compiles take 1-2 minutes each on 2 CPU cores, so the whole suite compiles four times: one
in-process (jit) graph, two AOTInductor buckets (frozen, the CPU default) and one unfrozen AOTInductor graph
whose weights `swap_weights` can replace. The builders are cached at module level (a session
fixture imported into two test modules would otherwise be registered, and built, twice).
"""
from __future__ import annotations

import atexit
import functools
import os
import shutil
import tempfile
from unittest import mock

import pytest
import torch

from cases import build, inputs_for
from closeness import assert_close

# What "equal to eager" means for compiled fp32 graphs: max-abs error <= 1e-4 x max(1, max |eager output|);
# Inductor reorders reductions and fuses, so bitwise equality is not expected.
RTOL_SCALE = 1e-4

# Bucket 0: batch 2, 8x8 latent, text only (also the shape the jit graph is compiled for).
# Bucket 1: batch 1, 8x16 latent, with an encoder attention mask (an optional input).
BUCKET_SHAPES = [dict(batch=2, hw=(8, 8)), dict(batch=1, hw=(8, 16), encoder_attention_mask=True)]


def assert_close_to_eager(out: torch.Tensor, ref: torch.Tensor):
    assert_close(out, ref, scale_tol=RTOL_SCALE, what="compiled vs eager")


@functools.lru_cache(None)
def tiny():
    """The tiny 'sd' test UNet (tests/cases.py) and its inputs for bucket 0."""
    return build("sd"), *inputs_for("sd", batch=2, hw=(8, 8))


def bucket_example(i: int) -> dict:
    s = BUCKET_SHAPES[i]
    (sample, timestep), kwargs = inputs_for("sd", batch=s["batch"], hw=s["hw"], seed=10 + i)
    if s.get("encoder_attention_mask"):
        seq = kwargs["encoder_hidden_states"].shape[1]
        kwargs["encoder_attention_mask"] = (torch.arange(seq)[None] < seq - 1).float().expand(s["batch"], seq)
    return dict(sample=sample, timestep=timestep, **kwargs)


@functools.lru_cache(None)
def jit_compiled():
    import compiled_unet

    model, (sample, timestep), kwargs = tiny()
    return compiled_unet.compile(model, sample, timestep, **kwargs)


@functools.lru_cache(None)
def buckets():
    from compiled_unet.buckets import compile_buckets

    # Always compiled, never copied from the package cache (backends/package_cache.py): tests examine what an AOT
    # compile leaves behind (test_aot_compile_keeps_no_frozen_weights_alive), which a cache hit would skip.
    with mock.patch.dict(os.environ, {"COMPILED_UNET_PACKAGE_CACHE": "0"}):
        return compile_buckets(tiny()[0], [bucket_example(i) for i in range(len(BUCKET_SHAPES))])


def _scratch_dir() -> str:
    """A temporary directory removed when the test process exits."""
    root = tempfile.mkdtemp(prefix="compiled_unet_test_")
    atexit.register(shutil.rmtree, root, True)
    return root


@functools.lru_cache(None)
def swappable():
    """Bucket 0's shape compiled ahead of time WITHOUT freezing (weights swappable), and its saved `.pt2`."""
    import compiled_unet
    from compiled_unet.backends import InductorOptions

    ex = bucket_example(0)
    compiled = compiled_unet.compile(tiny()[0], ex.pop("sample"), ex.pop("timestep"),
                                     options=InductorOptions(aot=True, freezing=False), **ex)
    return compiled, compiled_unet.save(compiled, os.path.join(_scratch_dir(), "swappable.pt2"))


@functools.lru_cache(None)
def saved_bundle() -> str:
    """The bucket bundle saved to a temporary directory (bucket_0.pt2 is the single-graph artifact)."""
    import compiled_unet

    return compiled_unet.save(buckets(), os.path.join(_scratch_dir(), "bundle"))


def inductor_cache_files() -> set[str]:
    """Every file under Inductor's cache directory (a recompile would add some)."""
    try:
        from torch._inductor.runtime.cache_dir_utils import cache_dir
    except ImportError:  # older layouts
        from torch._inductor.runtime.runtime_utils import cache_dir
    root = cache_dir()
    return {os.path.join(d, f) for d, _, fs in os.walk(root) for f in fs}


@pytest.fixture
def tiny_model():
    return tiny()


@pytest.fixture
def compiled_jit():
    return jit_compiled()


@pytest.fixture
def compiled_buckets():
    return buckets()


@pytest.fixture
def bundle_dir():
    return saved_bundle()


@pytest.fixture
def swappable_aot():
    return swappable()
