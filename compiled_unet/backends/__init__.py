"""Compiler backends for exported UNet graphs. Each backend module owns its options and its runners.

A runner is what a `CompiledUNet` calls; every backend implements the same protocol, so `CompiledUNet`
never branches on backend kind:

    kind                          "jit" | "aot" (inductor), "openxla" | "stablehlo" (xla)
    options                       the backend's options (InductorOptions) or None
    compile_seconds               wall time of the compile, None when loaded
    prepare(args, kwargs)         layout the bound inputs as the compiled code expects (contiguous, channels_last)
    __call__(args, kwargs)        run; returns the output tuple
    constant_specs()              {name: [shape, dtype]} of the weights `load_constants` can replace
    swap_refusal()                why weights cannot be swapped (a sentence), or None
    load_constants(tensors)       replace weights (already checked by the caller)
    packed_weight_names()         optional: names among constant_specs() whose values are oneDNN-packed tensors
                                  (jit's prepack_weights; new values come from derive_weights), default none
    save(path, doc)               write the artifact at `path` (a temporary path the caller renames into place);
                                  `doc` is the artifact document (format, signature, config, options, ...)
    artifact_is_dir               True when the artifact is a folder (StableHLO), False for one file (.pt2)
"""
from __future__ import annotations

from typing import Any, Mapping, Protocol

from ..errors import DamagedArtifact
from .inductor import AotRunner, InductorOptions, JitRunner

# "xla" needs torch_xla (the .venv-xla environment); without it compile(backend="xla") says how to get it.
BACKENDS = ("inductor", "xla")


class Runner(Protocol):
    kind: str
    options: Any
    compile_seconds: float | None
    artifact_is_dir: bool

    def prepare(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]: ...
    def __call__(self, args: tuple, kwargs: dict) -> tuple: ...
    def constant_specs(self) -> dict[str, list]: ...
    def swap_refusal(self) -> str | None: ...
    def load_constants(self, tensors: Mapping[str, Any]) -> None: ...
    def save(self, path: str, doc: dict) -> None: ...


def check_backend(name: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; expected one of {list(BACKENDS)}")
    return name


__all__ = ["AotRunner", "BACKENDS", "DamagedArtifact", "InductorOptions", "JitRunner", "Runner", "check_backend"]
