"""Make the diffusers-0.39 oracle fixtures in tests/flax/fixtures/ (run by scripts/make_flax_fixtures.sh in
.venv-flax39: diffusers 0.39.0, jax 0.10.2, flax 0.12.8, torch 2.13 CPU; never by CI).

For each tiny config below, in one folder:
- `config.json` + `diffusion_flax_model.msgpack.xz`: diffusers 0.39's `FlaxUNet2DConditionModel.save_pretrained`
  output, the msgpack xz-compressed byte for byte (the test decompresses it and loads the folder).
- `io.npz`: the fixed inputs and the outputs of
    `flax_tanh`   diffusers 0.39's Flax forward (its GEGLU uses the tanh GELU),
    `torch_exact` diffusers 0.39's PyTorch `UNet2DConditionModel` with the weights converted by
                  diffusers' own `load_flax_checkpoint_in_pytorch_model` on the same inputs (exact GELU),
  for the plain call and, where a case has them, with ControlNet residuals (`*_residuals`).
- `torch_state_sha256.json`: sha256 of every tensor (float32, C order) of that converted PyTorch model, so a
  test checks our converter bit-exact against diffusers' without storing the weights twice.

Weights: `init_weights(PRNGKey(seed))` gives the tree, shapes and per-leaf scales; every leaf is then
replaced by `mean + s * t`, t drawn from {-1, 0, 1} (numpy, seeded per leaf), with s the init std (biases
and norm scales, which init as constants, get s = 0.1). Ternary leaves make the msgpack compress ~15x, so
the fixtures stay small enough to commit, and non-zero biases / non-unit norm scales catch a swapped or
dropped bias that a fresh init (zeros, ones) would hide.
"""
from __future__ import annotations

import hashlib
import importlib.util
import io
import json
import lzma
import os
import sys
import tempfile
import zlib

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIXTURES = os.path.join(ROOT, "tests", "flax", "fixtures")

# The project's atomic writer, loaded by path: this environment has diffusers 0.39, not compiled_unet's deps.
_spec = importlib.util.spec_from_file_location("_atomic", os.path.join(ROOT, "compiled_unet", "_atomic.py"))
_atomic = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_atomic)

# diffusers 0.39's Flax model fixes GroupNorm at 32 groups, so channels are multiples of 32.
CASES = {
    # SD-like: cross-attention down/up blocks, a plain pair, UNetMidBlock2DCrossAttn, conv projections.
    "sd": dict(
        config=dict(
            sample_size=8, in_channels=4, out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(32, 32), layers_per_block=1, attention_head_dim=4, cross_attention_dim=16,
        ),
        batch=2, size=(8, 8), seq=5, controlnet=True, seed=0,
    ),
    # SDXL-like: text_time addition embedding, transformer_layers_per_block > 1, linear projections,
    # per-block heads.
    "sdxl": dict(
        config=dict(
            sample_size=8, in_channels=4, out_channels=4,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            block_out_channels=(32, 32), layers_per_block=1, attention_head_dim=(2, 4),
            transformer_layers_per_block=(1, 2), cross_attention_dim=16, use_linear_projection=True,
            addition_embed_type="text_time", addition_time_embed_dim=8,
            projection_class_embeddings_input_dim=16 + 6 * 8,
        ),
        batch=2, size=(8, 8), seq=3, controlnet=False, seed=1,
    ),
    # only_cross_attention, flip_sin_to_cos=False / freq_shift=1, one block (no resampling), odd size.
    "sd_only_cross": dict(
        config=dict(
            sample_size=6, in_channels=3, out_channels=5,
            down_block_types=("CrossAttnDownBlock2D",), up_block_types=("CrossAttnUpBlock2D",),
            block_out_channels=(32,), layers_per_block=1, attention_head_dim=2, cross_attention_dim=8,
            only_cross_attention=True, flip_sin_to_cos=False, freq_shift=1,
        ),
        batch=1, size=(5, 7), seq=4, controlnet=False, seed=2,
    ),
}


def _ternary(params, seed):
    """Replace every leaf by mean + s * t, t in {-1, 0, 1} (see the module docstring)."""
    import jax
    import jax.numpy as jnp

    def leaf(path, x):
        name = jax.tree_util.keystr(path)
        rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
        x = np.asarray(x, dtype=np.float32)
        std = float(x.std())
        s = np.float32(std if std > 0 else 0.1)
        t = rng.choice(np.array([-1, 0, 1], dtype=np.float32), size=x.shape, p=[0.2, 0.6, 0.2])
        return jnp.asarray(np.float32(x.mean()) + s * t, dtype=jnp.float32)

    return jax.tree_util.tree_map_with_path(leaf, params)


def _inputs(case, cfg):
    rng = np.random.default_rng(1000 + case["seed"])
    b, (h, w), seq = case["batch"], case["size"], case["seq"]
    x = dict(
        sample=rng.standard_normal((b, cfg["in_channels"], h, w), dtype=np.float32),
        timesteps=(rng.random(b, dtype=np.float32) * 999.0).astype(np.float32),
        encoder_hidden_states=rng.standard_normal((b, seq, cfg["cross_attention_dim"]), dtype=np.float32),
    )
    if cfg.get("addition_embed_type") == "text_time":
        n_text = cfg["projection_class_embeddings_input_dim"] - 6 * cfg["addition_time_embed_dim"]
        x["text_embeds"] = rng.standard_normal((b, n_text), dtype=np.float32)
        x["time_ids"] = rng.integers(0, 1024, (b, 6)).astype(np.float32)
    return x


def _residual_shapes(cfg, b, h, w):
    """Shapes of the down-block residuals (conv_in, each resnet, each downsampler) and the mid residual."""
    ch = cfg["block_out_channels"]
    shapes = [(b, ch[0], h, w)]
    for i in range(len(ch)):
        shapes += [(b, ch[i], h, w)] * cfg["layers_per_block"]
        if i < len(ch) - 1:
            h, w = (h + 1) // 2, (w + 1) // 2
            shapes.append((b, ch[i], h, w))
    return shapes, (b, ch[-1], h, w)


def _patch_add_embedding(tmodel, params):
    """diffusers 0.39's Flax->PyTorch converter turns every `_<digit>` into `.<digit>`, so the Flax names
    `add_embedding/linear_1` become `add_embedding.linear.1`, which the PyTorch model lacks: it warns and keeps
    a random `add_embedding` (the SDXL text_time path). Copy those two Dense layers over by hand (kernel
    transposed, as the converter does for every other Dense). Returns the patched PyTorch names."""
    import torch

    patched = []
    for lin in ("linear_1", "linear_2"):
        leaf = params.get("add_embedding", {}).get(lin)
        if leaf is None:
            continue
        mod = getattr(tmodel.add_embedding, lin)
        with torch.no_grad():
            mod.weight.copy_(torch.from_numpy(np.asarray(leaf["kernel"]).T.copy()))
            mod.bias.copy_(torch.from_numpy(np.asarray(leaf["bias"]).copy()))
        patched += [f"add_embedding.{lin}.weight", f"add_embedding.{lin}.bias"]
    return patched


def _sha256_state(state_dict):
    """sha256 (first 16 hex digits: plenty to tell two tensors apart, and small) of each tensor's float32 bytes."""
    return {k: hashlib.sha256(np.ascontiguousarray(v.detach().cpu().float().numpy()).tobytes()).hexdigest()[:16]
            for k, v in sorted(state_dict.items())}


def make(name, case):
    import diffusers
    import flax
    import jax
    import jax.numpy as jnp
    import torch
    from diffusers import FlaxUNet2DConditionModel, UNet2DConditionModel

    cfg = case["config"]
    model = FlaxUNet2DConditionModel(**cfg)
    params = _ternary(model.init_weights(jax.random.PRNGKey(case["seed"])), case["seed"])
    x = _inputs(case, cfg)
    added = ({"text_embeds": jnp.asarray(x["text_embeds"]), "time_ids": jnp.asarray(x["time_ids"])}
             if "text_embeds" in x else None)
    calls = {"": {}}
    if case["controlnet"]:
        rng = np.random.default_rng(2000 + case["seed"])
        down, mid = _residual_shapes(cfg, case["batch"], *case["size"])
        # ternary too (as the weights), so the residuals compress
        tern = lambda s: (rng.integers(-1, 2, s) * 0.5).astype(np.float32)  # noqa: E731
        for i, s in enumerate(down):
            x[f"down_residual_{i}"] = tern(s)
        x["mid_residual"] = tern(mid)
        calls["_residuals"] = {"n_down": len(down)}

    outputs = {}
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp, params=params)
        # torch side: diffusers' own Flax -> PyTorch converter, exact GELU. (0.39's
        # `from_pretrained(from_flax=True)` converts and then falls through to load_state_dict on the msgpack,
        # which raises; so call the converter it uses directly.)
        from diffusers.models.modeling_pytorch_flax_utils import load_flax_checkpoint_in_pytorch_model
        tmodel = UNet2DConditionModel.from_config(UNet2DConditionModel.load_config(tmp))
        tmodel = load_flax_checkpoint_in_pytorch_model(tmodel, os.path.join(tmp, "diffusion_flax_model.msgpack"))
        tmodel = tmodel.float().eval()
        patched = _patch_add_embedding(tmodel, params)
        for suffix, call in calls.items():
            fkw, tkw = {}, {}
            if call:
                res = [x[f"down_residual_{i}"] for i in range(call["n_down"])]
                # diffusers' Flax UNet adds ControlNet residuals in its internal NHWC layout (what its
                # FlaxControlNetModel returns); the fixture stores them NCHW, as the PyTorch model takes them.
                nhwc = lambda a: jnp.asarray(a).transpose(0, 2, 3, 1)  # noqa: E731
                fkw = dict(down_block_additional_residuals=tuple(nhwc(r) for r in res),
                           mid_block_additional_residual=nhwc(x["mid_residual"]))
                tkw = dict(down_block_additional_residuals=tuple(torch.from_numpy(r) for r in res),
                           mid_block_additional_residual=torch.from_numpy(x["mid_residual"]))
            out = model.apply({"params": params}, jnp.asarray(x["sample"]), jnp.asarray(x["timesteps"]),
                              jnp.asarray(x["encoder_hidden_states"]), added, **fkw).sample
            outputs["flax_tanh" + suffix] = np.asarray(out, dtype=np.float32)
            with torch.no_grad():
                t_added = ({k: torch.from_numpy(x[k]) for k in ("text_embeds", "time_ids")}
                           if added is not None else None)
                tout = tmodel(torch.from_numpy(x["sample"]), torch.from_numpy(x["timesteps"]),
                              torch.from_numpy(x["encoder_hidden_states"]), added_cond_kwargs=t_added, **tkw).sample
            outputs["torch_exact" + suffix] = tout.numpy().astype(np.float32)
            d = outputs["flax_tanh" + suffix].astype(np.float64) - outputs["torch_exact" + suffix]
            ref = outputs["torch_exact" + suffix].astype(np.float64)
            print(f"[{name}{suffix}] diffusers-0.39 Flax (tanh GELU) vs PyTorch (exact): max-abs "
                  f"{np.abs(d).max():.3e}, rel-L2 {np.linalg.norm(d) / np.linalg.norm(ref):.3e}, "
                  f"|out| max {np.abs(ref).max():.3g}")
        with open(os.path.join(tmp, "config.json")) as f:
            config_text = f.read()
        with open(os.path.join(tmp, "diffusion_flax_model.msgpack"), "rb") as f:
            msgpack_bytes = f.read()
        sha = _sha256_state(tmodel.state_dict())

    buf = io.BytesIO()
    np.savez_compressed(buf, **x, **outputs)
    meta = dict(versions=dict(diffusers=diffusers.__version__, jax=jax.__version__, flax=flax.__version__,
                              torch=torch.__version__, numpy=np.__version__),
                case={k: v for k, v in case.items() if k != "config"},
                msgpack_sha256=hashlib.sha256(msgpack_bytes).hexdigest(), torch_state_sha256=sha,
                torch_patched_after_diffusers_converter=patched)
    with _atomic.atomic_dir(os.path.join(FIXTURES, name)) as d:
        for fname, data in (("config.json", config_text.encode()),
                            ("diffusion_flax_model.msgpack.xz", lzma.compress(msgpack_bytes, preset=9)),
                            ("io.npz", buf.getvalue()),
                            ("meta.json", json.dumps(meta, indent=1, sort_keys=True).encode())):
            with open(os.path.join(d, fname), "wb") as f:
                f.write(data)
    sizes = {f: os.path.getsize(os.path.join(FIXTURES, name, f)) for f in os.listdir(os.path.join(FIXTURES, name))}
    print(f"[{name}] {len(msgpack_bytes)} msgpack bytes; files {sizes}")


def main(argv):
    names = argv or list(CASES)
    unknown = [n for n in names if n not in CASES]
    if unknown:
        sys.exit(f"unknown fixture name(s) {unknown}; known: {list(CASES)}")
    for n in names:
        make(n, CASES[n])


if __name__ == "__main__":
    main(sys.argv[1:])
