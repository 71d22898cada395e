"""Shape buckets: dispatch by exact input shapes with zero recompiles, a clear error outside the bundle,
one artifact on disk. The two-bucket bundle comes from tests/compiled_fixtures.py (built once)."""
from __future__ import annotations

import os

import pytest
import torch

import compiled_unet
from compiled_fixtures import (BUCKET_SHAPES, assert_close_to_eager, bucket_example, bundle_dir,  # noqa: F401
                               compiled_buckets, inductor_cache_files, tiny_model)
from compiled_unet.buckets import ShapeBuckets, bucket_inputs


def _split(ex):
    ex = dict(ex)
    return ex.pop("sample"), ex.pop("timestep"), ex


def _eager(model, sample, timestep, **kwargs):
    with torch.no_grad():
        return model(sample, timestep, **kwargs).sample


@pytest.mark.slow
def test_dispatch_by_shape_matches_eager_without_recompiles(tiny_model, compiled_buckets):
    from torch._dynamo.utils import counters

    model = tiny_model[0]
    stats, files = dict(counters["stats"]), inductor_cache_files()
    runners = [b._runner.model for b in compiled_buckets.buckets]
    for _ in range(2):
        for i in range(len(BUCKET_SHAPES)):
            sample, timestep, kw = _split(bucket_example(i))
            assert compiled_buckets.select(sample, timestep, **kw) is compiled_buckets.buckets[i]
            out = compiled_buckets(sample, timestep, **kw).sample
            assert_close_to_eager(out, _eager(model, sample, timestep, **kw))
    # Each bucket is its own AOTInductor package: nothing was traced or compiled by these calls.
    assert dict(counters["stats"]) == stats and inductor_cache_files() == files
    assert [b._runner.model for b in compiled_buckets.buckets] == runners


@pytest.mark.slow
def test_outside_the_bundle_lists_available_shapes(compiled_buckets):
    sample, timestep, kw = _split(bucket_example(0))
    with pytest.raises(ValueError, match=r"no compiled bucket for inputs \{'sample': \[3, 4, 8, 8\]") as e:
        ehs = kw["encoder_hidden_states"][:1].expand(3, -1, -1)
        compiled_buckets(torch.randn(3, 4, 8, 8), torch.full((3,), 5.0), ehs)
    msg = str(e.value)
    assert "sample: [2, 4, 8, 8]" in msg and "sample: [1, 4, 8, 16]" in msg and "encoder_attention_mask: [1, 5]" in msg
    # the 8x16 shape exists only with an encoder mask: without it, no bucket matches
    sample1, timestep1, kw1 = _split(bucket_example(1))
    kw1.pop("encoder_attention_mask")
    with pytest.raises(ValueError, match="available buckets"):
        compiled_buckets(sample1, timestep1, **kw1)


@pytest.mark.slow
def test_bundle_saves_and_loads_as_one_artifact(tiny_model, bundle_dir):
    assert sorted(os.listdir(bundle_dir)) == ["bucket_0.pt2", "bucket_1.pt2", "manifest.json"]
    assert not [f for f in os.listdir(os.path.dirname(bundle_dir)) if ".tmp-" in f]
    loaded = compiled_unet.load(bundle_dir)
    assert isinstance(loaded, ShapeBuckets) and len(loaded.buckets) == 2
    for i in range(2):
        sample, timestep, kw = _split(bucket_example(i))
        assert_close_to_eager(loaded(sample, timestep, **kw).sample, _eager(tiny_model[0], sample, timestep, **kw))
    assert loaded.config.in_channels == 4
    # saving over an existing bundle replaces it whole
    again = compiled_unet.save(loaded, bundle_dir)
    assert sorted(os.listdir(again)) == ["bucket_0.pt2", "bucket_1.pt2", "manifest.json"]


@pytest.mark.slow
def test_duplicate_bucket_rejected(compiled_buckets):
    with pytest.raises(ValueError, match="same inputs"):
        ShapeBuckets([compiled_buckets.buckets[0], compiled_buckets.buckets[0]])
    with pytest.raises(ValueError, match="at least one"):
        ShapeBuckets([])


def test_load_rejects_non_bundle(tmp_path):
    from compiled_unet.errors import DamagedArtifact

    with pytest.raises(DamagedArtifact, match="not a compiled UNet artifact.*manifest.json"):
        compiled_unet.load(tmp_path)


def test_bucket_inputs_for_sdxl_config():
    from compiled_unet import UNetConfig
    from cases import BASE, CONFIGS

    cfg = UNetConfig.from_dict({**BASE, **CONFIGS["sdxl"]})
    ex = bucket_inputs(cfg, 2, 8, 12, seq_len=5)
    assert ex["sample"].shape == (2, 4, 8, 12) and ex["encoder_hidden_states"].shape == (2, 5, 8)
    added = ex["added_cond_kwargs"]
    assert added["text_embeds"].shape == (2, 8) and added["time_ids"].shape == (2, 6)
