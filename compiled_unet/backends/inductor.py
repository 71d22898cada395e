"""TorchInductor backend: options (per-device defaults in one place), in-process and AOTInductor runners.

Two runtimes share one exported, optimized graph:
  * jit (`InductorOptions(aot=False)`): `torch.compile(ep.module(), fullgraph=True, dynamic=False)`, compiled
    once on the example inputs; calls run under `fail_on_recompile` where torch has it.
  * aot (`InductorOptions(aot=True)`): `torch._inductor.aoti_compile_and_package` into a `.pt2` package,
    loaded with `aoti_load_package`; there is no recompile mechanism at all, `save` copies the package, and
    weights swap in with the runner's `load_constants`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
import tempfile
import time
from typing import Any, Mapping

import torch
import torch._inductor.config  # noqa: F401 - patched while the first call compiles
import torch.utils._pytree as pytree

from .._pytree import children as _children

# The per-device defaults: the ONLY place they live. Freezing is what makes CPU fast (weights prepacked into
# oneDNN kernels: SD1.5 32x32 AOT package 1.9 s -> 0.5 s per step), so CPU packages are frozen too; a frozen
# package's weights are constants under internal names, so `swap_weights` needs `freezing=False`.
_DEFAULTS = {
    ("cpu", "jit"): dict(freezing=True, channels_last=True),
    ("cpu", "aot"): dict(freezing=True, channels_last=False),
    ("cuda", "jit"): dict(freezing=True, channels_last=True),
    ("cuda", "aot"): dict(freezing=False, channels_last=False),
}


@dataclasses.dataclass(frozen=True)
class InductorOptions:
    """How to compile with TorchInductor. `None` fields take the per-device default (`resolve`).

    aot: compile ahead of time into an AOTInductor `.pt2` package (saving is then a copy, weights can be
        swapped without recompiling). False: in-process `torch.compile`; `save` then compiles once more.
    freezing: treat weights as constants (Inductor freezing: constant folding, CPU weight prepacking).
    channels_last: run convolutions in channels_last (sample and conv weights converted; jit only).
    max_autotune: Inductor `max_autotune` (GPU kernel/GEMM autotuning; slow compile).
    cudagraphs: capture the compiled graph in CUDA graphs (jit on CUDA only).
    inductor_config: extra `torch._inductor.config` entries, passed through as is (they win).
    """
    aot: bool = False
    freezing: bool | None = None
    channels_last: bool | None = None
    max_autotune: bool = False
    cudagraphs: bool = False
    inductor_config: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        for name in ("aot", "max_autotune", "cudagraphs"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"InductorOptions.{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("freezing", "channels_last"):
            if getattr(self, name) not in (None, True, False):
                raise TypeError(f"InductorOptions.{name} must be a bool or None, got {getattr(self, name)!r}")
        if not isinstance(self.inductor_config, Mapping) or not all(isinstance(k, str) for k in self.inductor_config):
            raise TypeError("InductorOptions.inductor_config must be a mapping of config names to values")
        if self.aot and self.channels_last:
            raise ValueError("InductorOptions: channels_last is a jit-only option (AOT packages keep the "
                             "exported input layout); leave it None or False with aot=True")
        if self.aot and self.cudagraphs:
            raise ValueError("InductorOptions: cudagraphs applies to the jit runtime only (aot=False)")

    def resolve(self, device: torch.device) -> "InductorOptions":
        """These options with every `None` replaced by the default for `device`; checks device fit."""
        kind = "cuda" if device.type == "cuda" else "cpu"
        if self.cudagraphs and kind != "cuda":
            raise ValueError(f"InductorOptions(cudagraphs=True) needs a CUDA device; the inputs are on {device}")
        defaults = _DEFAULTS[(kind, "aot" if self.aot else "jit")]
        return dataclasses.replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})

    def config(self) -> dict[str, Any]:
        """The `torch._inductor.config` entries for these (resolved) options."""
        cfg: dict[str, Any] = {"freezing": bool(self.freezing)}
        if self.aot and not self.freezing:
            # Fold weight-only subgraphs when the package loads, not at compile time, so that weights
            # swapped in with load_constants reach every derived constant. (A frozen package cannot swap
            # weights: it folds at compile time and loads faster.)
            cfg["aot_inductor.use_runtime_constant_folding"] = True
        if self.max_autotune:
            cfg["max_autotune"] = True
        if self.cudagraphs:
            cfg["triton.cudagraphs"] = True
        cfg.update(self.inductor_config)
        return cfg


def _no_recompile():
    """Context that turns a dynamo recompile into an error (torch >= 2.6), else a no-op."""
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is None:
        return contextlib.nullcontext()
    return set_stance("fail_on_recompile")


class JitRunner:
    """`torch.compile` of the optimized program's module, compiled eagerly on the example inputs."""

    kind = "jit"

    def __init__(self, ep: torch.export.ExportedProgram, options: InductorOptions, args: tuple, kwargs: dict):
        self.options = options
        self.module, self.in_spec, self.out_spec = _flat_module(ep)
        if options.channels_last:
            _to_channels_last(self.module)
        self.compiled = torch.compile(self.module, backend="inductor", options=options.config(),
                                      fullgraph=True, dynamic=False)
        t0 = time.perf_counter()
        # Compilation happens on this first call. Some entries (notably `freezing`, which enables CPU
        # weight prepacking into oneDNN/MKL kernels) are read outside torch.compile's `options` patch,
        # so they must be set globally while it compiles.
        with torch._inductor.config.patch(options.config()):
            self(args, kwargs, allow_compile=True)
        self.compile_seconds = time.perf_counter() - t0

    def __call__(self, args: tuple, kwargs: dict, allow_compile: bool = False):
        flat = pytree.tree_flatten((args, {k: kwargs[k] for k in _children(self.in_spec)[1].context}))[0]
        with torch.no_grad(), (contextlib.nullcontext() if allow_compile else _no_recompile()):
            out = self.compiled(*flat)
        return pytree.tree_unflatten(list(out), self.out_spec)

    def constant_names(self) -> list[str]:
        return [n for n, _ in self.module.named_parameters()] + [n for n, _ in self.module.named_buffers()]

    def load_constants(self, tensors: Mapping[str, torch.Tensor]) -> None:
        own = dict(self.module.named_parameters())
        own.update(dict(self.module.named_buffers()))
        with torch.no_grad():
            for name, value in tensors.items():
                own[name].copy_(value)


def _flat_module(ep: torch.export.ExportedProgram):
    """`ep.module()` taking and returning flat leaves: no pytree (un)flattening or input-check hooks left for
    dynamo to trace and guard on (its guard on the pytree registry would fail once, e.g., diffusers is
    imported and registers its output classes). Returns (module, in_spec, out_spec)."""
    m = ep.module()
    in_spec, out_spec = m._in_spec, m._out_spec
    for node in list(m.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
            m.graph.erase_node(node)  # torch >= 2.10: the input checks, done by our Signature instead
    m.graph._codegen = torch.fx.graph.CodeGen()
    m._forward_pre_hooks.clear()
    m._forward_hooks.clear()
    m.recompile()
    n_inputs = len(m.graph.find_nodes(op="placeholder"))
    if n_inputs != in_spec.num_leaves:
        raise RuntimeError(f"flat module has {n_inputs} inputs for {in_spec.num_leaves} leaves")
    return m, in_spec, out_spec


def _to_channels_last(module: torch.nn.Module) -> None:
    """4-d weights to channels_last, as new tensors (the exported program's weights are the user's model's)."""
    for mod in module.modules():
        for store in (mod._parameters, mod._buffers):
            for name, t in store.items():
                if t is not None and t.ndim == 4 and not t.is_mkldnn:  # oneDNN-packed weights keep their layout
                    new = t.detach().contiguous(memory_format=torch.channels_last)
                    store[name] = torch.nn.Parameter(new, t.requires_grad) if isinstance(t, torch.nn.Parameter) else new


def _check_aoti_available():
    if not hasattr(torch._inductor, "aoti_compile_and_package") or not hasattr(torch._inductor, "aoti_load_package"):
        raise RuntimeError(f"AOTInductor packaging needs torch >= 2.6 (torch._inductor.aoti_compile_and_package); "
                           f"this is torch {torch.__version__}")


def aot_compile(ep: torch.export.ExportedProgram, options: InductorOptions, package_path: str,
                metadata: Mapping[str, str]) -> str:
    """AOTInductor-compile `ep` into a `.pt2` at `package_path` (written in place; callers rename)."""
    _check_aoti_available()
    cfg = options.config()
    cfg["aot_inductor.metadata"] = dict(metadata)
    # Inductor applies freezing (and with it CPU weight prepacking) only when grad mode is off.
    with torch.no_grad():
        return torch._inductor.aoti_compile_and_package(ep, package_path=package_path, inductor_configs=cfg)


class AotRunner:
    """A loaded AOTInductor package; the package file is what `save` copies."""

    kind = "aot"

    def __init__(self, package_path: str, owned_dir: tempfile.TemporaryDirectory | None = None,
                 compile_seconds: float | None = None):
        _check_aoti_available()
        self.package_path = os.fspath(package_path)
        self._owned_dir = owned_dir  # keeps a temporary package alive as long as the runner
        t0 = time.perf_counter()
        self.model = torch._inductor.aoti_load_package(self.package_path)
        self.load_seconds = time.perf_counter() - t0
        self.compile_seconds = compile_seconds

    @classmethod
    def compile(cls, ep, options: InductorOptions, metadata: Mapping[str, str]) -> "AotRunner":
        tmp = tempfile.TemporaryDirectory(prefix="compiled_unet_aoti_")
        path = os.path.join(tmp.name, "model.pt2")
        t0 = time.perf_counter()
        aot_compile(ep, options, path, metadata)
        return cls(path, tmp, time.perf_counter() - t0)

    def __call__(self, args: tuple, kwargs: dict):
        with torch.no_grad():
            return self.model(*args, **kwargs)

    def metadata(self) -> dict[str, str]:
        return dict(self.model.get_metadata())

    def constant_names(self) -> list[str]:
        return list(self.model.get_constant_fqns())

    def load_constants(self, tensors: Mapping[str, torch.Tensor]) -> None:
        # AOTInductor copies constants as dense row-major memory: hand it contiguous tensors.
        self.model.load_constants({k: v.contiguous() for k, v in tensors.items()}, check_full_update=False)
