"""Shape buckets: one bundle of AOT-compiled graphs, one per static input shape, dispatched by shape.

    bundle = compiled_unet.buckets.compile_buckets(unet, [bucket_inputs(unet.config, 1, 64, 64),
                                                          bucket_inputs(unet.config, 2, 64, 96)])
    bundle(sample, t, text)            # picks the graph compiled for these shapes; never recompiles
    compiled_unet.save(bundle, "dir")  # one directory (manifest.json + one .pt2 per bucket), atomic
    compiled_unet.load("dir")          # -> ShapeBuckets

Every bucket is its own AOTInductor package, so there is nothing that could recompile: a call either
matches one bucket's signature exactly or raises a ValueError listing the available shapes.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Mapping, Sequence

import torch

from .backends import InductorOptions
from .compile import CompiledUNet, OPTIONAL_INPUTS, load as _load_one, save as _save_one, compile as _compile

MANIFEST = "manifest.json"
FORMAT = "compiled_unet.buckets/1"


def bucket_inputs(config, batch: int, height: int, width: int, seq_len: int = 77, *, dtype=torch.float32,
                  device="cpu", seed: int = 0, **optional) -> dict[str, Any]:
    """Example inputs (a dict of forward arguments) for one bucket of a UNet with `config`.

    Covers sample, timestep, encoder_hidden_states and SDXL's text_time added conditions; any other
    optional input is passed in `optional` (e.g. timestep_cond=torch.randn(...))."""
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    cross = config.cross_attention_dim
    cross = cross[0] if isinstance(cross, (tuple, list)) else cross
    inputs = dict(sample=rnd(batch, config.in_channels, height, width),
                  timestep=torch.full((batch,), 500.0, device=device),
                  encoder_hidden_states=rnd(batch, seq_len, config.encoder_hid_dim or cross))
    if config.addition_embed_type == "text_time":
        n_time = config.projection_class_embeddings_input_dim // config.addition_time_embed_dim
        text_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        if n_time >= 6:
            inputs["added_cond_kwargs"] = {"text_embeds": rnd(batch, text_dim), "time_ids": rnd(batch, 6)}
    inputs.update(optional)
    return inputs


def _describe(c: CompiledUNet) -> str:
    return "{" + ", ".join(f"{k}: {list(v)}" for k, v in c.signature.shapes.items()) + "}"


class ShapeBuckets(torch.nn.Module):
    """Compiled UNets for several static shapes behind one forward; dispatch by exact input shapes."""

    def __init__(self, buckets: Sequence[CompiledUNet]):
        super().__init__()
        if not buckets:
            raise ValueError("ShapeBuckets needs at least one compiled UNet")
        seen = set()
        for b in buckets:
            if not isinstance(b, CompiledUNet):
                raise TypeError(f"ShapeBuckets holds CompiledUNet objects, got {type(b).__name__}")
            key = json.dumps(b.signature.to_json(), sort_keys=True)
            if key in seen:
                raise ValueError(f"two buckets compiled for the same inputs: {_describe(b)}")
            seen.add(key)
        self.buckets = list(buckets)  # a plain list: CompiledUNet holds no parameters to register

    @property
    def config(self):
        return self.buckets[0].config

    @property
    def dtype(self) -> torch.dtype:
        return self.buckets[0].dtype

    @property
    def device(self) -> torch.device:
        return self.buckets[0].device

    @property
    def in_channels(self) -> int:
        return self.buckets[0].in_channels

    def available(self) -> list[str]:
        return [_describe(b) for b in self.buckets]

    def select(self, sample, timestep, **inputs) -> CompiledUNet:
        """The bucket compiled for exactly these inputs, or a ValueError listing the available shapes."""
        for b in self.buckets:
            if b.accepts(sample, timestep, **inputs):
                return b
        given = {"sample": list(sample.shape), **{k: list(v.shape) for k, v in inputs.items() if torch.is_tensor(v)}}
        given.update({k: "given" for k, v in inputs.items() if v is not None and not torch.is_tensor(v)})
        raise ValueError(f"no compiled bucket for inputs {given} (dtype {sample.dtype}); available buckets:\n  "
                         + "\n  ".join(self.available()))

    def forward(self, sample, timestep, encoder_hidden_states=None, *args, return_dict: bool = True, **inputs):
        names = OPTIONAL_INPUTS[1:len(args) + 1]
        inputs.update(dict(zip(names, args)))
        inputs["encoder_hidden_states"] = encoder_hidden_states
        return self.select(sample, timestep, **inputs)(sample, timestep, return_dict=return_dict, **inputs)

    def swap_weights(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True) -> None:
        """New weights into every bucket, no recompiles (see CompiledUNet.swap_weights)."""
        for b in self.buckets:
            b.swap_weights(state_dict, strict=strict)

    def save(self, path: str | os.PathLike) -> str:
        """One directory: manifest.json + bucket_<i>.pt2; written beside `path` and renamed into place."""
        path = os.path.abspath(os.fspath(path))
        tmp = f"{path}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        try:
            files = []
            for i, b in enumerate(self.buckets):
                files.append(f"bucket_{i}.pt2")
                _save_one(b, os.path.join(tmp, files[-1]))
            with open(os.path.join(tmp, MANIFEST), "w") as f:
                json.dump({"format": FORMAT, "buckets": files, "shapes": self.available()}, f, indent=1)
            if os.path.isdir(path):  # replace an older bundle: move it aside first, then swap in
                old = f"{path}.old-{os.getpid()}"
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ShapeBuckets":
        path = os.fspath(path)
        manifest = os.path.join(path, MANIFEST)
        if not os.path.isfile(manifest):
            raise FileNotFoundError(f"{path} is not a shape-bucket bundle (no {MANIFEST})")
        with open(manifest) as f:
            doc = json.load(f)
        if doc.get("format") != FORMAT:
            raise ValueError(f"{manifest}: unsupported format {doc.get('format')!r}; expected {FORMAT!r}")
        return cls([_load_one(os.path.join(path, name)) for name in doc["buckets"]])


def compile_buckets(unet, examples: Sequence[Mapping[str, Any]], *, passes="default",
                    options: InductorOptions | None = None) -> ShapeBuckets:
    """Compile `unet` once per example (a dict of forward arguments, see `bucket_inputs`), AOT."""
    options = InductorOptions(aot=True) if options is None else dataclasses.replace(options, aot=True)
    out = []
    for ex in examples:
        ex = dict(ex)
        sample, timestep = ex.pop("sample"), ex.pop("timestep")
        out.append(_compile(unet, sample, timestep, passes=passes, options=options, **ex))
    return ShapeBuckets(out)
