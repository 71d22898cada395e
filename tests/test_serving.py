"""Serving (compiled_unet.serving): request batching into compiled buckets, the wire format, the Ray Serve
deployment under concurrent load, and a replica killed mid-load.

Fast tests run the batching logic over "buckets" whose runner is the eager tiny UNet (no compile, no Ray), so
the real UNet math checks that batched conditioning stays per request. The slow tests serve a real AOTInductor
bucket bundle (batch 1 and batch 2 at 8x8) on 2 Ray Serve replicas over loopback.

Oracles and tolerances:
- eager UNet, each request alone: max-abs <= 1e-5 x max(1, scale) for the eager batcher (same math, another
  batch size: fp32 reassociation only), 1e-4 x scale for compiled buckets (Inductor vs eager);
- the artifact called directly in this process on the same batch composition the server reports (same
  bucket, same requests in the same row order, same padding): bit-equal;
- the artifact called directly on the request alone (smallest bucket that holds it): rel-L2 <= 1e-6 (another
  bucket is other machine code: rounding differs).
"""
from __future__ import annotations

import asyncio
import functools
import json
import os
import socket
import sys
import time
import urllib.error
import urllib.request

import pytest
import torch

from cases import build, inputs_for
from closeness import assert_close, closeness

from compiled_unet.runtime import CompiledUNet, Signature
from compiled_unet.serving import Batcher, wire


# ---------------------------------------------------------------- fast: batching with eager "buckets"
class _EagerRunner:
    """A runner (the protocol CompiledUNet calls) that runs the eager model: batching logic without a compile."""
    kind, options, compile_seconds = "eager", None, None

    def __init__(self, model):
        self.model = model

    def prepare(self, args, kwargs):
        return args, kwargs

    def __call__(self, args, kwargs):
        with torch.no_grad():
            return (self.model(*args, **kwargs, return_dict=False)[0],)


def _eager_bucket(model, batch: int, hw=(8, 8), scalar_timestep: bool = False) -> CompiledUNet:
    (sample, t), kw = inputs_for("sd", batch=batch, hw=hw)
    if scalar_timestep:
        t = t[0]
    return CompiledUNet(_EagerRunner(model), Signature.from_call((sample, t), kw))


@functools.lru_cache(None)
def _eager_batcher():
    model = build("sd")
    return model, Batcher(_Bundle([_eager_bucket(model, 2), _eager_bucket(model, 1)]))


class _Bundle:
    def __init__(self, buckets):
        self.buckets = buckets


def _request(rows: int, seed: int, hw=(8, 8), timestep=None) -> dict:
    (sample, t), kw = inputs_for("sd", batch=rows, hw=hw, seed=seed)
    t = torch.full((rows,), 100.0 + 37 * seed) if timestep is None else timestep
    return {"sample": sample, "timestep": t, **kw}


def _eager(model, inputs: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(inputs["sample"], inputs["timestep"],
                     encoder_hidden_states=inputs["encoder_hidden_states"]).sample


def test_pack_fills_the_largest_batch_and_pads_to_the_nearest_bucket():
    _, batcher = _eager_batcher()
    reqs = [batcher.request(_request(r, i), f"r{i}") for i, r in enumerate([1, 2, 1, 1])]
    groups = [(bucket.batch, [r.request_id for r in members]) for bucket, members in batcher.pack(reqs)]
    # first-fit decreasing into batch 2: [r1 (2 rows)], [r0, r2], [r3] alone -> the batch-1 bucket, no padding
    assert sorted(groups) == [(1, ["r3"]), (2, ["r0", "r2"]), (2, ["r1"])]
    # a single 1-row request when only batch 2 exists: padded (its last row repeated), one answer row back
    model = build("sd")
    only2 = Batcher(_eager_bucket(model, 2))
    (res,) = only2.run([only2.request(_request(1, 5), "p")])
    assert res.sample.shape == (1, 4, 8, 8) and res.info["bucket_batch"] == 2 and res.info["rows"] == 1
    # tolerance: eager batch 2 vs batch 1, same math: fp32 reassociation only
    assert_close(res.sample, _eager(model, _request(1, 5)), scale_tol=1e-5, what="padded row vs eager alone")


def test_batched_requests_keep_their_own_conditioning_and_timestep():
    """Two requests with different text, timestep and latents in one batch-2 call: each answer equals the
    request run alone (a shared/mixed-up conditioning would be off by O(1), far above the tolerance)."""
    model, batcher = _eager_batcher()
    inputs = [_request(1, 1), _request(1, 2)]
    results = batcher.run([batcher.request(x, f"id{i}") for i, x in enumerate(inputs)])
    assert [r.info["bucket_batch"] for r in results] == [2, 2]
    assert [r.info["offset"] for r in results] == [0, 1] and results[0].info["batch_ids"] == ["id0", "id1"]
    for x, r in zip(inputs, results):
        # tolerance: eager UNet, other batch size only (fp32 reassociation): 1e-5 x max(1, scale)
        assert_close(r.sample, _eager(model, x), scale_tol=1e-5, what="batched row vs the request alone")
    swapped = [dict(inputs[0], encoder_hidden_states=inputs[1]["encoder_hidden_states"])]
    assert closeness(_eager(model, swapped[0]), results[0].sample).rel_l2 > 1e-2  # the check can see a mix-up


def test_a_scalar_timestep_input_is_shared_so_only_equal_values_batch_together():
    model = build("sd")
    batcher = Batcher(_eager_bucket(model, 2, scalar_timestep=True))
    a = batcher.request(_request(1, 1, timestep=torch.tensor(10.0)), "a")
    b = batcher.request(_request(1, 2, timestep=torch.tensor(900.0)), "b")
    c = batcher.request(_request(1, 3, timestep=torch.tensor(10.0)), "c")
    groups = sorted([r.request_id for r in members] for _, members in batcher.pack([a, b, c]))
    assert groups == [["a", "c"], ["b"]]


def test_a_request_no_bucket_fits_is_refused_naming_its_shape_and_the_buckets():
    _, batcher = _eager_batcher()
    with pytest.raises(ValueError, match=r"sample: \[3, 4, 8, 8\].*batch 3 exceeds the largest compiled batch 2"
                                         r"(.|\n)*batch 1: (.|\n)*batch 2: "):
        batcher.request(_request(3, 1))
    with pytest.raises(ValueError, match=r"sample: \[1, 4, 8, 16\].*no bucket was compiled for these shapes"):
        batcher.request(_request(1, 1, hw=(8, 16)))
    x = _request(1, 1)
    with pytest.raises(ValueError, match="no bucket"):
        batcher.request(dict(x, encoder_hidden_states=x["encoder_hidden_states"].double()))
    with pytest.raises(ValueError, match="unknown input 'text'"):
        batcher.request(dict(x, text=x["encoder_hidden_states"]))
    with pytest.raises(ValueError, match="needs a 'sample'"):
        batcher.request({"timestep": torch.ones(1)})
    with pytest.raises(ValueError, match="tensors .* only"):
        batcher.request(dict(x, encoder_hidden_states=[[1.0]]))


def test_requests_take_numpy_nested_and_flat_names_and_int_or_scalar_timesteps():
    model, batcher = _eager_batcher()
    x = _request(2, 4)
    as_numpy = {k: v.numpy() for k, v in x.items()}
    r = batcher.request(as_numpy)
    assert set(r.tensors) == {"sample", "timestep", "encoder_hidden_states"} and r.rows == 2
    one = batcher.request(dict(_request(2, 4), timestep=500))           # a number: each row's timestep
    assert one.tensors["timestep"].tolist() == [500.0, 500.0] and one.tensors["timestep"].dtype == torch.float32
    ints = batcher.request(dict(_request(1, 4), timestep=torch.tensor([7])))
    assert ints.tensors["timestep"].dtype == torch.float32
    from compiled_unet.serving.batching import flatten_inputs
    flat = flatten_inputs({"sample": x["sample"], "added_cond_kwargs": {"text_embeds": torch.ones(2, 3)}})
    assert set(flat) == {"sample", "added_cond_kwargs['text_embeds']"}
    assert set(flatten_inputs(flat)) == set(flat)                        # flat names (the wire's) read back as is


def test_wire_roundtrip_and_a_body_that_is_not_safetensors():
    t = {"sample": torch.randn(1, 4, 8, 8), "added_cond_kwargs['time_ids']": torch.arange(6.0)[None]}
    data = wire.encode(t, {"request_id": "abc", "batch_ids": ["abc", "d"], "rows": 2})
    back, meta = wire.decode(data)
    assert all(torch.equal(back[k], t[k]) for k in t)
    assert meta["request_id"] == "abc" and json.loads(meta["batch_ids"]) == ["abc", "d"] and meta["rows"] == "2"
    with pytest.raises(ValueError, match="not a safetensors file"):
        wire.decode(b"hello world, not tensors")


def test_serving_package_does_not_import_ray():
    import subprocess

    code = "import sys, compiled_unet, compiled_unet.serving; print('ray' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


def test_cli_serve_missing_artifact_is_one_line_error(capsys, tmp_path):
    from compiled_unet.cli import main

    assert main(["serve", str(tmp_path / "none.pt2"), "--replicas", "2"]) == 2
    assert "no such artifact" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--replicas", "0"]) == 2
    assert "--replicas 0" in capsys.readouterr().err
