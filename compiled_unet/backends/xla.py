"""XLA backend: the exported UNet graph on an XLA device through torch_xla (PJRT CPU here, TPU the same code).

Two routes from one `torch.export.ExportedProgram` (optionally `passes.optimize`d first):
  * in-process: `compile_openxla(ep)` moves the program to the XLA device and wraps it in
    `torch.compile(ep.module(), backend="openxla")`; the first call traces and compiles, later calls with the
    same shapes run the cached XLA executable.
  * artifact: `export_stablehlo(ep, path)` lowers the program with `torch_xla.stablehlo` and writes the
    StableHLO bytecode, its weights and a manifest to the directory `path` (atomically: a temp dir, then a
    rename); `load_stablehlo(path)` runs it again in any process with torch_xla, without the model source.
    torch_xla 2.9 runs a loaded StableHLO module through `_run_stablehlo`, which compiles on every call (no
    executable cache); use `compile_openxla` for repeated calls in one process.

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

import copy
import json
import os
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import torch
import torch.utils._pytree as pytree

from .._pytree import children as _children

FORMAT = "compiled_unet.xla-stablehlo/1"
MANIFEST = "compiled_unet_xla.json"
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


def _check_program(program) -> torch.export.ExportedProgram:
    if not isinstance(program, torch.export.ExportedProgram):
        raise TypeError(f"expected a torch.export.ExportedProgram (compiled_unet.export(unet, ...)), "
                        f"got {type(program).__name__}")
    return program


def _maybe_optimize(program, optimize: bool):
    if not optimize:
        return program
    import passes
    optimized, _report = passes.optimize(program)
    return optimized


# --------------------------------------------------------------------------------------------------
# Inputs: bind a call to the exported input structure.

def _reorder(value, spec, name: str):
    """`value` with its dicts ordered as in `spec` (pytree compares dict keys in order)."""
    if spec.type is dict:
        if not isinstance(value, dict):
            raise ValueError(f"{name or 'inputs'}: expected a dict with keys {list(spec.context)}, got {type(value).__name__}")
        missing = [k for k in spec.context if k not in value]
        extra = [k for k in value if k not in spec.context]
        if missing or extra:
            raise ValueError(f"{name or 'keyword arguments'}: the program was exported with keys {list(spec.context)}"
                             + (f"; missing {missing}" if missing else "") + (f"; unexpected {extra}" if extra else ""))
        return {k: _reorder(value[k], s, f"{name}[{k!r}]" if name else k)
                for k, s in zip(spec.context, _children(spec))}
    if spec.type in (tuple, list) and isinstance(value, (tuple, list)) and len(value) == len(_children(spec)):
        return spec.type(_reorder(v, s, f"{name}[{i}]") for i, (v, s) in enumerate(zip(value, _children(spec))))
    return value


# UNet2DConditionModel.forward's arguments after (sample, timestep), in order: positional extras map onto them.
FORWARD_ARGS = ("encoder_hidden_states", "class_labels", "timestep_cond", "attention_mask", "cross_attention_kwargs",
                "added_cond_kwargs", "down_block_additional_residuals", "mid_block_additional_residual",
                "down_intrablock_additional_residuals", "encoder_attention_mask", "return_dict")


def _bind(in_spec, constants: dict[int, Any], args: tuple, kwargs: dict) -> list:
    """Flatten a call (args, kwargs) against `in_spec`; fill and check the exported constant leaves."""
    arg_spec, kw_spec = _children(in_spec)
    kwargs = dict(kwargs)
    n = len(_children(arg_spec))
    if len(args) > n and n == 2 and len(args) <= n + len(FORWARD_ARGS):
        for key, value in zip(FORWARD_ARGS, args[n:]):
            if key in kwargs:
                raise TypeError(f"{key} given both positionally and as a keyword")
            kwargs[key] = value
        args = args[:n]
    for i, key in enumerate(kw_spec.context):   # constants left out (e.g. return_dict) take the exported value
        if key not in kwargs and _children(kw_spec)[i].is_leaf():
            pos = arg_spec.num_leaves + sum(s.num_leaves for s in _children(kw_spec)[:i])
            if pos in constants:
                kwargs[key] = constants[pos]
    if len(args) != len(_children(arg_spec)):
        raise ValueError(f"expected {len(_children(arg_spec))} positional inputs (sample, timestep), got {len(args)}")
    bound = (tuple(_reorder(a, s, f"args[{i}]") for i, (a, s) in enumerate(zip(args, _children(arg_spec)))),
             _reorder(kwargs, kw_spec, ""))
    leaves, spec = pytree.tree_flatten(bound)
    if spec != in_spec:
        raise ValueError(f"inputs differ in structure from the exported ones: expected {in_spec}, got {spec}")
    for pos, value in constants.items():
        if leaves[pos] != value:
            raise ValueError(f"{_leaf_names(in_spec)[pos]} was exported as the constant {value!r}, got {leaves[pos]!r}")
    return leaves


def _leaf_names(in_spec) -> list[str]:
    dummy = pytree.tree_unflatten(list(range(in_spec.num_leaves)), in_spec)
    names = []
    for path, _ in pytree.tree_flatten_with_path(dummy)[0]:
        head, rest = path[0], path[1:]
        if head.idx == 0:
            names.append(("sample", "timestep")[rest[0].idx] + pytree.keystr(rest[1:]) if rest[0].idx < 2
                         else f"args[{rest[0].idx}]")
        else:
            names.append(rest[0].key + pytree.keystr(rest[1:]))
    return names


def _signature(names, leaves) -> list[dict]:
    return [{"name": names[i], "shape": list(v.shape), "dtype": str(v.dtype)}
            for i, v in enumerate(leaves) if isinstance(v, torch.Tensor)]


def _check_tensors(tensors, expected: list[dict], what: str) -> None:
    """Static shapes: any other shape or dtype is an error naming the input (never a silent recompile)."""
    for t, want in zip(tensors, expected):
        if not isinstance(t, torch.Tensor) or list(t.shape) != want["shape"] or str(t.dtype) != want["dtype"]:
            got = f"{tuple(t.shape)} {t.dtype}" if isinstance(t, torch.Tensor) else repr(t)
            raise ValueError(f"{want['name']}: this {what} was compiled for {tuple(want['shape'])} {want['dtype']}, "
                             f"got {got}")


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

    def __init__(self, program: torch.export.ExportedProgram, device: torch.device):
        super().__init__()
        self.program = program          # moved to `device`
        self.device = device
        self._in_spec = program.call_spec.in_spec
        ex_args, ex_kwargs = program.example_inputs
        leaves = pytree.tree_flatten((ex_args, ex_kwargs))[0]
        self._constants = {i: v for i, v in enumerate(leaves) if not isinstance(v, torch.Tensor)}
        self._expected = _signature(_leaf_names(self._in_spec), leaves)
        self.module_ = program.module()
        self.compiled = torch.compile(self.module_, backend="openxla", fullgraph=True, dynamic=False)
        self.compile_seconds: float | None = None   # wall time of the first call (trace + XLA compile + run)

    def forward(self, *args, **kwargs):
        leaves = _bind(self._in_spec, self._constants, args, kwargs)
        _check_tensors([v for v in leaves if isinstance(v, torch.Tensor)], self._expected, "openxla module")
        home = _home_device(leaves)
        a, k = pytree.tree_unflatten(_to(leaves, self.device), self._in_spec)
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
    return OpenXLAModule(_move_program(program, device), device)


# --------------------------------------------------------------------------------------------------
# Artifact: StableHLO bytecode + weights in a directory.

class _FlatInputs(torch.nn.Module):
    """The program's module called with its tensor inputs only, positionally (torch_xla's StableHLO exporter
    takes no keyword inputs); non-tensor inputs stay the exported constants."""

    def __init__(self, module, in_spec, leaves, tensor_positions):
        super().__init__()
        self.inner = module
        self._in_spec = in_spec
        self._leaves = list(leaves)
        self._positions = list(tensor_positions)

    def forward(self, *tensors):
        leaves = list(self._leaves)
        for pos, t in zip(self._positions, tensors):
            leaves[pos] = t
        args, kwargs = pytree.tree_unflatten(leaves, self._in_spec)
        return self.inner(*args, **kwargs)


def _json_constant(value, name):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise ValueError(f"export_stablehlo: the non-tensor input {name} = {value!r} cannot be saved in the manifest")


class StableHLOModule:
    """A StableHLO UNet artifact on the XLA device, called like `ep.module()` (tensor shapes and dtypes fixed)."""

    def __init__(self, graph, manifest: dict, path: Path | None, device: torch.device):
        self.graph = graph      # torch_xla.stablehlo.StableHLOGraphModule
        self.manifest = manifest
        self.path = path
        self.device = device
        self._in_spec = pytree.treespec_loads(manifest["in_spec"])
        self._constants = {int(k): v for k, v in manifest["constants"].items()}
        self._positions = manifest["tensor_positions"]
        self._inputs = manifest["inputs"]
        # Weights go to the device once, not on every call (the bundle keeps numpy arrays otherwise).
        bundle = graph._bundle
        bundle.state_dict = {k: torch.from_numpy(v).to(device) if not isinstance(v, torch.Tensor) else v.to(device)
                             for k, v in bundle.state_dict.items()}
        bundle.additional_constants = [torch.from_numpy(v).to(device) if not isinstance(v, torch.Tensor) else v
                                       for v in bundle.additional_constants]

    def stablehlo_text(self) -> str | None:
        return self.graph.get_stablehlo_text()

    def __call__(self, *args, **kwargs):
        leaves = _bind(self._in_spec, self._constants, args, kwargs)
        tensors = [leaves[p] for p in self._positions]
        _check_tensors(tensors, self._inputs, "StableHLO artifact")
        home = _home_device(tensors)
        out = self.graph(*[t.to(self.device) for t in tensors])
        return _to(out, home) if home.type != "xla" else out


def export_stablehlo(program: torch.export.ExportedProgram, path, *, optimize: bool = False,
                     include_text: bool = True) -> StableHLOModule:
    """Lower `program` to StableHLO and save it with its weights to the directory `path` (replaced atomically).
    Returns the artifact, ready to run. `optimize=True` runs `passes.optimize` first."""
    torch_xla = _torch_xla()
    from torch_xla.stablehlo import StableHLOExportOptions, exported_program_to_stablehlo

    program = _maybe_optimize(_check_program(program), optimize)
    in_spec = program.call_spec.in_spec
    ex_args, ex_kwargs = program.example_inputs
    leaves, spec = pytree.tree_flatten((ex_args, ex_kwargs))
    if spec != in_spec:
        raise ValueError("export_stablehlo: the program's example inputs do not match its input structure")
    names = _leaf_names(in_spec)
    positions = [i for i, v in enumerate(leaves) if isinstance(v, torch.Tensor)]
    constants = {str(i): _json_constant(v, names[i]) for i, v in enumerate(leaves) if not isinstance(v, torch.Tensor)}
    tensors = tuple(leaves[i] for i in positions)

    t0 = time.perf_counter()
    flat = _FlatInputs(program.module(), in_spec, leaves, positions)
    with torch.no_grad():
        flat_program = torch.export.export(flat, tensors, strict=False)
    graph = exported_program_to_stablehlo(flat_program, StableHLOExportOptions(include_human_readable_text=include_text))
    lower_seconds = time.perf_counter() - t0

    manifest = {
        "format": FORMAT,
        "in_spec": pytree.treespec_dumps(in_spec),
        "tensor_positions": positions,
        "constants": constants,
        "inputs": _signature(names, leaves),
        "optimized": bool(optimize),
        "torch": torch.__version__,
        "torch_xla": getattr(torch_xla, "__version__", "?"),
        "lower_seconds": round(lower_seconds, 3),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
    try:
        graph.save(str(tmp))
        with open(tmp / MANIFEST, "w") as f:
            json.dump(manifest, f, indent=1)
        if path.exists():
            os.rename(path, old)
        os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return StableHLOModule(graph, manifest, path, xla_device())


def load_stablehlo(path, device=None) -> StableHLOModule:
    """Load a directory written by `export_stablehlo` (needs torch_xla, not the model source)."""
    _torch_xla()
    from torch_xla.stablehlo import StableHLOGraphModule

    path = Path(path)
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        raise FileNotFoundError(f"not a compiled_unet StableHLO artifact (no {MANIFEST}): {path}")
    manifest = json.loads(manifest_file.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: unknown artifact format {manifest.get('format')!r} (expected {FORMAT!r})")
    device = torch.device(device) if device is not None else xla_device()
    return StableHLOModule(StableHLOGraphModule.load(str(path)), manifest, path, device)


__all__ = ["FORMAT", "OpenXLAModule", "StableHLOModule", "XLAEnvironmentMissing", "available", "compile_count",
           "compile_openxla", "export_stablehlo", "load_stablehlo", "xla_device"]
