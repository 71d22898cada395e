"""`compile`, `save`, `load`: a UNet (ours, diffusers' or an ExportedProgram) -> export -> passes -> Inductor.

    compiled = compiled_unet.compile(unet, sample, t, text)           # CompiledUNet, forward like the UNet's
    pipe.unet = compiled                                              # .config/.dtype/.device as pipelines read
    compiled_unet.save(compiled, "unet.pt2")                          # AOTInductor package, atomic
    loaded = compiled_unet.load("unet.pt2")                           # no model source needed
    loaded.swap_weights(compiled.derive_weights(new_unet.state_dict()))   # new weights, no recompile

A compiled UNet serves exactly the shapes it was compiled for: any other shape, dtype or set of optional
inputs is a ValueError naming what it expects (never a silent recompile). Timesteps are the one input
normalized on the way in (a number or a one-element tensor is broadcast to the compiled batch and cast to
the compiled dtype, which is what the UNet itself does with them).
"""
from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Mapping, Sequence

import torch
import torch.utils._pytree as pytree
from torch.export import ExportedProgram

from ._pytree import children as _children
from .backends import AotRunner, InductorOptions, JitRunner, check_backend
from .config import UNetConfig
from .unet import UNet2DConditionOutput

FORMAT = "compiled_unet.inductor-aot/1"
_META_KEY = "compiled_unet"
# forward's optional arguments, in order; `sample` and `timestep` are positional.
OPTIONAL_INPUTS = ("encoder_hidden_states", "class_labels", "timestep_cond", "attention_mask", "cross_attention_kwargs",
                   "added_cond_kwargs", "down_block_additional_residuals", "mid_block_additional_residual",
                   "down_intrablock_additional_residuals", "encoder_attention_mask")


# --------------------------------------------------------------------------------------------------
# The call signature: which inputs, their nesting, shapes and dtypes.

def _same_tensor(a: torch.Tensor, b) -> bool:
    """Equal shape, dtype and values (oneDNN-packed tensors, layout torch._mkldnn, compared unpacked)."""
    if not isinstance(b, torch.Tensor) or a.shape != b.shape or a.dtype != b.dtype or a.is_mkldnn != b.is_mkldnn:
        return False
    return torch.equal(a.to_dense(), b.to_dense()) if a.is_mkldnn else torch.equal(a, b)


def _tuples(x):
    """Lists -> tuples, recursively (diffusers accepts either for residuals; the graph sees one)."""
    if isinstance(x, (list, tuple)):
        return tuple(_tuples(v) for v in x)
    if isinstance(x, dict):
        return {k: _tuples(v) for k, v in x.items()}
    return x


def _path_name(path) -> str:
    # path[0] selects args (0) or kwargs (1); args are (sample, timestep).
    head, rest = path[0], path[1:]
    if head.idx == 0:
        return ("sample", "timestep")[rest[0].idx] + pytree.keystr(rest[1:])
    return rest[0].key + pytree.keystr(rest[1:])


@dataclasses.dataclass(frozen=True)
class Leaf:
    name: str                          # e.g. "added_cond_kwargs['text_embeds']"
    shape: tuple | None = None         # tensors
    dtype: str | None = None
    value: Any = None                  # non-tensor leaves (must match exactly)

    @property
    def is_tensor(self) -> bool:
        return self.shape is not None

    def describe(self) -> str:
        return f"{self.name}: {list(self.shape)} {self.dtype}" if self.is_tensor else f"{self.name}={self.value!r}"


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


@dataclasses.dataclass(frozen=True)
class Signature:
    """The inputs a compiled graph takes: top-level kwarg names (as exported) and every leaf, in order."""
    kwarg_names: tuple[str, ...]
    leaves: tuple[Leaf, ...]
    spec: str                           # pytree treespec of ((sample, timestep), kwargs), serialized
    device: str

    @classmethod
    def from_example(cls, sample, timestep, kwargs: Mapping[str, Any]) -> "Signature":
        kwargs = {**_tuples(dict(kwargs)), "return_dict": False}
        flat, spec = pytree.tree_flatten_with_path(((sample, timestep), kwargs))
        leaves = tuple(Leaf(_path_name(p), tuple(v.shape), _dtype_name(v.dtype)) if torch.is_tensor(v)
                       else Leaf(_path_name(p), value=v) for p, v in flat)
        return cls(tuple(k for k in kwargs if k != "return_dict"), leaves, pytree.treespec_dumps(spec),
                   str(sample.device))

    def describe(self) -> str:
        return ", ".join(leaf.describe() for leaf in self.leaves if leaf.name != "return_dict")

    @property
    def shapes(self) -> dict[str, tuple]:
        return {leaf.name: leaf.shape for leaf in self.leaves if leaf.is_tensor}

    def bind(self, sample, timestep, inputs: Mapping[str, Any], contiguous: bool = False) -> tuple[tuple, dict]:
        """Validate a call against this signature; returns (args, kwargs) in the exported structure.

        Raises ValueError naming the expected inputs when anything differs (shape, dtype, device,
        optional inputs given or missing, non-tensor values)."""
        extra = sorted(k for k, v in inputs.items() if v is not None and k not in self.kwarg_names)
        if extra:
            raise self._error(f"compiled without {extra}")
        timestep = self._timestep(timestep)
        kwargs = {k: _tuples(inputs.get(k)) for k in self.kwarg_names}
        kwargs["return_dict"] = False
        flat, _ = pytree.tree_flatten_with_path(((sample, timestep), kwargs))
        got = {_path_name(p): v for p, v in flat}
        missing = [leaf.name for leaf in self.leaves if leaf.name not in got]
        unexpected = [n for n in got if n not in {leaf.name for leaf in self.leaves}]
        if missing or unexpected:
            raise self._error(f"inputs differ: missing {missing}, not compiled for {unexpected}")
        values = []
        for leaf in self.leaves:
            v = got[leaf.name]
            if leaf.is_tensor:
                if v is None:
                    raise self._error(f"{leaf.name} is missing")
                if not torch.is_tensor(v):
                    raise self._error(f"{leaf.name} must be a tensor, got {type(v).__name__}")
                if tuple(v.shape) != leaf.shape or _dtype_name(v.dtype) != leaf.dtype or str(v.device) != self.device:
                    raise self._error(f"{leaf.name} is {list(v.shape)} {_dtype_name(v.dtype)} on {v.device}; "
                                      f"expected {list(leaf.shape)} {leaf.dtype} on {self.device}")
                values.append(v.contiguous() if contiguous else v)
            else:
                if torch.is_tensor(v) or v != leaf.value:
                    shown = "a tensor" if torch.is_tensor(v) else repr(v)
                    raise self._error(f"{leaf.name} is {shown} but the graph was compiled with {leaf.value!r}")
                values.append(v)
        (args, kw) = pytree.tree_unflatten(values, pytree.treespec_loads(self.spec))
        return args, kw

    def _timestep(self, timestep):
        leaf = self.leaves[1]  # timestep is always the second leaf
        if not leaf.is_tensor:
            return timestep
        t = torch.as_tensor(timestep, device=self.device)
        if tuple(t.shape) != leaf.shape and t.numel() == 1:
            # A real copy: an expanded size-1 tensor keeps stride 0 through `.contiguous()`, and dynamo's
            # stride guard would then see a different input than the one compiled (a recompile).
            t = t.reshape(()).expand(leaf.shape).clone(memory_format=torch.contiguous_format)
        return t.to(getattr(torch, leaf.dtype)).contiguous()

    def _error(self, what: str) -> ValueError:
        return ValueError(f"compiled UNet called with other inputs than it was compiled for ({what}). "
                          f"It expects exactly: {self.describe()}. Compile again (or use shape buckets) "
                          f"for other shapes.")

    def to_json(self) -> dict:
        return {"kwarg_names": list(self.kwarg_names), "spec": self.spec, "device": self.device,
                "leaves": [{"name": x.name, "shape": None if x.shape is None else list(x.shape), "dtype": x.dtype,
                            "value": x.value} for x in self.leaves]}

    @classmethod
    def from_json(cls, d: dict) -> "Signature":
        leaves = tuple(Leaf(x["name"], None if x["shape"] is None else tuple(x["shape"]), x["dtype"], x["value"])
                       for x in d["leaves"])
        return cls(tuple(d["kwarg_names"]), leaves, d["spec"], d["device"])


# --------------------------------------------------------------------------------------------------

class _Attr:
    """Read-only attribute view of a config dict (for artifacts whose config is not a UNetConfig)."""

    def __init__(self, d: dict):
        self.__dict__.update(d)

    def get(self, key, default=None):
        return self.__dict__.get(key, default)

    def __getitem__(self, key):
        return self.__dict__[key]

    def __contains__(self, key):
        return key in self.__dict__


def _config_from_dict(d: dict | None):
    if d is None:
        return None
    try:
        return UNetConfig.from_dict(d)
    except (TypeError, ValueError):
        return _Attr(d)


def _config_to_dict(config) -> dict | None:
    if config is None:
        return None
    if isinstance(config, UNetConfig):
        return config.to_dict()
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


class CompiledUNet(torch.nn.Module):
    """A compiled UNet graph behind the UNet's forward signature and output type.

    A drop-in `pipe.unet`: `.config` (the UNet's config, attribute access), `.dtype`, `.device`,
    `.in_channels`. Holds no parameters of its own; `.to()` and `.eval()` are no-ops.
    """

    def __init__(self, runner, signature: Signature, config=None, *, exported: ExportedProgram | None = None,
                 optimized: ExportedProgram | None = None, passes: Any = None, report=None,
                 options: InductorOptions | None = None):
        super().__init__()
        self._runner = runner
        self.signature = signature
        self.config = config
        self.report = report                   # passes.PassReport (None when loaded or passes=None)
        self.options = options
        self._exported, self._optimized, self._passes = exported, optimized, passes

    # ----- what pipelines read
    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.signature.leaves[0].dtype)

    @property
    def device(self) -> torch.device:
        return torch.device(self.signature.device)

    @property
    def in_channels(self) -> int:
        return self.signature.leaves[0].shape[1]

    @property
    def compile_seconds(self) -> float | None:
        return getattr(self._runner, "compile_seconds", None)

    def extra_repr(self) -> str:
        return f"{self._runner.kind}, {self.signature.describe()}"

    def forward(self, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor | None = None,
                class_labels=None, timestep_cond=None, attention_mask=None, cross_attention_kwargs=None,
                added_cond_kwargs=None, down_block_additional_residuals=None, mid_block_additional_residual=None,
                down_intrablock_additional_residuals=None, encoder_attention_mask=None, return_dict: bool = True):
        inputs = dict(encoder_hidden_states=encoder_hidden_states, class_labels=class_labels,
                      timestep_cond=timestep_cond, attention_mask=attention_mask,
                      cross_attention_kwargs=cross_attention_kwargs, added_cond_kwargs=added_cond_kwargs,
                      down_block_additional_residuals=down_block_additional_residuals,
                      mid_block_additional_residual=mid_block_additional_residual,
                      down_intrablock_additional_residuals=down_intrablock_additional_residuals,
                      encoder_attention_mask=encoder_attention_mask)
        args, kwargs = self.signature.bind(sample, timestep, inputs, contiguous=self._runner.kind == "aot")
        if self._runner.kind == "jit" and self._runner.options.channels_last:
            args = (args[0].contiguous(memory_format=torch.channels_last),) + tuple(args[1:])
        out = self._runner(args, kwargs)
        return UNet2DConditionOutput(sample=out[0]) if return_dict else tuple(out)

    def accepts(self, sample, timestep, **inputs) -> bool:
        try:
            self.signature.bind(sample, timestep, inputs)
        except ValueError:
            return False
        return True

    # ----- weights
    def weight_names(self) -> list[str]:
        """The names of the compiled graph's weights (what `swap_weights` takes)."""
        return sorted(self._runner.constant_names())

    def _check_swappable(self) -> None:
        if self.options is not None and self.options.freezing:
            raise RuntimeError("this compiled UNet is frozen (InductorOptions(freezing=True), the CPU default): its "
                               "weights are constants of the compiled code under internal names. Compile with "
                               "InductorOptions(aot=True, freezing=False) to swap weights without recompiling")

    def derive_weights(self, state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Map the original UNet's state_dict to the compiled graph's weights (running the passes' weight
        rewrites, e.g. fused QKV, without compiling). Needs the exported program: in the compiling process."""
        self._check_swappable()
        if self._exported is None:
            raise RuntimeError("derive_weights needs the exported program, which a loaded artifact does not hold; "
                               "derive the weights where the UNet was compiled and pass them to swap_weights")
        raw = self._exported
        missing = sorted(set(raw.state_dict) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(raw.state_dict))
        if missing or unexpected:
            raise ValueError(f"state_dict does not match the compiled UNet: missing {missing[:10]}, "
                             f"unexpected {unexpected[:10]}")
        for k, v in raw.state_dict.items():
            if tuple(state_dict[k].shape) != tuple(v.shape):
                raise ValueError(f"state_dict[{k!r}] has shape {list(state_dict[k].shape)}, expected {list(v.shape)}")
        params = {s.target for s in raw.graph_signature.input_specs if s.kind.name == "PARAMETER"}
        new_sd = {k: (torch.nn.Parameter(state_dict[k].detach().to(v.dtype), requires_grad=False) if k in params
                      else state_dict[k].detach().to(v.dtype)) for k, v in raw.state_dict.items()}
        ep = ExportedProgram(root=raw.graph_module, graph=raw.graph, graph_signature=raw.graph_signature,
                             state_dict=new_sd, range_constraints=raw.range_constraints,
                             module_call_graph=raw.module_call_graph, example_inputs=raw.example_inputs,
                             constants=raw.constants, verifiers=raw.verifiers)
        optimized = _run_passes(ep, self._passes)[0]
        if optimized.graph_module.code != self._optimized.graph_module.code:
            raise RuntimeError("the passes rewrote the graph differently for these weights; compile again")
        names = set(self._runner.constant_names())
        # A constant the passes computed from weights (a folded weight-only subgraph) must follow the new
        # weights; one the compiled graph holds under another name (AOTInductor renames lifted constants)
        # cannot be reached, and leaving it stale would be a silently wrong answer.
        stale = sorted(k for k, v in optimized.constants.items() if k not in names and isinstance(v, torch.Tensor)
                       and not _same_tensor(v, self._optimized.constants.get(k)))
        if stale:
            raise RuntimeError(f"the passes folded these weights into constants the compiled graph holds under "
                               f"internal names: {stale[:5]} ({len(stale)} in all); swapping would leave them "
                               f"stale. Compile again, or without the pass that made them")
        weights = {**optimized.state_dict, **optimized.constants}
        return {k: v.detach() for k, v in weights.items() if k in names}

    def swap_weights(self, state_dict: Mapping[str, torch.Tensor], strict: bool = True) -> None:
        """Load new weights into the compiled graph without recompiling.

        `state_dict`: the original UNet's (derived here through the passes; in the compiling process) or the
        compiled graph's own names (`derive_weights` output; works on loaded artifacts too)."""
        self._check_swappable()
        names = set(self._runner.constant_names())
        if not set(state_dict) <= names and self._exported is not None:
            state_dict = self.derive_weights(state_dict)
        unknown = sorted(set(state_dict) - names)
        if unknown:
            raise ValueError(f"not weights of this compiled graph: {unknown[:10]} ({len(unknown)} in all). A loaded "
                             f"artifact takes the compiled graph's names: see CompiledUNet.derive_weights")
        missing = sorted(n for n in names - set(state_dict) if not n.startswith("_"))
        if strict and missing:
            raise ValueError(f"swap_weights(strict=True): missing {missing[:10]} ({len(missing)} in all)")
        self._runner.load_constants({k: v.to(self.device) for k, v in state_dict.items()})


class XlaRunner:
    """dynamo's openxla backend on the XLA device (torch_xla; PJRT_DEVICE=CPU here, TPU in production).

    Compiles on the example inputs at construction; later calls with the same shapes reuse the executable.
    Inputs and outputs stay on their own device (moved to and from XLA per call)."""

    kind = "xla"

    def __init__(self, ep: ExportedProgram, args: tuple, kwargs: dict):
        from .backends.xla import compile_openxla

        self.module = compile_openxla(ep)
        self._kwarg_names = list(_children(ep.call_spec.in_spec)[1].context)
        self(args, kwargs)
        self.compile_seconds = self.module.compile_seconds

    def __call__(self, args: tuple, kwargs: dict):
        return tuple(self.module(*args, **{k: kwargs[k] for k in self._kwarg_names}))

    def constant_names(self) -> list[str]:
        program = self.module.program
        return list(program.state_dict) + list(program.constants)

    def load_constants(self, tensors) -> None:
        raise NotImplementedError("swap_weights is not supported on the xla backend yet: compile again, or use "
                                  "StableHLO artifacts (compiled_unet.backends.xla.export_stablehlo) per weight set")


def _run_passes(ep: ExportedProgram, passes_spec):
    if passes_spec is None:
        return ep, None
    import passes as graph_passes

    return graph_passes.optimize(ep, None if passes_spec == "default" else list(passes_spec))


def compile(unet, sample: torch.Tensor, timestep, encoder_hidden_states: torch.Tensor | None = None, *,
            backend: str = "inductor", passes: str | Sequence | None = "default",
            options: InductorOptions | None = None, config=None, **forward_kwargs) -> CompiledUNet:
    """Export `unet` on these example inputs, run the graph passes, compile with `backend`.

    unet: `compiled_unet.UNet2DConditionModel`, diffusers' `UNet2DConditionModel`, or an ExportedProgram of
        either (exported with these inputs; pass `config=` to give it a `.config`).
    passes: "default" (`passes.default_passes(device)`: DEFAULT_PASSES, plus CPU_PASSES for Inductor on CPU),
        None (no passes) or a list of pass functions.
    options: InductorOptions (None: per-device defaults).
    A number timestep becomes a float32 tensor of shape [batch] so that it stays a graph input.
    """
    check_backend(backend)
    if backend == "xla" and options is not None:
        raise ValueError("options are InductorOptions; the xla backend takes none (leave options=None)")
    options = InductorOptions() if options is None else options
    if not isinstance(options, InductorOptions):
        raise TypeError(f"options must be InductorOptions, got {type(options).__name__}")
    if not (passes is None or passes == "default" or isinstance(passes, (list, tuple))):
        raise ValueError(f"passes must be 'default', None or a list of passes, got {passes!r}")
    forward_kwargs.pop("return_dict", None)
    if passes == "default":
        import passes as graph_passes  # the parameter shadows the package's name here

        # CPU Inductor adds CPU_PASSES (linear layers as oneDNN 1x1 convolutions); XLA and CUDA do not.
        passes = list(graph_passes.DEFAULT_PASSES if backend == "xla" else graph_passes.default_passes(sample.device))
    if not torch.is_tensor(timestep):
        timestep = torch.full((sample.shape[0],), float(timestep), device=sample.device)
    kwargs = {"encoder_hidden_states": encoder_hidden_states, **forward_kwargs}
    if isinstance(unet, ExportedProgram):
        exported = unet
    else:
        from .export import export

        exported = export(unet, sample, timestep, encoder_hidden_states, **forward_kwargs)
        config = unet.config if config is None else config
    optimized, report = _run_passes(exported, passes)
    signature = Signature.from_example(sample, timestep, kwargs)
    config_dict = _config_to_dict(config)
    if backend == "xla":
        args, kw = signature.bind(sample, timestep, kwargs)
        runner = XlaRunner(optimized, args, kw)
        return CompiledUNet(runner, signature, _config_from_dict(config_dict), exported=exported,
                            optimized=optimized, passes=passes, report=report)
    resolved = options.resolve(sample.device)
    if resolved.aot:
        runner = AotRunner.compile(optimized, resolved, _metadata(signature, config_dict, resolved))
    else:
        args, kw = signature.bind(sample, timestep, kwargs)
        if resolved.channels_last:
            args = (args[0].contiguous(memory_format=torch.channels_last),) + tuple(args[1:])
        runner = JitRunner(optimized, resolved, args, kw)
    return CompiledUNet(runner, signature, _config_from_dict(config_dict), exported=exported, optimized=optimized,
                        passes=passes, report=report, options=resolved)


def _metadata(signature: Signature, config: dict | None, options: InductorOptions) -> dict[str, str]:
    doc = {"format": FORMAT, "signature": signature.to_json(), "config": config,
           "options": {k: v for k, v in dataclasses.asdict(options).items() if k != "inductor_config"},
           "torch": torch.__version__}
    return {_META_KEY: json.dumps(doc)}


def _tmp_path(path: str) -> str:
    d, base = os.path.split(os.path.abspath(path))
    # Ends in .pt2: aoti_compile_and_package refuses any other package path.
    return os.path.join(d, f".{base}.tmp-{os.getpid()}.pt2")


def save(compiled: CompiledUNet, path: str | os.PathLike) -> str:
    """Write `compiled` as one AOTInductor `.pt2` package (signature and config inside), atomically.

    An AOT-compiled UNet is copied; a jit-compiled one is compiled once more with AOTInductor (its options
    minus the jit-only ones, freezing as the device's AOT default)."""
    from .buckets import ShapeBuckets

    if isinstance(compiled, ShapeBuckets):
        return compiled.save(path)
    if not isinstance(compiled, CompiledUNet):
        raise TypeError(f"save expects a CompiledUNet or ShapeBuckets, got {type(compiled).__name__}")
    path = os.fspath(path)
    tmp = _tmp_path(path)
    try:
        runner = compiled._runner
        if runner.kind == "aot":
            shutil.copyfile(runner.package_path, tmp)
        else:
            if compiled._optimized is None:
                raise RuntimeError("this compiled UNet holds no exported program to compile ahead of time")
            opts = dataclasses.replace(compiled.options, aot=True, channels_last=None, cudagraphs=False,
                                       freezing=None).resolve(compiled.device)
            from .backends.inductor import aot_compile

            aot_compile(compiled._optimized, opts, tmp,
                        _metadata(compiled.signature, _config_to_dict(compiled.config), opts))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def load(path: str | os.PathLike):
    """Load what `save` wrote: a `.pt2` -> CompiledUNet; a bucket directory -> ShapeBuckets."""
    path = os.fspath(path)
    if os.path.isdir(path):
        from .buckets import ShapeBuckets

        return ShapeBuckets.load(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no compiled UNet at {path}")
    runner = AotRunner(path)
    meta = runner.metadata().get(_META_KEY)
    if meta is None:
        raise ValueError(f"{path} is an AOTInductor package but not one written by compiled_unet.save")
    doc = json.loads(meta)
    if doc.get("format") != FORMAT:
        raise ValueError(f"{path}: unsupported format {doc.get('format')!r}; expected {FORMAT!r}")
    opts = doc.get("options", {})
    return CompiledUNet(runner, Signature.from_json(doc["signature"]), _config_from_dict(doc["config"]),
                        options=InductorOptions(**opts))
