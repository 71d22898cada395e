"""TorchInductor backend: options (per-device defaults in one place), in-process and AOTInductor runners.

Two runtimes share one exported, optimized graph, both runners of the protocol in `backends/__init__.py`:
  * jit (`InductorOptions(aot=False)`): `torch._inductor.compile` (compile_fx) of the program's flat module on
    the example inputs. No dynamo and no guards: the compiled callable has no recompile mechanism at all, so
    a call changes no process-global state and many threads may call it at once.
  * aot (`InductorOptions(aot=True)`): `torch._inductor.aoti_compile_and_package`'s steps into a `.pt2` package
    (written with less memory: `_compile_and_package`),
    loaded from its library extracted once into a cache (`aoti_library.py`; torch's `aoti_load_package`, which
    extracts on every load, for layouts other than a plain CPU package); `save` copies the package, and weights
    swap in with `load_constants`.
The package carries the artifact document (signature, config, options, weight names/shapes/dtypes) as
AOTInductor metadata, so a loaded package validates inputs and swapped weights without the model source.
"""
from __future__ import annotations

import contextlib
import copy
import ctypes
import dataclasses
import gc
import json
import logging
import os
import shutil
import tempfile
import threading
import time
import zipfile
from typing import Any, Mapping

import torch
import torch._inductor.config  # noqa: F401 - patched while the first call compiles
import torch.utils._pytree as pytree
from torch.export.graph_signature import InputKind, OutputKind

from ..errors import DamagedArtifact
from . import package_cache
from . import aoti_library, cpp_units, cpu_kernels
from .aoti_library import load_library_model
from .vec_isa import vec_isa_config

log = logging.getLogger("compiled_unet")

FORMAT = "compiled_unet.inductor-aot/1"
META_KEY = "compiled_unet"          # the AOTInductor metadata entry holding the artifact document (JSON)

# The per-device defaults: the ONLY place they live. On CPU, speed comes from convolutions (and linears run as
# 1x1 convolutions) on weights packed once for oneDNN (SD1.5 32x32 AOT package 1.9 s -> 0.5 s per step).
# Two ways to get there: Inductor's freezing (weights become constants of the compiled code), or the
# prepack_onednn graph pass (`prepack_weights`; weights stay inputs of the compiled graph). The jit default is
# the pass: same speed, and the compiled graph then holds no tensor, so Inductor's FX graph and AOTAutograd
# caches serve a second process (SD1.5 32x32: 21 s instead of 120 s; freezing bypasses both caches).
# Packages stay frozen (AOTInductor renames the lifted packed constants), so a package's `swap_weights` needs
# freezing=False; the jit graph's packed weights are inputs, which `swap_weights` re-packs.
_DEFAULTS = {
    ("cpu", "jit"): dict(freezing=False, channels_last=True, prepack_weights=True),
    ("cpu", "aot"): dict(freezing=True, channels_last=False, prepack_weights=False),
    ("cuda", "jit"): dict(freezing=True, channels_last=True, prepack_weights=False),
    ("cuda", "aot"): dict(freezing=False, channels_last=False, prepack_weights=False),
}


@dataclasses.dataclass(frozen=True)
class InductorOptions:
    """How to compile with TorchInductor. `None` fields take the per-device default (`resolve`).

    aot: compile ahead of time into an AOTInductor `.pt2` package (saving is then a copy, weights can be
        swapped without recompiling). False: in-process `torch.compile`; `save` then compiles once more.
    freezing: treat weights as constants (Inductor freezing: constant folding, CPU weight prepacking).
    prepack_weights: CPU, float32: pack convolution weights for oneDNN in the graph (passes.prepack_onednn,
        appended to the pass list) instead of freezing; jit only. Default on for float32 CPU jit.
    channels_last: run convolutions in channels_last (sample and conv weights converted; jit only).
    linear_kernel: CPU, float32: what runs the token-wise linear layers: "onednn" (as 1x1 convolutions,
        passes.linear_to_conv1x1) or "mkl" (MKL's packed GEMM: passes.prepack_mkl_linear in the jit graph,
        Inductor's freezing in a package). Default: the one measured faster on this CPU, once per machine
        (backends/cpu_kernels.py); "onednn" for other dtypes. Used with the default pass list only.
    max_autotune: Inductor `max_autotune` (GPU kernel/GEMM autotuning; slow compile).
    cudagraphs: capture the compiled graph in CUDA graphs (jit on CUDA only).
    inductor_config: extra `torch._inductor.config` entries, passed through as is (they win).
    """
    aot: bool = False
    freezing: bool | None = None
    channels_last: bool | None = None
    prepack_weights: bool | None = None
    linear_kernel: str | None = None
    max_autotune: bool = False
    cudagraphs: bool = False
    inductor_config: Mapping[str, Any] = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        for name in ("aot", "max_autotune", "cudagraphs"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"InductorOptions.{name} must be a bool, got {getattr(self, name)!r}")
        for name in ("freezing", "channels_last", "prepack_weights"):
            if getattr(self, name) not in (None, True, False):
                raise TypeError(f"InductorOptions.{name} must be a bool or None, got {getattr(self, name)!r}")
        if self.linear_kernel not in (None, "onednn", "mkl"):
            raise ValueError(f"InductorOptions.linear_kernel must be 'onednn', 'mkl' or None (measured), got "
                             f"{self.linear_kernel!r}")
        if not isinstance(self.inductor_config, Mapping) or not all(isinstance(k, str) for k in self.inductor_config):
            raise TypeError("InductorOptions.inductor_config must be a mapping of config names to values")
        if self.aot and self.channels_last:
            raise ValueError("InductorOptions: channels_last is a jit-only option (AOT packages keep the "
                             "exported input layout); leave it None or False with aot=True")
        if self.aot and self.prepack_weights:
            raise ValueError("InductorOptions: prepack_weights is a jit-only option (AOT packages pack weights "
                             "through freezing, the CPU package default); leave it None or False with aot=True")
        if self.freezing and self.prepack_weights:
            raise ValueError("InductorOptions: freezing=True and prepack_weights=True both pack the weights; "
                             "choose one")
        if self.aot and self.cudagraphs:
            raise ValueError("InductorOptions: cudagraphs applies to the jit runtime only (aot=False)")

    def resolve(self, device: torch.device, dtype: torch.dtype = torch.float32) -> "InductorOptions":
        """These options with every `None` replaced by the default for `device` (and the sample's `dtype`:
        weight packing by the pass is float32-only, so other dtypes default to freezing); checks device fit."""
        kind = "cuda" if device.type == "cuda" else "cpu"
        if self.cudagraphs and kind != "cuda":
            raise ValueError(f"InductorOptions(cudagraphs=True) needs a CUDA device; the inputs are on {device}")
        if self.prepack_weights and (kind != "cpu" or dtype != torch.float32):
            raise ValueError(f"InductorOptions(prepack_weights=True) packs float32 weights for oneDNN on CPU; the "
                             f"inputs are {dtype} on {device}")
        defaults = dict(_DEFAULTS[(kind, "aot" if self.aot else "jit")])
        if defaults["prepack_weights"] and (dtype != torch.float32 or self.freezing):
            defaults.update(freezing=True, prepack_weights=False)
        if self.prepack_weights is False and self.freezing is None:
            defaults["freezing"] = False  # asked for swappable weights: no freezing either
        if kind == "cpu" and self.linear_kernel is None:
            defaults["linear_kernel"] = cpu_kernels.faster_linear_kernel() if dtype == torch.float32 else "onednn"
        if self.linear_kernel == "mkl" and (kind != "cpu" or not cpu_kernels.mkl_available()):
            raise ValueError(f"InductorOptions(linear_kernel='mkl') runs linears with MKL on CPU; the inputs are on "
                             f"{device}" + ("" if kind != "cpu" else " and this torch has no MKL"))
        resolved = dataclasses.replace(self, **{k: v for k, v in defaults.items() if getattr(self, k) is None})
        if resolved.linear_kernel == "mkl" and resolved.prepack_weights and not cpu_kernels.mkl_packed_op_runs():
            if self.linear_kernel == "mkl":
                raise ValueError("InductorOptions(linear_kernel='mkl') with packed weights (the float32 CPU jit "
                                 f"default) needs MKL's packed linear as a graph op, which torch {torch.__version__} "
                                 "cannot run; use linear_kernel='onednn', or freezing=True (Inductor packs for MKL)")
            resolved = dataclasses.replace(resolved, linear_kernel="onednn")
        return resolved

    def swap_refusal_reason(self) -> str | None:
        """Why a graph compiled with these (resolved) options cannot swap weights; None when it can."""
        return _frozen_refusal(self)

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


def constant_specs(program: torch.export.ExportedProgram, names) -> dict[str, list]:
    """{name: [shape, dtype]} of the program's weights and constants that a runner holds under `names`."""
    tensors = {**program.state_dict, **program.constants}
    return {n: [list(tensors[n].shape), str(tensors[n].dtype).removeprefix("torch.")] for n in names
            if n in tensors and isinstance(tensors[n], torch.Tensor) and not tensors[n].is_mkldnn}


def _frozen_refusal(options: InductorOptions) -> str | None:
    # Weights packed by the prepack_onednn pass are inputs of the jit graph: a swap re-runs the passes on the
    # new weights (derive_weights) and hands the runner the new packed tensors.
    if options.freezing:
        return ("this compiled UNet is frozen (InductorOptions(freezing=True)): its weights are "
                "constants of the compiled code under internal names (the CPU package default). Compile with "
                "InductorOptions(aot=True, freezing=False) to swap weights without recompiling")
    return None


# One Inductor compile at a time per process: `torch._inductor.config.patch` is process-wide (two threads compiling
# with different options would mix them), and `aot_compile` releases the frozen weights of the graphs made while it
# ran, which must not include another compile's.
_COMPILING = threading.RLock()


class JitRunner:
    """`torch._inductor.compile` of the optimized program's flat module, compiled on the example inputs."""

    kind = "jit"
    artifact_is_dir = False

    def __init__(self, ep: torch.export.ExportedProgram, options: InductorOptions, args: tuple, kwargs: dict):
        self.options, self.program = options, ep
        # Unfrozen: weights are leading inputs of the compiled graph, so that the graph holds no tensor and
        # Inductor's FX graph cache (keyed by the graph, not by weight values) serves a second process.
        # Frozen: they are attributes, which freezing folds into the compiled code.
        lifted = None if options.freezing else _weights_as_inputs(ep)
        if lifted is not None:
            self.module, self.weights = lifted
            self.in_spec, self.out_spec = ep.call_spec.in_spec, ep.call_spec.out_spec
            if options.channels_last:
                _weights_to_channels_last(self.weights, ep)
        else:
            self.module, self.in_spec, self.out_spec = _flat_module(ep)
            if options.channels_last:
                _to_channels_last(self.module)
            self.weights: dict[str, torch.Tensor] = {} if options.freezing else _lift_weights(self.module)
        # Leaves the graph does not read and that are no tensors (`return_dict`): dropped from the graph and from
        # every call, since Inductor < 2.13 refuses a bool graph input.
        n_weights = len(self.weights)
        self._user_leaf_kept = _drop_unused_constant_inputs(self.module)[n_weights:]
        args, kwargs = self.prepare(args, kwargs)
        flat = list(self.weights.values()) + self._user_leaves(args, kwargs)
        t0 = time.perf_counter()
        cfg = _compile_config(options, ep)
        # Some entries (notably `freezing`, which enables CPU weight prepacking into oneDNN kernels) are read
        # outside compile_fx's own config patch, so they are set while it compiles; freezing needs grad off.
        with _COMPILING, torch.no_grad(), torch._inductor.config.patch(cfg), cpp_units.batched_cpp_kernels():
            if options.freezing:  # freezing folds weights with their values: it needs the real tensors
                self.compiled = torch._inductor.compile(self.module, flat, cfg)
            else:
                with _static_fake_inputs(flat) as fake:
                    self.compiled = torch._inductor.compile(self.module, fake, cfg)
        self.compile_seconds = time.perf_counter() - t0
        self._weight_list = list(self.weights.values())
        self._swapped: set[str] = set()  # weights replaced since compiling: `save` must write these, not the program's

    def prepare(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if self.options.channels_last:
            args = (args[0].contiguous(memory_format=torch.channels_last),) + tuple(args[1:])
        return args, kwargs

    def __call__(self, args: tuple, kwargs: dict):
        flat = self._user_leaves(args, kwargs)
        with torch.no_grad():
            out = self.compiled(*self._weight_list, *flat)
        return tuple(pytree.tree_unflatten(list(out), self.out_spec))

    def _user_leaves(self, args: tuple, kwargs: dict) -> list:
        flat = pytree.tree_flatten((args, kwargs))[0]
        return [leaf for leaf, kept in zip(flat, self._user_leaf_kept, strict=True) if kept]

    def constant_specs(self) -> dict[str, list]:
        names = [n for n, _ in self.module.named_parameters()] + [n for n, _ in self.module.named_buffers()]
        specs = constant_specs(self.program, names + list(self.weights))
        # oneDNN-packed inputs: their logical shape; check_weights accepts a packed tensor for these names only.
        specs.update({n: [list(t.shape), str(t.dtype).removeprefix("torch.")] for n, t in self.weights.items()
                      if t.is_mkldnn})
        return specs

    def packed_weight_names(self) -> set[str]:
        """The inputs the graph reads as oneDNN-packed tensors (new values come from derive_weights)."""
        return {n for n, t in self.weights.items() if t.is_mkldnn}

    def swap_refusal(self) -> str | None:
        return _frozen_refusal(self.options)

    def load_constants(self, tensors: Mapping[str, torch.Tensor]) -> None:
        # New tensors, not copies into the old ones: the runner's weights start as the caller's model
        # parameters (export shares them), which a swap must leave alone. Each new dense tensor has the old one's
        # strides (the compiled code assumes them); packed ones come from derive_weights on this machine. The
        # input list is replaced in one assignment, so a concurrent call sees the old or the new weights.
        unknown = sorted(set(tensors) - set(self.weights))
        if unknown:
            raise ValueError(f"not inputs of this compiled graph: {unknown[:10]}")
        weights = dict(self.weights)
        with torch.no_grad():
            for name, value in tensors.items():
                if weights[name].is_mkldnn:
                    weights[name] = value
                else:
                    weights[name] = torch.empty_like(weights[name]).copy_(value)
        self.weights, self._weight_list = weights, list(weights.values())
        self._swapped |= set(tensors)

    def save(self, path: str, doc: dict) -> None:
        """AOT-compile the same program into a package at `path` (the jit-only options dropped)."""
        from .. import passes as graph_passes

        opts = dataclasses.replace(self.options, aot=True, channels_last=None, cudagraphs=False, freezing=None,
                                   prepack_weights=None).resolve(_program_device(self.program))
        # The weights this graph runs now: the program still holds the ones it was compiled with, and a package
        # of those after a swap_weights would be a silently different model.
        program = graph_passes.with_weights(self.program, {
            n: self.weights[n] if self.weights[n].is_mkldnn else self.weights[n].contiguous() for n in self._swapped})
        if any(str(n.target) == "compiled_unet.mkl_linear.default" for n in program.graph.nodes):
            # the packed MKL linears back to linears on their (current) weights: freezing packs them
            program = graph_passes.optimize(program, [graph_passes.unpack_mkl_linear])[0]
        doc = {**doc, "options": _options_doc(opts),
               "constants": constant_specs(program, list(program.state_dict) + list(program.constants))}
        aot_compile(program, opts, path, {META_KEY: json.dumps(doc)})


@contextlib.contextmanager
def _static_fake_inputs(flat: list):
    """Fake copies of `flat` (static shapes) inside a tracing context whose fake mode has a ShapeEnv.
    Inductor's FX graph cache keys its entries with the shape environment and bypasses itself without one
    (`torch._inductor.compile` on real tensors makes a fake mode without it); fakeifying the inputs here with
    static shapes keeps every size a literal, as the exported graph has them (no symbolic kernels)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    fake_mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True)
    fake = [fake_mode.from_tensor(t, static_shapes=True) if isinstance(t, torch.Tensor) else t for t in flat]
    with torch._guards.tracing(torch._guards.TracingContext(fake_mode)):
        yield fake


def _compile_config(options: InductorOptions, ep: torch.export.ExportedProgram) -> dict[str, Any]:
    """Inductor config for compiling `ep`: the options' entries, and on CPU the recorded SIMD probe."""
    cfg = options.config()
    if _program_device(ep).type == "cpu":
        cfg = {**vec_isa_config(), **cfg}  # an explicit inductor_config entry wins
    return cfg


def _program_device(ep: torch.export.ExportedProgram) -> torch.device:
    for v in pytree.tree_leaves(ep.example_inputs):
        if isinstance(v, torch.Tensor):
            return v.device
    return torch.device("cpu")


def _options_doc(options: InductorOptions) -> dict:
    return {k: v for k, v in dataclasses.asdict(options).items() if k != "inductor_config"}


def _drop_unused_constant_inputs(module: torch.fx.GraphModule) -> list[bool]:
    """Erase the placeholders that no node reads and whose example value is no tensor (a constant input such as
    `return_dict`); returns, per original placeholder, whether it was kept."""
    kept = []
    for node in module.graph.find_nodes(op="placeholder"):
        unused_constant = not node.users and isinstance(node.meta.get("val", ...), (bool, int, float, str))
        if unused_constant:
            module.graph.erase_node(node)
        kept.append(not unused_constant)
    if not all(kept):
        module.recompile()
    return kept


def _flat_module(ep: torch.export.ExportedProgram):
    """`ep.module()` taking and returning flat leaves: no pytree (un)flattening or input-check hooks left for
    dynamo to trace and guard on (its guard on the pytree registry would fail once, e.g., diffusers is
    imported and registers its output classes). Returns (module, in_spec, out_spec)."""
    m = ep.module()
    in_spec, out_spec = m._in_spec, m._out_spec
    for node in list(m.graph.nodes):
        if node.op == "call_module" and node.target == "_guards_fn" and not node.users:
            m.graph.erase_node(node)  # torch >= 2.10: the input checks, done by our Signature instead
    if "_guards_fn" in m._modules and not m.graph.find_nodes(op="call_module", target="_guards_fn"):
        del m._modules["_guards_fn"]
    # `ep.module()` overrides train/eval on the instance with closures; they would make the module
    # unpicklable, and AOTAutograd's cache pickles it for its key (it bypasses the cache otherwise).
    for name in ("train", "eval"):
        m.__dict__.pop(name, None)
    m.graph._codegen = torch.fx.graph.CodeGen()
    m._forward_pre_hooks.clear()
    m._forward_hooks.clear()
    m.recompile()
    n_inputs = len(m.graph.find_nodes(op="placeholder"))
    if n_inputs != in_spec.num_leaves:
        raise RuntimeError(f"flat module has {n_inputs} inputs for {in_spec.num_leaves} leaves")
    return m, in_spec, out_spec


def _weights_as_inputs(ep: torch.export.ExportedProgram) -> tuple[torch.fx.GraphModule, dict] | None:
    """The program's own graph as a module whose leading inputs are its weights, and {name: tensor} for them:
    what `_flat_module` + `_lift_weights` give, without unlifting the weights into attributes (`ep.module()`
    regenerates the module's code several times: ~2 s of a warm SD1.5 compile) and lifting them back. None when
    the unlift has work to do: buffer writes returned as outputs (a functional program), tokens, script objects.
    A write kept in the graph (`add_` on a buffer) updates the same tensor either way."""
    sig = ep.graph_signature
    if any(s.kind != OutputKind.USER_OUTPUT for s in sig.output_specs):
        return None
    kinds = [s.kind for s in sig.input_specs]
    if InputKind.TOKEN in kinds or InputKind.CUSTOM_OBJ in kinds:
        return None
    n_weights = sum(k != InputKind.USER_INPUT for k in kinds)
    if InputKind.USER_INPUT in kinds[:n_weights]:
        return None  # weights first, as torch.export lays them out
    placeholders = ep.graph.find_nodes(op="placeholder")
    tensors = {**ep.state_dict, **ep.constants}
    weights: dict[str, torch.Tensor] = {}
    for spec, node in zip(sig.input_specs[:n_weights], placeholders):
        value = tensors.get(spec.target)
        if getattr(spec.arg, "name", None) != node.name or not isinstance(value, torch.Tensor):
            return None
        weights[spec.target] = value
    if len(placeholders) - n_weights != ep.call_spec.in_spec.num_leaves:
        return None
    from .. import passes as graph_passes

    graph = torch.fx.Graph()
    graph.output(graph.graph_copy(ep.graph, {}))
    # root: what get_attr nodes name, if any; lazy: Inductor reads the graph, and its code is made once (for
    # AOTAutograd's cache key) instead of three more times
    return graph_passes.lazy_graph_module(ep.graph_module, graph), weights


def _weights_to_channels_last(weights: dict[str, torch.Tensor], ep: torch.export.ExportedProgram) -> None:
    """`_to_channels_last` for lifted weights: 4-d parameters and buffers (not lifted constants, which the
    unlifted module holds as plain attributes), as new tensors."""
    for spec in ep.graph_signature.input_specs:
        t = weights.get(spec.target)
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER) and t is not None and t.ndim == 4 and not t.is_mkldnn:
            weights[spec.target] = t.detach().contiguous(memory_format=torch.channels_last)


def _lift_weights(m: torch.fx.GraphModule) -> dict[str, torch.Tensor]:
    """Every tensor the graph reads as an attribute (parameters, buffers, lifted constants such as the oneDNN
    packed weights of passes/prepack_onednn.py) becomes a leading placeholder; returns {name: tensor} in
    placeholder order. Inductor's caches hash attribute tensors by value (and cannot hash oneDNN-packed ones
    at all: they bypass the cache for the whole graph), but inputs only by their metadata."""
    weights: dict[str, torch.Tensor] = {}
    placeholders: dict[str, torch.fx.Node] = {}  # one input per attribute, however many nodes read it
    first = next(iter(m.graph.find_nodes(op="placeholder")), None)
    for node in list(m.graph.find_nodes(op="get_attr")):
        owner_name, _, attr = node.target.rpartition(".")
        value = getattr(m.get_submodule(owner_name), attr)
        if not isinstance(value, torch.Tensor):
            continue
        if node.target not in placeholders:
            with m.graph.inserting_before(first):
                placeholders[node.target] = m.graph.placeholder(f"w{len(weights)}")
            placeholders[node.target].meta.update(node.meta)
            weights[node.target] = value
        node.replace_all_uses_with(placeholders[node.target])
        m.graph.erase_node(node)
    for name in weights:  # the module keeps no copy the compiled graph does not read
        owner_name, _, attr = name.rpartition(".")
        owner = m.get_submodule(owner_name)
        for store in (owner._parameters, owner._buffers):
            store.pop(attr, None)
        owner.__dict__.pop(attr, None)
    m.recompile()
    return weights


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
                metadata: Mapping[str, str], donate_weights: bool = False, cache_key: str | None = None) -> str:
    """AOTInductor-compile `ep` into a `.pt2` at `package_path` (written in place; callers rename), or copy the
    package an earlier compile of the same program, weights and options made (backends/package_cache.py).
    `donate_weights`: `ep`'s parameters are the caller's to give up; a frozen compile frees each one the
    library does not hold before it serialises its constants (see `_free_params_once_lowered`).
    `cache_key`: the package cache's key, taken by the caller before its passes made `ep`
    (`package_cache.compile_key`, which the caller has looked up and missed); None: `ep`'s own content key."""
    _check_aoti_available()
    cfg = _compile_config(options, ep)
    key = cache_key
    if key is None:
        key = package_cache.package_key(ep, cfg, metadata) if package_cache.enabled() else None
        if key is not None and package_cache.lookup(key, package_path):
            return package_path
    cfg["aot_inductor.metadata"] = dict(metadata)
    path = _compile_and_package(ep, package_path, cfg, donate_weights)
    if key is not None:
        package_cache.store(key, path)
    return path


def _compile_and_package(ep: torch.export.ExportedProgram, package_path: str, cfg: dict,
                         donate_weights: bool = False) -> str:
    """`torch._inductor.aoti_compile_and_package` (same steps, same archive), changed for peak memory:
      * the frozen weights this compile made are released before the archive is written (the library holds
        them; see `_drop_frozen_constants`), not after;
      * files go into the archive from a file mapping: torch's `PT2ArchiveWriter.write_file` reads each file
        whole and copies it once more while writing, so a frozen SD1.5 library (3.4 GB, the weights inside)
        briefly cost 2x the weights, a peak a sampling thread never sees (the copy holds the GIL).
    Where that private packaging helper is missing (another torch), torch's own function is used."""
    try:
        from torch.export.pt2_archive._package import PT2ArchiveWriter, _package_aoti_files
    except ImportError:
        PT2ArchiveWriter = _package_aoti_files = None
    with _COMPILING:  # the release below must only see this compile's graphs
        graph_modules_before = _graph_module_ids()
        # Inductor applies freezing (and with it CPU weight prepacking) only when grad mode is off.
        donated = _free_params_once_lowered(ep) if donate_weights and cfg.get("freezing") else contextlib.nullcontext()
        with torch.no_grad(), donated, _packed_buffers_not_cloned():
            if _package_aoti_files is None:
                path = torch._inductor.aoti_compile_and_package(ep, package_path=package_path, inductor_configs=cfg)
                _drop_frozen_constants(graph_modules_before)
                return path
            gm = ep.module(check_guards=False)
            args, kwargs = ep.example_inputs
            files = torch._inductor.aot_compile(gm, args, kwargs, options={**cfg, "aot_inductor.package": True})
            del gm
        _drop_frozen_constants(graph_modules_before)

    class MappedFileArchiveWriter(PT2ArchiveWriter):
        def write_file(self, name: str, file_path: str) -> None:
            size = os.path.getsize(file_path)
            if size < _MAPPED_WRITE_BYTES:
                return super().write_file(name, file_path)
            mapped = torch.UntypedStorage.from_file(file_path, shared=True, nbytes=size)  # read-only use
            self.archive_file.write_record(name, mapped, size)

    with MappedFileArchiveWriter(package_path) as writer:
        _package_aoti_files(writer, files)
    return package_path


_MAPPED_WRITE_BYTES = 16 << 20


def _live_graph_modules() -> list[torch.fx.GraphModule]:
    return [o for o in gc.get_objects() if issubclass(type(o), torch.fx.GraphModule)]


def _graph_module_ids() -> set[int]:
    return {id(gm) for gm in _live_graph_modules()}


def _drop_frozen_constants(graph_modules_before: set[int]) -> int:
    """Release the frozen (oneDNN-packed) weights of the graphs this AOT compile made; returns bytes released.

    Why: after an AOT compile returns, its frozen graph modules stay alive, held from outside Python's view (no
    gc-visible referrer), with all the packed weights: SD1.5, 3.44 GB kept until the process exits, on top of
    which loading the package peaked at 4.2x the weights (benchmarks/NOTES.md). After a cold compile (an empty
    Inductor cache) one of them also holds the program's own constants as `_tensor_constant<i>` buffers (the
    convolutions `prepack_onednn` packed, with donated weights: SD1.5, 2.5 GB at the load). The compiled library
    is written and holds its own copy; nothing runs these graphs again."""
    released = 0
    for gm in [gm for gm in _live_graph_modules() if id(gm) not in graph_modules_before]:
        for name in [k for k in gm._buffers if k.startswith(("_frozen_param", "_tensor_constant"))]:
            t = gm._buffers.pop(name)
            if isinstance(t, torch.Tensor):
                released += torch.ops.mkldnn._nbytes(t) if t.is_mkldnn else t.numel() * t.element_size()
    if released:
        _return_freed_heap_to_os()
    return released


def _packed_buffers_not_cloned():
    """torch < 2.13 unlifts a program's constants as buffers, and AOTInductor clones every buffer (a buffer may be
    mutated) through `as_strided`, which an opaque oneDNN tensor (passes/prepack_onednn.py) has no kernel for
    ("could not find kernel for aten.as_strided.default"). Packed weights are never mutated: they pass through
    uncloned, as 2.13 treats them. Patches the name compile_fx looks up, for the compile's duration (under
    `_COMPILING`)."""
    from torch._inductor import compile_fx

    real = getattr(compile_fx, "clone_preserve_strides", None)
    if real is None:
        return contextlib.nullcontext()

    def clone_unless_packed(x):
        return x if isinstance(x, torch.Tensor) and x.is_mkldnn else real(x)

    return _patched(compile_fx, "clone_preserve_strides", clone_unless_packed)


@contextlib.contextmanager
def _patched(owner, name: str, value):
    """`owner.name = value` for the block, then the original back (a class's own descriptor, e.g. a classmethod,
    not the bound method `getattr` would give)."""
    real = vars(owner)[name] if isinstance(owner, type) else getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, real)


@contextlib.contextmanager
def _free_params_once_lowered(ep: torch.export.ExportedProgram):
    """While an AOT compile of `ep` runs: once Inductor has lowered the frozen graph, and before AOTInductor
    serialises its constants, free every parameter of `ep` that is not one of those constants.

    Why: AOTInductor copies all constants into one buffer (1x the weights) while they are alive; the parameters
    freezing replaced by packed copies were still held (by the caller's donated model and the frozen graph)
    beside them: SD1.5, the 0.97 GB of linear weights MKL packed, which the frozen graph names as the packed
    op's fallback operand but the library does not keep. Wraps `AotCodeCompiler.compile` (Inductor calls it by
    attribute) for the duration of the compile; where it is missing, the parameters are freed after the compile."""
    from torch._inductor.codecache import AotCodeCompiler

    from .. import passes as graph_passes

    real_compile = AotCodeCompiler.__dict__.get("compile")
    if not isinstance(real_compile, classmethod):  # another torch
        yield
        return
    params = [ep.state_dict[n] for n in ep.graph_signature.parameters if n in ep.state_dict]

    def compile_and_free_first(cls, graph, *args, **kwargs):
        constants = [*graph.constants.values()]
        constants += [graph.get_original_value_of_constant(n) for n in graph.constants
                      if n in getattr(graph, "allocated_constant_name", {})]
        kept = {t.untyped_storage().data_ptr() for t in constants
                if isinstance(t, torch.Tensor) and not t.is_mkldnn and t.layout == torch.strided}
        del constants
        freed = sum(graph_passes.free_storage(p) for p in params
                    if p.is_mkldnn or p.layout != torch.strided or p.untyped_storage().data_ptr() not in kept)
        if freed:
            _return_freed_heap_to_os()
        return real_compile.__func__(cls, graph, *args, **kwargs)

    with _patched(AotCodeCompiler, "compile", classmethod(compile_and_free_first)):
        yield


def _return_freed_heap_to_os() -> None:
    # Weights of a few MB each were allocated on glibc's heap (over its mmap threshold only above 32 MB), and
    # freeing them leaves the pages with this process until malloc_trim: SD1.5, 1.6 GB more at the load's peak.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


class AotRunner:
    """A loaded AOTInductor package; the package file is what `save` copies."""

    kind = "aot"
    artifact_is_dir = False

    def __init__(self, package_path: str, doc: dict, owned_dir: tempfile.TemporaryDirectory | None = None,
                 compile_seconds: float | None = None):
        _check_aoti_available()
        self.package_path = os.fspath(package_path)
        self.doc = doc
        self.options = InductorOptions(**doc.get("options", {}))
        self._owned_dir = owned_dir  # keeps a temporary package alive as long as the runner
        t0 = time.perf_counter()
        self.model = _load_model(self.package_path)
        self.load_seconds = time.perf_counter() - t0
        self.compile_seconds = compile_seconds
        self._specs = None
        self._swapped = False  # the package file holds the weights it was compiled with; see save

    @classmethod
    def compile(cls, ep, options: InductorOptions, doc: dict) -> "AotRunner":
        """AOT-compile `ep` into a package in a private temporary folder and load it."""
        return cls.load_package(cls.write_package(ep, options, doc))

    @staticmethod
    def write_package(ep, options: InductorOptions, doc: dict, donate_weights: bool = False,
                      cache_key: str | None = None) -> tuple:
        """`compile`'s first half: the package, not loaded (a caller can drop `ep` before loading it).
        `donate_weights`, `cache_key`: see `aot_compile`."""
        tmp = tempfile.TemporaryDirectory(prefix="compiled_unet_aoti_")
        path = os.path.join(tmp.name, "model.pt2")
        # The complete artifact document, as `save` writes it: saving is then a plain copy of this package.
        doc = {**doc, "format": FORMAT, "options": _options_doc(options),
               "constants": constant_specs(ep, list(ep.state_dict) + list(ep.constants))}
        t0 = time.perf_counter()
        aot_compile(ep, options, path, {META_KEY: json.dumps(doc)}, donate_weights, cache_key)
        return path, doc, tmp, time.perf_counter() - t0

    @staticmethod
    def cached_package(exported, passes, options: InductorOptions, doc: dict) -> tuple[str | None, tuple | None]:
        """Before the passes run: (the package cache's key for compiling `exported` after `passes`, the cached
        package for it as `write_package` returns it, or None). `doc`: the caller's part of the artifact
        document (config, FreeU scales). The key is None where the cache is off or cannot key the compile
        (package_cache.compile_key); the compile then keys its package by content after the passes."""
        if not package_cache.enabled():
            return None, None
        _check_aoti_available()
        key = package_cache.compile_key(exported, passes, _compile_config(options, exported),
                                        {**doc, "format": FORMAT, "options": _options_doc(options)})
        if key is None:
            return None, None
        tmp = tempfile.TemporaryDirectory(prefix="compiled_unet_aoti_")
        path = os.path.join(tmp.name, "model.pt2")
        t0 = time.perf_counter()
        if not package_cache.lookup(key, path):
            tmp.cleanup()
            return key, None
        try:
            doc = read_package_doc(path)
        except DamagedArtifact as e:  # a cache entry is ours to replace: compile it again
            log.warning("compiled_unet: cached package %s unreadable (%s); compiling again", key, e)
            tmp.cleanup()
            package_cache.discard(key)
            return key, None
        return key, (path, doc, tmp, time.perf_counter() - t0)

    @classmethod
    def load_package(cls, package: tuple) -> "AotRunner":
        """`compile`'s second half: load what `write_package` wrote.

        The compile's graphs are garbage by now but sit in reference cycles, some with packed weights (SD1.5, a
        donated compile: 2.6 GB); the load copies the weights out of the library while its pages are mapped
        (2x the weights for a moment), so that garbage is collected and its heap returned to the system first."""
        gc.collect()
        _return_freed_heap_to_os()
        runner = cls(*package)
        package_cache.vouch_for_stored(runner.package_path)  # the load checked it: so is the cache's copy
        return runner

    @classmethod
    def load(cls, path: str) -> "AotRunner":
        """Load a package written by `save`; a damaged or foreign file is a DamagedArtifact naming `path`."""
        doc = read_package_doc(path)
        try:
            return cls(path, doc)
        except DamagedArtifact:
            raise
        except Exception as e:  # noqa: BLE001 - the loader's errors name neither the file nor the cause
            raise DamagedArtifact(f"{path}: the AOTInductor package is damaged and cannot be loaded "
                                  f"({type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''})") from None

    def prepare(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        # AOTInductor reads inputs as dense row-major memory.
        return pytree.tree_map_only(torch.Tensor, lambda t: t.contiguous(), (args, kwargs))

    def __call__(self, args: tuple, kwargs: dict):
        with torch.no_grad():
            return tuple(self.model(*args, **kwargs))

    def constant_specs(self) -> dict[str, list]:
        # The weights the package holds under their own names (AOTInductor renames lifted constants).
        if self._specs is None:
            held = set(self.model.get_constant_fqns())
            self._specs = {k: v for k, v in self.doc.get("constants", {}).items() if k in held}
        return self._specs

    def swap_refusal(self) -> str | None:
        return _frozen_refusal(self.options)

    def load_constants(self, tensors: Mapping[str, torch.Tensor]) -> None:
        # AOTInductor copies constants as dense row-major memory: hand it contiguous tensors.
        self.model.load_constants({k: v.contiguous() for k, v in tensors.items()}, check_full_update=False)
        self._swapped = True

    def save(self, path: str, doc: dict) -> None:
        if self._swapped:
            # Saving is a copy of the package, whose library holds the weights it was compiled with: after a
            # swap that would be a file that loads as a different model than the one saved.
            raise RuntimeError("save: this AOT-compiled UNet's weights were replaced with swap_weights, and a "
                               "package holds the weights it was compiled with, so the file would not hold these "
                               "weights. Compile the UNet with the new weights (compiled_unet.compile) and save "
                               "that, or save the weights themselves (save_pretrained)")
        doc = {**self.doc, **doc}
        if doc != self.doc:  # e.g. new FreeU scales: the document inside the package must say so
            _rewrite_package_doc(self.package_path, path, doc)
        else:
            shutil.copyfile(self.package_path, path)
        aoti_library.vouch_for_copy(self.package_path, path)  # its first load need not read it all again


def _load_model(path: str):
    """A plain CPU package runs from the extracted-once library (aoti_library); any other through torch's
    loader, after every member's checksum is checked (torch's loader checks none)."""
    model = load_library_model(path)
    if model is None:
        _check_checksums(path)
        model = torch._inductor.aoti_load_package(path)
    return model


def _check_checksums(path: str) -> None:
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
    except (zipfile.BadZipFile, EOFError, OSError) as e:
        raise DamagedArtifact(f"{path}: damaged .pt2 package ({type(e).__name__}: {e})") from None
    if bad is not None:
        raise DamagedArtifact(f"{path}: damaged .pt2 package (checksum error in {bad})")


def read_package_doc(path: str) -> dict:
    """The artifact document inside a `.pt2` written by `save` (its member's checksum checked on reading)."""
    try:
        with zipfile.ZipFile(path) as z:
            metas = [n for n in z.namelist() if n.endswith("metadata.json") or n.endswith("_metadata.json")]
            raw = None
            for name in metas:
                meta = json.loads(z.read(name))
                if isinstance(meta, dict) and META_KEY in meta:
                    raw = meta[META_KEY]
                    break
    except (zipfile.BadZipFile, EOFError, OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DamagedArtifact(f"{path}: not a compiled UNet artifact, or a damaged one (expected a .pt2 package "
                              f"written by compiled_unet.save; {type(e).__name__}: {e})") from None
    if raw is None:
        raise DamagedArtifact(f"{path}: a zip file but not a compiled UNet package written by compiled_unet.save "
                              f"(no {META_KEY!r} metadata)")
    try:
        doc = json.loads(raw)
    except json.JSONDecodeError:
        raise DamagedArtifact(f"{path}: damaged compiled UNet package (unreadable {META_KEY!r} metadata)") from None
    if doc.get("format") != FORMAT:
        raise DamagedArtifact(f"{path}: unsupported format {doc.get('format')!r}; expected {FORMAT!r}")
    return doc


def _rewrite_package_doc(src: str, dst: str, doc: dict) -> None:
    """Copy the package `src` to `dst` with the artifact document replaced in its metadata. Members are streamed
    (a frozen SD1.5 library is 3.4 GB) and their checksums checked while read, so `dst`'s library holds verified
    bytes under the same CRC."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            entry = copy.copy(item)  # writing sets its offset; `item` stays zin's
            if item.filename.endswith("metadata.json"):
                data = zin.read(item.filename)
                meta = json.loads(data)
                if isinstance(meta, dict) and META_KEY in meta:
                    meta[META_KEY] = json.dumps(doc)
                    data = json.dumps(meta).encode()
                zout.writestr(entry, data)
                continue
            with zin.open(item) as member, zout.open(entry, "w", force_zip64=item.file_size > 1 << 31) as out:
                shutil.copyfileobj(member, out, 1 << 24)
