"""Run by tests/flax/test_flax_transforms.py in a fresh process (never collected by pytest).

    python tests/flax/subprocess_checks.py multidevice WORKDIR   # 4 host devices: pmap and a sharded jit
    python tests/flax/subprocess_checks.py run-export WORKDIR    # deserialize WORKDIR/forward.jax_export, run it

WORKDIR holds what the test wrote: `config.json` (the UNet config), `params.npz` (flat '/'-joined Flax
param names), `inputs.npz`; this writes `outputs.npz` there (atomically) for the test to compare. Only
multidevice needs the Flax model; run-export needs nothing but jax and the serialized artifact.
"""
from __future__ import annotations

import io
import json
import os
import sys

MODE, WORKDIR = sys.argv[1], sys.argv[2]
if MODE == "multidevice":
    # must be set before jax is imported: the CPU backend reads it once, at start-up
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=4").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
from compiled_unet._atomic import write_atomic  # noqa: E402


def _save(**arrays):
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_atomic(os.path.join(WORKDIR, "outputs.npz"), buf.getvalue())


def _unflatten(flat):
    tree: dict = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = jnp.asarray(value)
    return tree


def multidevice():
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    from compiled_unet.flax import FlaxUNet2DConditionModel

    devices = jax.devices()
    assert len(devices) == 4, f"expected 4 host devices from XLA_FLAGS, got {devices}"
    with open(os.path.join(WORKDIR, "config.json")) as f:
        model = FlaxUNet2DConditionModel(**json.load(f))
    params = _unflatten(dict(np.load(os.path.join(WORKDIR, "params.npz"))))
    x = {k: jnp.asarray(v) for k, v in np.load(os.path.join(WORKDIR, "inputs.npz")).items()}
    n = x["sample"].shape[0]
    assert n % 4 == 0, n

    def fwd(p, s, t, e):
        return model.apply({"params": p}, s, t, e).sample

    single = jax.jit(fwd)(params, x["sample"], x["timesteps"], x["encoder_hidden_states"])

    # pmap: params replicated (in_axes None), the batch split over a leading device axis
    split = lambda a: a.reshape(4, n // 4, *a.shape[1:])  # noqa: E731
    pm = jax.pmap(fwd, in_axes=(None, 0, 0, 0))(params, split(x["sample"]), split(x["timesteps"]),
                                                split(x["encoder_hidden_states"]))
    pm = np.asarray(pm).reshape(n, *pm.shape[2:])

    # jax.sharding: a 1-D data-parallel Mesh; batch sharded over "data", params replicated
    mesh = Mesh(np.array(devices), ("data",))
    batch, replicated = NamedSharding(mesh, P("data")), NamedSharding(mesh, P())
    sp = jax.device_put(params, replicated)
    ss, st, se = (jax.device_put(x[k], batch) for k in ("sample", "timesteps", "encoder_hidden_states"))
    sharded = jax.jit(fwd, out_shardings=batch)(sp, ss, st, se)
    shards = sorted({s.device.id for s in sharded.addressable_shards})
    shard_rows = sorted({s.data.shape[0] for s in sharded.addressable_shards})
    _save(single=np.asarray(single), pmap=pm, sharded=np.asarray(sharded), shard_devices=np.array(shards),
          shard_rows=np.array(shard_rows), n_devices=np.array(len(devices)))


def run_export():
    from jax import export

    with open(os.path.join(WORKDIR, "forward.jax_export"), "rb") as f:
        exp = export.deserialize(bytearray(f.read()))
    x = np.load(os.path.join(WORKDIR, "inputs.npz"))
    out = exp.call(*(jnp.asarray(x[k]) for k in ("sample", "timesteps", "encoder_hidden_states")))
    _save(out=np.asarray(out))


{"multidevice": multidevice, "run-export": run_export}[MODE]()
