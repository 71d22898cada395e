"""JAX transformations of the Flax UNet (issue 11, item 5), each checked against our PyTorch model on the
same weights (tests/flax/flax_pairs.py) or against the un-transformed jitted call:
jit (one trace per shape), grad (vs torch autograd, per leaf), the train/dropout path keyed by an rng,
vmap, pmap and a data-parallel jax.sharding Mesh on 4 host devices (in a subprocess: XLA_FLAGS must be set
before jax starts), and jax.export to a file that a fresh process deserializes and runs.
"""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

jax = pytest.importorskip("jax")  # the `flax` extra; CI installs it (a missing one fails there, see conftest)
import jax.numpy as jnp  # noqa: E402

from compiled_unet._atomic import write_atomic  # noqa: E402
from compiled_unet.flax.convert import params_to_torch  # noqa: E402
from tests.closeness import assert_close  # noqa: E402
from tests.flax.flax_pairs import TINY, flax_inputs, jit_forward, pair, tiny_inputs  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))


def _t(a):
    return torch.from_numpy(np.array(a, dtype=np.float32))


@pytest.fixture(scope="module")
def tiny():
    tmodel, fmodel, params = pair(TINY, seed=3)
    return tmodel, fmodel, params


def _torch_out(tmodel, x):
    with torch.no_grad():
        return tmodel(**x).sample


def test_jit_traces_once_per_shape(tiny):
    _, fmodel, params = tiny
    traces = []

    @jax.jit
    def fwd(p, kw):
        traces.append(jax.tree_util.tree_map(jnp.shape, kw["sample"]))  # runs only while tracing
        return fmodel.apply({"params": p}, **kw).sample

    a, b = flax_inputs(tiny_inputs(seed=1)), flax_inputs(tiny_inputs(seed=2))
    fwd(params, a).block_until_ready()
    out_b = fwd(params, b)  # same shapes and dtypes, other values: no retrace
    assert len(traces) == 1, f"retraced on a second call of the same shape: {traces}"
    assert not np.allclose(np.asarray(out_b), np.asarray(fwd(params, a)))  # it did compute b
    fwd(params, flax_inputs(tiny_inputs(batch=1, seed=3)))  # a new shape: one more trace
    assert len(traces) == 2, traces


def test_grad_matches_torch_autograd(tiny):
    tmodel, fmodel, params = tiny
    x = tiny_inputs(seed=4)
    weight = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))

    # torch: d/dw sum(out * weight) by autograd
    tmodel.zero_grad()
    (tmodel(**x).sample * weight).sum().backward()
    ref = {k: p.grad for k, p in tmodel.named_parameters()}

    fx = flax_inputs(x)
    w = jnp.asarray(weight.numpy())
    grads = jax.jit(jax.grad(lambda p: jnp.sum(fmodel.apply({"params": p}, **fx).sample * w)))(params)
    ours = params_to_torch(grads, fmodel.config)  # Flax names/layouts -> PyTorch's (kernels transposed back)
    assert set(ours) == set(ref), (sorted(set(ours) ^ set(ref)))[:10]
    worst = ("", 0.0)
    for k in sorted(ref):
        # per leaf: rel-L2 <= 1e-4 (fp32 gradients through ~40 layers, two frameworks), max-abs <= 1e-4 x max(1, |ref|)
        c = assert_close(_t(ours[k]), ref[k], scale_tol=1e-4, rel_l2=1e-4, what=f"grad {k}")
        worst = max(worst, (k, c.rel_l2), key=lambda kv: kv[1])
    print(f"worst per-leaf gradient rel-L2: {worst[1]:.2e} ({worst[0]})")


def test_dropout_path_keyed_by_rng(tiny):
    tmodel, fmodel, params = tiny  # TINY has dropout=0.1
    x = tiny_inputs(seed=6)
    fx = flax_inputs(x)

    @jax.jit
    def train_fwd(p, key):
        return fmodel.apply({"params": p}, **fx, train=True, rngs={"dropout": key}).sample

    k1, k2 = jax.random.PRNGKey(1), jax.random.PRNGKey(2)
    a, a2, b = np.asarray(train_fwd(params, k1)), np.asarray(train_fwd(params, k1)), np.asarray(train_fwd(params, k2))
    np.testing.assert_array_equal(a, a2)  # same rng: the same dropout masks, bit for bit
    evaluated = np.asarray(jit_forward(fmodel)(params, fx))
    assert np.abs(a - b).max() > 1e-3, "different dropout rngs gave the same output"
    assert np.abs(a - evaluated).max() > 1e-3, "train=True applied no dropout"
    # train=False is deterministic and is the PyTorch model in eval(): rel-L2 <= 1e-5, max-abs <= 1e-5 x max(1, |ref|)
    assert_close(_t(evaluated), _torch_out(tmodel, x), scale_tol=1e-5, rel_l2=1e-5, what="train=False vs torch eval")
    with pytest.raises(Exception, match="dropout"):  # train=True without a dropout rng is an error, not a silent eval
        fmodel.apply({"params": params}, **fx, train=True)


def test_vmap_over_latents_equals_batched_call(tiny):
    tmodel, fmodel, params = tiny
    x = tiny_inputs(batch=3, seed=7)
    fx = flax_inputs(x)

    def one(s, t, e):  # one latent, unbatched
        return fmodel.apply({"params": params}, s[None], t[None], e[None]).sample[0]

    mapped = jax.jit(jax.vmap(one))(fx["sample"], fx["timesteps"], fx["encoder_hidden_states"])
    batched = jit_forward(fmodel)(params, fx)
    # the same per-example math, batched two ways: max-abs <= 1e-6 x max(1, |ref|), rel-L2 <= 1e-6
    assert_close(_t(mapped), _t(batched), scale_tol=1e-6, rel_l2=1e-6, what="vmap vs batched call")
    assert_close(_t(mapped), _torch_out(tmodel, x), scale_tol=1e-5, rel_l2=1e-5, what="vmap vs torch")


def _write_workdir(workdir, fmodel, params, x):
    flat = {"/".join(str(getattr(k, "key", k)) for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_leaves_with_path(params)}
    for name, arrays in (("params.npz", flat), ("inputs.npz", x)):
        buf = io.BytesIO()
        np.savez(buf, **arrays)
        write_atomic(os.path.join(workdir, name), buf.getvalue())
    write_atomic(os.path.join(workdir, "config.json"), json.dumps(TINY))


def _run(mode, workdir):
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH")) if p))
    env.pop("XLA_FLAGS", None)
    proc = subprocess.run([sys.executable, os.path.join(HERE, "subprocess_checks.py"), mode, str(workdir)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{mode} subprocess failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return dict(np.load(os.path.join(workdir, "outputs.npz")))


@pytest.mark.slow
def test_pmap_and_sharded_jit_on_4_host_devices(tiny, tmp_path):
    tmodel, fmodel, params = tiny
    x = tiny_inputs(batch=4, seed=8)
    fx = flax_inputs(x)
    _write_workdir(tmp_path, fmodel, params, {k: np.asarray(fx[k]) for k in ("sample", "timesteps",
                                                                               "encoder_hidden_states")})
    out = _run("multidevice", tmp_path)
    assert int(out["n_devices"]) == 4
    assert out["shard_devices"].tolist() == [0, 1, 2, 3] and out["shard_rows"].tolist() == [1], \
        f"output not split over the 4 devices: {out['shard_devices']}, rows {out['shard_rows']}"
    ref = _torch_out(tmodel, x)
    for name in ("single", "pmap", "sharded"):
        # each device runs the single-device program on its slice: rel-L2 <= 1e-6 vs the one-device jit
        # (max-abs <= 1e-6 x max(1, |ref|)); vs PyTorch rel-L2 <= 1e-5 as everywhere
        assert_close(_t(out[name]), _t(out["single"]), scale_tol=1e-6, rel_l2=1e-6, what=f"{name} vs single device")
        assert_close(_t(out[name]), ref, scale_tol=1e-5, rel_l2=1e-5, what=f"{name} vs torch")


@pytest.mark.slow
def test_export_serialized_runs_in_fresh_process(tiny, tmp_path):
    # jax.export's serializer imports flatbuffers, which jax does not install: it belongs in the flax extra
    # (under CI=true this skip is a failure, see tests/conftest.py)
    pytest.importorskip("flatbuffers", reason="jax.export serialization needs the 'flatbuffers' package "
                        "(not a jax dependency): add it to the flax extra")
    tmodel, fmodel, params = tiny
    x = tiny_inputs(batch=2, seed=9)
    fx = flax_inputs(x)
    args = [fx[k] for k in ("sample", "timesteps", "encoder_hidden_states")]

    # the params are closed over: they become constants of the exported module, a self-contained artifact
    fwd = jax.jit(lambda s, t, e: fmodel.apply({"params": params}, s, t, e).sample)
    exported = jax.export.export(fwd)(*(jax.ShapeDtypeStruct(a.shape, a.dtype) for a in args))
    here = np.asarray(fwd(*args))
    write_atomic(os.path.join(tmp_path, "forward.jax_export"), bytes(exported.serialize()))
    buf = io.BytesIO()
    np.savez(buf, **{k: np.asarray(fx[k]) for k in ("sample", "timesteps", "encoder_hidden_states")})
    write_atomic(os.path.join(tmp_path, "inputs.npz"), buf.getvalue())

    out = _run("run-export", tmp_path)["out"]
    # the same StableHLO compiled again by the same XLA: max-abs <= 1e-6 x max(1, |ref|), rel-L2 <= 1e-6
    assert_close(_t(out), _t(here), scale_tol=1e-6, rel_l2=1e-6, what="exported (fresh process) vs jit")
    assert_close(_t(out), _torch_out(tmodel, x), scale_tol=1e-5, rel_l2=1e-5, what="exported vs torch")
