"""Shape buckets: one compiled graph per static input shape, behind one forward that dispatches by shape.

    bundle = compiled_unet.buckets.compile_buckets(unet, [bucket_inputs(unet.config, 1, 64, 64),
                                                          bucket_inputs(unet.config, 2, 64, 96)])
    bundle(sample, t, text)            # picks the graph compiled for these shapes; never recompiles
    compiled_unet.save(bundle, "dir")  # one directory (manifest.json + one .pt2 per bucket), atomic
    compiled_unet.load("dir")          # -> ShapeBuckets

The dispatcher is `compiled_unet.runtime.ShapeBuckets`; this module builds bundles.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

from .backends import InductorOptions
from .compile import compile as _compile
from .presets import example_inputs_for_config as bucket_inputs  # noqa: F401 - the one example-input factory
from .runtime.buckets import ShapeBuckets

__all__ = ["ShapeBuckets", "bucket_inputs", "compile_buckets"]


def compile_buckets(unet, examples: Sequence[Mapping[str, Any]], *, passes="default",
                    options: InductorOptions | None = None, progress: bool | None = None) -> ShapeBuckets:
    """Compile `unet` once per example (a dict of forward arguments, see `bucket_inputs`), AOT.
    progress: as `compiled_unet.compile`'s (a status line per bucket on a terminal)."""
    options = InductorOptions(aot=True) if options is None else dataclasses.replace(options, aot=True)
    out = []
    for ex in examples:
        ex = dict(ex)
        sample, timestep = ex.pop("sample"), ex.pop("timestep")
        out.append(_compile(unet, sample, timestep, passes=passes, options=options, progress=progress, **ex))
    return ShapeBuckets(out)
