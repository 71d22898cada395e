"""XLA backend: the exported UNet graph on an XLA device through torch_xla (PJRT CPU here, TPU the same code).

Two routes from one `torch.export.ExportedProgram` (optionally `passes.optimize`d first):
  * in-process: `compile_openxla(ep)` moves the program to the XLA device and wraps it in
    `torch.compile(ep.module(), backend="openxla")`; the first call traces and compiles, later calls with the
    same shapes run the cached XLA executable.
  * artifact: `export_stablehlo(ep, path)` lowers the program with `torch_xla.stablehlo` and writes the
    StableHLO bytecode, its weights and a manifest to the directory `path` (atomically: a temp dir, then a
    rename); `load_stablehlo(path)` runs it again in any process with torch_xla, without the model source.
    A loaded artifact compiles once per process: torch_xla 2.9's own StableHLO runner (`_run_stablehlo`)
    compiles on every call and has no executable cache, so the artifact also carries the HLO module of the
    same lowering (HLO_FILE; the StableHLO is converted from it, same parameters in the same order), which
    runs as one torch_xla user computation: the lazy graph around it is hashed and its executable cached like
    any torch_xla graph. With torch_xla's persistent cache (`load_stablehlo(path, cache_dir=...)`,
    `enable_persistent_cache`, or torch_xla's own XLA_PERSISTENT_CACHE_PATH set before the process starts, which
    `compiled_unet.load` and the CLI honour) a second process on the machine finds the executable and loads it
    instead of compiling, where PJRT can deserialize executables (TPU, GPU; torch_xla 2.9's PJRT CPU cannot,
    so on CPU each process compiles once).

    ep = compiled_unet.export(unet, sample, t, text)
    fast = compile_openxla(ep, optimize=True)
    out = fast(sample, t, encoder_hidden_states=text)[0]            # same call as ep.module()
    export_stablehlo(ep, "out/unet-stablehlo", optimize=True)
    out = load_stablehlo("out/unet-stablehlo")(sample, t, encoder_hidden_states=text)[0]

Calls take what `ep.module()` takes (constant arguments such as `return_dict=False` may be left out) and
return what it returns, on the device of the inputs. torch_xla 2.9 needs torch 2.9, so it lives in its own
environment (`bash scripts/env_xla.sh` makes `.venv-xla`); this module imports without it and raises
`XLAEnvironmentMissing` (one line) when an XLA entry point is used without it.
"""
from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import shutil
import time
import warnings
from pathlib import Path

import torch
import torch.utils._pytree as pytree

from .._atomic import atomic_dir
from ..runtime.signature import Signature
from ..errors import DamagedArtifact

FORMAT = "compiled_unet.xla-stablehlo/1"
MANIFEST = "compiled_unet_xla.json"
HLO_FILE = "compiled_unet_hlo.pb"   # the HLO module the StableHLO was converted from (what runs, compiled once)
ENV_HINT = ("run bash scripts/env_xla.sh, then use .venv-xla/bin/python (torch 2.9.1 + torch-xla 2.9.0; "
            "PJRT_DEVICE=CPU, or TPU on a TPU host)")


class XLAEnvironmentMissing(RuntimeError):
    """torch_xla cannot be imported here (the default environment has torch 2.13 and no torch_xla)."""


def _torch_xla():
    try:
        import torch_xla
        import torch_xla.core.xla_model  # noqa: F401
    except Exception as e:  # ImportError, or an OSError / RuntimeError from a torch_xla built for another torch
        detail = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise XLAEnvironmentMissing(f"XLA environment missing: {ENV_HINT} [{type(e).__name__}: {detail}]") from None
    return torch_xla


def available() -> bool:
    """True when torch_xla imports in this environment."""
    try:
        _torch_xla()
    except XLAEnvironmentMissing:
        return False
    return True


def xla_device() -> torch.device:
    """The default XLA device (`PJRT_DEVICE` picks CPU, TPU, ...)."""
    return _torch_xla().device()


def compile_count() -> int:
    """How many XLA graphs this process has compiled so far (torch_xla's CompileTime metric)."""
    _torch_xla()
    import torch_xla.debug.metrics as met
    data = met.metric_data("CompileTime")
    return int(data[0]) if data else 0


def enable_persistent_cache(path, readonly: bool = False) -> None:
    """Turn on torch_xla's persistent compilation cache at `path` (compiled executables on disk, keyed by graph
    hash), so another process on this machine loads them instead of compiling. Must come before this process
    runs anything on the XLA device; the same path again is a no-op."""
    torch_xla = _torch_xla()
    import torch_xla.runtime as xr

    path = os.fspath(path)
    if torch_xla._XLAC._xla_computation_cache_is_initialized():
        if os.environ.get("XLA_PERSISTENT_CACHE_PATH") == path:
            return
        raise RuntimeError(f"enable_persistent_cache({path!r}): this process already ran XLA computations "
                           f"without that cache; call it (or load_stablehlo(..., cache_dir=...)) first")
    os.makedirs(path, exist_ok=True)
    xr.initialize_cache(path, readonly=readonly)


def _check_program(program) -> torch.export.ExportedProgram:
    if not isinstance(program, torch.export.ExportedProgram):
        raise TypeError(f"expected a torch.export.ExportedProgram (compiled_unet.export(unet, ...)), "
                        f"got {type(program).__name__}")
    return program


def _maybe_optimize(program, optimize: bool):
    if not optimize:
        return program
    from .. import passes
    optimized, _report = passes.optimize(program)
    return optimized


# --------------------------------------------------------------------------------------------------
# Inputs: bound by the runtime's one Signature; here only moved between devices.

def _to(tree, device):
    return pytree.tree_map_only(torch.Tensor, lambda t: t.to(device), tree)


def _home_device(leaves) -> torch.device:
    for x in leaves:
        if isinstance(x, torch.Tensor):
            return x.device
    return torch.device("cpu")


# --------------------------------------------------------------------------------------------------
# In-process: dynamo's openxla backend.

class OpenXLAModule(torch.nn.Module):
    """`torch.compile(program.module(), backend="openxla")` on the XLA device, called like `ep.module()`."""

    def __init__(self, program: torch.export.ExportedProgram, device: torch.device,
                 signature: Signature | None = None):
        super().__init__()
        self.program = program          # moved to `device`
        self.device = device
        self.signature = signature or Signature.from_program(program)
        # The plain module (not a UNetProgram's, whose input-binding hook dynamo cannot trace): calls are
        # bound by the signature before they reach it.
        self.module_ = torch.export.ExportedProgram.module(program)
        self.compiled = torch.compile(self.module_, backend="openxla", fullgraph=True, dynamic=False)
        self.compile_seconds: float | None = None   # wall time of the first call (trace + XLA compile + run)

    def forward(self, *args, **kwargs):
        return self.call_bound(*self.signature.bind(*args, **kwargs))

    def call_bound(self, args: tuple, kwargs: dict):
        """Run inputs already bound by the signature."""
        home = _home_device(pytree.tree_leaves((args, kwargs)))
        a, k = _to((args, kwargs), self.device)
        t0 = time.perf_counter()
        with torch.no_grad():
            out = self.compiled(*a, **k)
        if home.type != "xla":
            out = _to(out, home)   # a transfer waits for the result
        if self.compile_seconds is None:
            self.compile_seconds = time.perf_counter() - t0
        return out


def _move_program(program: torch.export.ExportedProgram, device) -> torch.export.ExportedProgram:
    """A copy of `program` on `device`: weights, constants, example inputs and burnt-in device arguments
    (arange/zeros/to/_assert_tensor_metadata say `device=cpu` in an exported CPU graph)."""
    from torch.export.passes import move_to_device_pass
    return move_to_device_pass(copy.deepcopy(program), str(device))


def compile_openxla(program: torch.export.ExportedProgram, *, optimize: bool = False, device=None) -> OpenXLAModule:
    """Compile an exported UNet (ours or diffusers', via `compiled_unet.export`) for the XLA device with dynamo's
    `openxla` backend. `optimize=True` runs `passes.optimize` first. Compilation happens on the first call."""
    _torch_xla()
    program = _maybe_optimize(_check_program(program), optimize)
    device = torch.device(device) if device is not None else xla_device()
    return OpenXLAModule(_move_program(program, device), device, Signature.from_program(program))


# --------------------------------------------------------------------------------------------------
# Artifact: StableHLO bytecode + weights in a directory.

class _FlatInputs(torch.nn.Module):
    """The program's module called with its tensor inputs only, positionally (torch_xla's StableHLO exporter
    takes no keyword inputs); non-tensor inputs stay the exported constants."""

    def __init__(self, module, signature: Signature):
        super().__init__()
        self.inner = module
        self._signature = signature
        self._leaves = [leaf.value for leaf in signature.leaves]
        self._positions = [i for i, leaf in enumerate(signature.leaves) if leaf.is_tensor]

    def forward(self, *tensors):
        leaves = list(self._leaves)
        for pos, t in zip(self._positions, tensors):
            leaves[pos] = t
        args, kwargs = pytree.tree_unflatten(leaves, pytree.treespec_loads(self._signature.spec))
        return self.inner(*args, **kwargs)


def _check_json_constants(signature: Signature) -> None:
    for leaf in signature.leaves:
        if not leaf.is_tensor and not (leaf.value is None or isinstance(leaf.value, (bool, int, float, str))):
            raise ValueError(f"export_stablehlo: the non-tensor input {leaf.name} = {leaf.value!r} cannot be "
                             f"saved in the manifest")


class StableHLOModule:
    """A StableHLO UNet artifact on the XLA device, called like `ep.module()` (tensor shapes and dtypes fixed).

    With the artifact's HLO module (HLO_FILE) the first call compiles and later calls reuse the executable
    (`compiles_once`); an artifact written before HLO_FILE existed runs through torch_xla's `_run_stablehlo`,
    which compiles on every call (write it again to fix that)."""

    def __init__(self, graph, manifest: dict, path: Path | None, device: torch.device, hlo: bytes | None = None):
        self.graph = graph      # torch_xla.stablehlo.StableHLOGraphModule
        self.manifest = manifest
        self.path = path
        self.device = device
        self.signature = Signature.from_json(manifest["signature"])
        self.first_call_seconds: float | None = None   # wall time of the first call (XLA compile + run)
        self._computation = self._name = None
        if hlo is not None:
            torch_xla = _torch_xla()
            # A name from the HLO's digest: the same artifact hashes alike in every process (persistent cache).
            self._name = f"xla::compiled_unet_{hashlib.sha256(hlo).hexdigest()[:16]}"
            self._computation = torch_xla._XLAC._xla_op_computation_from_module_proto(self._name, hlo)
        self._func = graph._bundle.stablehlo_funcs[0]
        # Weights go to the device once, not on every call (the bundle keeps numpy arrays otherwise).
        bundle = graph._bundle
        bundle.state_dict = {k: torch.from_numpy(v).to(device) if not isinstance(v, torch.Tensor) else v.to(device)
                             for k, v in bundle.state_dict.items()}
        bundle.additional_constants = [torch.from_numpy(v).to(device) if not isinstance(v, torch.Tensor) else v
                                       for v in bundle.additional_constants]

    def stablehlo_text(self) -> str | None:
        text = self.graph.get_stablehlo_text()
        return text.decode() if isinstance(text, bytes) else text

    def __call__(self, *args, **kwargs):
        return self.call_bound(*self.signature.bind(*args, **kwargs))

    @property
    def compiles_once(self) -> bool:
        """True when calls reuse one compiled executable (the artifact carries its HLO module)."""
        return self._computation is not None

    def call_bound(self, args: tuple, kwargs: dict):
        leaves = pytree.tree_leaves((args, kwargs))
        tensors = [v for v in leaves if isinstance(v, torch.Tensor)]
        home = _home_device(tensors)
        t0 = time.perf_counter()
        if self._computation is None:
            out = self.graph(*[t.to(self.device) for t in tensors])
        else:
            out = self._run_cached([t.to(self.device) for t in tensors])
        out = _to(out, home) if home.type != "xla" else out   # a transfer waits for the result
        if self.first_call_seconds is None:
            self.first_call_seconds = time.perf_counter() - t0
        return out

    def _run_cached(self, tensors: list):
        """The HLO module as one user computation in torch_xla's lazy graph: graph hash -> cached executable."""
        import torch_xla
        from torch_xla.stablehlo import _extract_call_parameters

        # Weights and lifted constants in the HLO module's parameter order (the StableHLO's: the same lowering).
        params = _extract_call_parameters(tuple(tensors), self._func.meta, self.graph._bundle)
        flat = torch_xla._XLAC._xla_user_computation(self._name, params, self._computation)
        spec = self._func.meta.output_pytree_spec
        return pytree.tree_unflatten(list(flat), pytree.treespec_loads(spec)) if spec is not None else flat


def write_stablehlo(program: torch.export.ExportedProgram, folder, *, include_text: bool = True,
                    doc: dict | None = None):
    """Lower `program` to StableHLO and write it with its weights and manifest into the (new, empty) folder.
    `doc`: extra entries for the manifest (the compiled UNet's artifact document). Returns (graph, manifest)."""
    torch_xla = _torch_xla()
    from torch_xla.stablehlo import StableHLOExportOptions, exported_program_to_stablehlo

    signature = Signature.from_program(program)
    _check_json_constants(signature)
    t0 = time.perf_counter()
    flat = _FlatInputs(torch.export.ExportedProgram.module(program), signature)
    tensors = tuple(v for v in pytree.tree_leaves(program.example_inputs) if isinstance(v, torch.Tensor))
    with torch.no_grad():
        flat_program = torch.export.export(flat, tensors, strict=False)
    with _capture_hlo() as hlo:
        graph = exported_program_to_stablehlo(flat_program,
                                              StableHLOExportOptions(include_human_readable_text=include_text))
    if len(hlo) != 1:
        raise RuntimeError(f"write_stablehlo: expected one HLO module from torch_xla's StableHLO lowering, got "
                           f"{len(hlo)} (torch_xla {getattr(torch_xla, '__version__', '?')} changed its exporter?)")
    manifest = {**(doc or {}), "format": FORMAT, "signature": signature.to_json(), "torch": torch.__version__,
                "torch_xla": getattr(torch_xla, "__version__", "?"), "hlo": HLO_FILE,
                "lower_seconds": round(time.perf_counter() - t0, 3)}
    graph.save(str(folder))
    with open(Path(folder) / HLO_FILE, "wb") as f:
        f.write(hlo[0])
    with open(Path(folder) / MANIFEST, "w") as f:
        json.dump(manifest, f, indent=1)
    return graph, manifest


@contextlib.contextmanager
def _capture_hlo():
    """Record the HLO module of every graph torch_xla's StableHLO exporter converts (it converts the lazy graph's
    HLO with `xla_model.get_stablehlo_bytecode`; the HLO is the same graph, with the same parameters)."""
    import torch_xla
    import torch_xla.core.xla_model as xm

    captured: list[bytes] = []
    original = xm.get_stablehlo_bytecode

    def get_stablehlo_bytecode(tensors=None):
        captured.append(torch_xla._XLAC._get_xla_tensors_hlo_proto(tensors))
        return original(tensors)

    xm.get_stablehlo_bytecode = get_stablehlo_bytecode
    try:
        yield captured
    finally:
        xm.get_stablehlo_bytecode = original


def _read_hlo(path: Path, manifest: dict) -> bytes | None:
    if "hlo" not in manifest:
        warnings.warn(f"{path}: a StableHLO artifact without its HLO module (written before compiled_unet stored "
                      f"{HLO_FILE}); torch_xla recompiles it on every call. Export it again to compile once.",
                      stacklevel=3)
        return None
    try:
        return (path / manifest["hlo"]).read_bytes()
    except OSError:
        raise DamagedArtifact(f"{path}: damaged StableHLO artifact (its HLO module {manifest['hlo']} is "
                              f"missing or unreadable)") from None


def export_stablehlo(program: torch.export.ExportedProgram, path, *, optimize: bool = False,
                     include_text: bool = True) -> StableHLOModule:
    """Lower `program` to StableHLO and save it with its weights to the directory `path` (replaced atomically).
    Returns the artifact, ready to run. `optimize=True` runs `passes.optimize` first."""
    _torch_xla()
    program = _maybe_optimize(_check_program(program), optimize)
    with atomic_dir(path) as tmp:
        graph, manifest = write_stablehlo(program, tmp, include_text=include_text, doc={"optimized": bool(optimize)})
    return StableHLOModule(graph, manifest, Path(path), xla_device(), _read_hlo(Path(path), manifest))


def read_manifest(path) -> dict:
    """The manifest of a StableHLO artifact folder; a missing or damaged one is a DamagedArtifact naming it."""
    path = Path(path)
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        raise DamagedArtifact(f"{path}: not a compiled_unet StableHLO artifact (no {MANIFEST})")
    try:
        manifest = json.loads(manifest_file.read_text())
        Signature.from_json(manifest["signature"])
    except (ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise DamagedArtifact(f"{manifest_file}: damaged StableHLO artifact manifest") from None
    if manifest.get("format") != FORMAT:
        raise DamagedArtifact(f"{path}: unknown artifact format {manifest.get('format')!r} (expected {FORMAT!r})")
    return manifest


def load_stablehlo(path, device=None, *, cache_dir=None) -> StableHLOModule:
    """Load a directory written by `export_stablehlo` (needs torch_xla, not the model source). The first call
    compiles, later calls reuse the executable. `cache_dir`: torch_xla's persistent compilation cache there
    (`enable_persistent_cache`), so that the first call of another process on this machine does not compile."""
    _torch_xla()
    from torch_xla.stablehlo import StableHLOGraphModule

    manifest = read_manifest(path)
    if cache_dir is not None:
        enable_persistent_cache(cache_dir)   # before the device is touched
    device = torch.device(device) if device is not None else xla_device()
    try:
        graph = StableHLOGraphModule.load(str(path))
    except Exception as e:  # noqa: BLE001 - torch_xla's errors name neither the folder nor the cause
        raise DamagedArtifact(f"{path}: the StableHLO artifact is damaged and cannot be loaded "
                              f"({type(e).__name__})") from None
    return StableHLOModule(graph, manifest, Path(path), device, _read_hlo(Path(path), manifest))


# --------------------------------------------------------------------------------------------------
# Runners for CompiledUNet (the protocol in backends/__init__.py).

class _XlaRunnerBase:
    options = None
    artifact_is_dir = True

    def prepare(self, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return args, kwargs

    def constant_specs(self) -> dict[str, list]:
        return {}

    def swap_refusal(self) -> str | None:
        return ("swap_weights is not supported on the xla backend yet: compile again, or write one StableHLO "
                "artifact per weight set")

    def load_constants(self, tensors) -> None:
        raise NotImplementedError(self.swap_refusal())


class OpenXlaRunner(_XlaRunnerBase):
    """dynamo's openxla backend on the XLA device, compiled on the example inputs at construction."""

    kind = "openxla"

    def __init__(self, program: torch.export.ExportedProgram, args: tuple, kwargs: dict):
        self.program = program
        self.module = compile_openxla(program)
        self.module.call_bound(args, kwargs)
        self.compile_seconds = self.module.compile_seconds

    def __call__(self, args: tuple, kwargs: dict):
        return tuple(self.module.call_bound(args, kwargs))

    def save(self, path: str, doc: dict) -> None:
        write_stablehlo(self.program, path, doc=doc)


class StableHLORunner(_XlaRunnerBase):
    """A loaded StableHLO artifact folder."""

    kind = "stablehlo"
    compile_seconds = None

    def __init__(self, module: StableHLOModule):
        self.module = module
        self.doc = module.manifest

    @classmethod
    def load(cls, path) -> "StableHLORunner":
        return cls(load_stablehlo(path))

    def __call__(self, args: tuple, kwargs: dict):
        return tuple(self.module.call_bound(args, kwargs))

    def save(self, path: str, doc: dict) -> None:
        shutil.copytree(self.module.path, path, dirs_exist_ok=True)
        with open(Path(path) / MANIFEST, "w") as f:
            json.dump({**self.doc, **doc, "format": FORMAT, "signature": self.doc["signature"]}, f, indent=1)


__all__ = ["FORMAT", "OpenXLAModule", "OpenXlaRunner", "StableHLOModule", "StableHLORunner", "XLAEnvironmentMissing",
           "available", "compile_count", "compile_openxla", "enable_persistent_cache", "export_stablehlo", "load_stablehlo", "read_manifest",
           "write_stablehlo", "xla_device"]
