"""TorchInductor backend: options (per-device defaults in one place), in-process and AOTInductor runners.

Two runtimes share one exported, optimized graph, both runners of the protocol in `backends/__init__.py`:
  * jit (`InductorOptions(aot=False)`): `torch._inductor.compile` (compile_fx) of the program's flat module on
    the example inputs. No dynamo and no guards: the compiled callable has no recompile mechanism at all, so
    a call changes no process-global state and many threads may call it at once.
  * aot (`InductorOptions(aot=True)`): `torch._inductor.aoti_compile_and_package` into a `.pt2` package,
    loaded with `aoti_load_package`; `save` copies the package, and weights swap in with `load_constants`.
The package carries the artifact document (signature, config, options, weight names/shapes/dtypes) as
AOTInductor metadata, so a loaded package validates inputs and swapped weights without the model source.
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
import tempfile
import time
import zipfile
from typing import Any, Mapping

import torch
import torch._inductor.config  # noqa: F401 - patched while the first call compiles
import torch.utils._pytree as pytree

from ..errors import DamagedArtifact

FORMAT = "compiled_unet.inductor-aot/1"
META_KEY = "compiled_unet"          # the AOTInductor metadata entry holding the artifact document (JSON)

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


def constant_specs(program: torch.export.ExportedProgram, names) -> dict[str, list]:
    """{name: [shape, dtype]} of the program's weights and constants that a runner holds under `names`."""
    tensors = {**program.state_dict, **program.constants}
    return {n: [list(tensors[n].shape), str(tensors[n].dtype).removeprefix("torch.")] for n in names
            if n in tensors and isinstance(tensors[n], torch.Tensor) and not tensors[n].is_mkldnn}


def _frozen_refusal(options: InductorOptions) -> str | None:
    if options.freezing:
        return ("this compiled UNet is frozen (InductorOptions(freezing=True), the CPU default): its weights are "
                "constants of the compiled code under internal names. Compile with "
                "InductorOptions(aot=True, freezing=False) to swap weights without recompiling")
    return None


class JitRunner:
    """`torch._inductor.compile` of the optimized program's flat module, compiled on the example inputs."""

    kind = "jit"
    artifact_is_dir = False

    def __init__(self, ep: torch.export.ExportedProgram, options: InductorOptions, args: tuple, kwargs: dict):
        self.options, self.program = options, ep
        self.module, self.in_spec, self.out_spec = _flat_module(ep)
        if options.channels_last:
            _to_channels_last(self.module)
        args, kwargs = self.prepare(args, kwargs)
        flat = pytree.tree_flatten((args, kwargs))[0]
        t0 = time.perf_counter()
        # Some entries (notably `freezing`, which enables CPU weight prepacking into oneDNN kernels) are read
        # outside compile_fx's own config patch, so they are set while it compiles; freezing needs grad off.
        with torch.no_grad(), torch._inductor.config.patch(options.config()):
            self.compiled = torch._inductor.compile(self.module, flat, options.config())
        self.compile_seconds = time.perf_counter() - t0

    def prepare(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if self.options.channels_last:
            args = (args[0].contiguous(memory_format=torch.channels_last),) + tuple(args[1:])
        return args, kwargs

    def __call__(self, args: tuple, kwargs: dict):
        flat = pytree.tree_flatten((args, kwargs))[0]
        with torch.no_grad():
            out = self.compiled(*flat)
        return tuple(pytree.tree_unflatten(list(out), self.out_spec))

    def constant_specs(self) -> dict[str, list]:
        names = [n for n, _ in self.module.named_parameters()] + [n for n, _ in self.module.named_buffers()]
        return constant_specs(self.program, names)

    def swap_refusal(self) -> str | None:
        return _frozen_refusal(self.options)

    def load_constants(self, tensors: Mapping[str, torch.Tensor]) -> None:
        own = dict(self.module.named_parameters())
        own.update(dict(self.module.named_buffers()))
        with torch.no_grad():
            for name, value in tensors.items():
                own[name].copy_(value)

    def save(self, path: str, doc: dict) -> None:
        """AOT-compile the same program into a package at `path` (the jit-only options dropped)."""
        opts = dataclasses.replace(self.options, aot=True, channels_last=None, cudagraphs=False,
                                   freezing=None).resolve(_program_device(self.program))
        doc = {**doc, "options": _options_doc(opts),
               "constants": constant_specs(self.program, list(self.program.state_dict) + list(self.program.constants))}
        aot_compile(self.program, opts, path, {META_KEY: json.dumps(doc)})


def _program_device(ep: torch.export.ExportedProgram) -> torch.device:
    for v in pytree.tree_leaves(ep.example_inputs):
        if isinstance(v, torch.Tensor):
            return v.device
    return torch.device("cpu")


def _options_doc(options: InductorOptions) -> dict:
    return {k: v for k, v in dataclasses.asdict(options).items() if k != "inductor_config"}


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
    artifact_is_dir = False

    def __init__(self, package_path: str, doc: dict, owned_dir: tempfile.TemporaryDirectory | None = None,
                 compile_seconds: float | None = None):
        _check_aoti_available()
        self.package_path = os.fspath(package_path)
        self.doc = doc
        self.options = InductorOptions(**doc.get("options", {}))
        self._owned_dir = owned_dir  # keeps a temporary package alive as long as the runner
        t0 = time.perf_counter()
        self.model = torch._inductor.aoti_load_package(self.package_path)
        self.load_seconds = time.perf_counter() - t0
        self.compile_seconds = compile_seconds
        self._specs = None

    @classmethod
    def compile(cls, ep, options: InductorOptions, doc: dict) -> "AotRunner":
        """AOT-compile `ep` into a package in a private temporary folder and load it."""
        tmp = tempfile.TemporaryDirectory(prefix="compiled_unet_aoti_")
        path = os.path.join(tmp.name, "model.pt2")
        doc = {**doc, "options": _options_doc(options),
               "constants": constant_specs(ep, list(ep.state_dict) + list(ep.constants))}
        t0 = time.perf_counter()
        aot_compile(ep, options, path, {META_KEY: json.dumps(doc)})
        return cls(path, doc, tmp, time.perf_counter() - t0)

    @classmethod
    def load(cls, path: str) -> "AotRunner":
        """Load a package written by `save`; a damaged or foreign file is a DamagedArtifact naming `path`."""
        doc = read_package_doc(path)
        try:
            return cls(path, doc)
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

    def save(self, path: str, doc: dict) -> None:
        doc = {**self.doc, **doc}
        if doc != self.doc:  # e.g. new FreeU scales: the document inside the package must say so
            _rewrite_package_doc(self.package_path, path, doc)
        else:
            shutil.copyfile(self.package_path, path)


def read_package_doc(path: str) -> dict:
    """The artifact document inside a `.pt2` written by `save`, checked before anything is loaded."""
    try:
        with zipfile.ZipFile(path) as z:
            bad = z.testzip()
            if bad is not None:
                raise DamagedArtifact(f"{path}: damaged .pt2 package (checksum error in {bad})")
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
    """Copy the package `src` to `dst` with the artifact document replaced in its metadata."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith("metadata.json"):
                meta = json.loads(data)
                if isinstance(meta, dict) and META_KEY in meta:
                    meta[META_KEY] = json.dumps(doc)
                    data = json.dumps(meta).encode()
            zout.writestr(item, data)
