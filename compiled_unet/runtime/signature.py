"""The call signature of a compiled UNet graph: which inputs, their nesting, shapes, dtypes and device.

One binder for every backend: `Signature.bind(*args, **kwargs)` takes a call as the UNet's forward takes it
(positional or keyword), checks every input against what was compiled, and returns (args, kwargs) in the
exported structure. Anything that differs is a ValueError naming the input and listing what the graph
expects, so a compiled graph never silently recompiles, casts or truncates.

The timestep is the one input normalized on the way in, as the UNet itself does: a number or a one-element
tensor is broadcast to the compiled batch, and any dtype converts to the compiled dtype. Graphs compiled by
`compiled_unet.compile` take a float32 timestep (integers convert exactly), so fractional timesteps from
Euler/DPM/Heun schedulers are exact; a graph exported elsewhere with an integer timestep refuses fractional
values instead of truncating them.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Mapping

import torch
import torch.utils._pytree as pytree

from .._pytree import children

# UNet2DConditionModel.forward's arguments, in order (diffusers' and ours): positional calls map onto these.
FORWARD_ARGS = ("sample", "timestep", "encoder_hidden_states", "class_labels", "timestep_cond", "attention_mask",
                "cross_attention_kwargs", "added_cond_kwargs", "down_block_additional_residuals",
                "mid_block_additional_residual", "down_intrablock_additional_residuals", "encoder_attention_mask",
                "return_dict")
# Inputs the runtime itself supplies, never the caller: FreeU's scales lifted out of the graph's constants so
# that `enable_freeu` changes them without a recompile (see compiled_unet/compile.py).
INTERNAL_INPUTS = ("freeu_scales",)


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _path_name(path) -> str:
    """'sample', "added_cond_kwargs['text_embeds']", 'down_block_additional_residuals[2]', ..."""
    head, top, rest = path[0], path[1], path[2:]
    name = FORWARD_ARGS[top.idx] if head.idx == 0 else top.key
    return name + pytree.keystr(rest)


def _top_names(spec) -> list[str]:
    arg_spec, kw_spec = children(spec)
    return list(FORWARD_ARGS[:len(children(arg_spec))]) + list(kw_spec.context)


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


def _tuples(x):
    """Lists -> tuples, recursively (diffusers accepts either for residuals; the graph sees one)."""
    if isinstance(x, (list, tuple)):
        return tuple(_tuples(v) for v in x)
    if isinstance(x, dict):
        return {k: _tuples(v) for k, v in x.items()}
    return x


@dataclasses.dataclass(frozen=True)
class Signature:
    """The inputs a compiled graph takes: every leaf of its (args, kwargs) structure, in order."""
    leaves: tuple[Leaf, ...]
    spec: str                           # pytree treespec of (args, kwargs), serialized
    device: str

    # ----- construction
    @classmethod
    def from_call(cls, args: tuple, kwargs: Mapping[str, Any]) -> "Signature":
        """From an example call in the exported structure: (sample, timestep[, ...]), {name: value}."""
        flat, spec = pytree.tree_flatten_with_path((tuple(args), dict(kwargs)))
        leaves = tuple(Leaf(_path_name(p), tuple(v.shape), dtype_name(v.dtype)) if torch.is_tensor(v)
                       else Leaf(_path_name(p), value=v) for p, v in flat)
        return cls(leaves, pytree.treespec_dumps(spec), str(args[0].device))

    @classmethod
    def from_program(cls, program: torch.export.ExportedProgram) -> "Signature":
        """From an exported program's own example inputs (what `torch.export` traced)."""
        args, kwargs = program.example_inputs
        return cls.from_call(args, kwargs)

    # ----- reading (parsed once per signature: binding runs on every call)
    @functools.cached_property
    def treespec(self):
        return pytree.treespec_loads(self.spec)

    @functools.cached_property
    def input_names(self) -> list[str]:
        """The top-level forward arguments the graph takes (e.g. sample, timestep, encoder_hidden_states)."""
        return _top_names(self.treespec)

    @functools.cached_property
    def _by_name(self) -> dict[str, Leaf]:
        return {x.name: x for x in self.leaves}

    def leaf(self, name: str) -> Leaf | None:
        return self._by_name.get(name)

    @property
    def shapes(self) -> dict[str, tuple]:
        return {x.name: x.shape for x in self.leaves if x.is_tensor}

    def describe(self) -> str:
        return ", ".join(x.describe() for x in self.leaves
                         if x.name != "return_dict" and not x.name.startswith(INTERNAL_INPUTS))

    # ----- binding a call
    def bind(self, *args, check_finite: bool = False, **kwargs) -> tuple[tuple, dict]:
        """Validate a call (as the UNet's forward takes it) against this signature; returns (args, kwargs) in
        the exported structure. Raises ValueError naming the input when anything differs."""
        call = self._named(args, kwargs)
        top = self.input_names
        extra = sorted(k for k, v in call.items() if v is not None and k not in top)
        if extra:
            raise self._error(f"compiled without {extra}")
        for name in top:  # constant leaves left out of the call (e.g. return_dict) take the compiled value
            constant = self.leaf(name)
            if call.get(name) is None and constant is not None and not constant.is_tensor:
                call[name] = constant.value
        if "timestep" in call:
            call["timestep"] = self._timestep(call["timestep"])
        spec = self.treespec
        n_args = len(children(children(spec)[0]))
        structured = (tuple(_tuples(call.get(n)) for n in top[:n_args]), {n: _tuples(call.get(n)) for n in top[n_args:]})
        got = {_path_name(p): v for p, v in pytree.tree_flatten_with_path(structured)[0]}
        missing = [x.name for x in self.leaves if got.get(x.name) is None and x.is_tensor]
        unexpected = [n for n in got if n not in self._by_name and got[n] is not None]
        if missing or unexpected:
            raise self._error(f"inputs differ: missing {missing}, not compiled for {unexpected}")
        values = [self._check(leaf, got[leaf.name], check_finite) for leaf in self.leaves]
        bound_args, bound_kwargs = pytree.tree_unflatten(values, spec)
        return tuple(bound_args), dict(bound_kwargs)

    @staticmethod
    def _named(args: tuple, kwargs: Mapping[str, Any]) -> dict[str, Any]:
        if len(args) > len(FORWARD_ARGS):
            raise TypeError(f"a UNet call takes at most {len(FORWARD_ARGS)} positional inputs, got {len(args)}")
        call = dict(zip(FORWARD_ARGS, args))
        for k, v in kwargs.items():
            if k in call:
                raise TypeError(f"{k} given both positionally and as a keyword")
            if k not in FORWARD_ARGS and k not in INTERNAL_INPUTS:
                raise TypeError(f"unexpected input {k!r}; a UNet call takes {list(FORWARD_ARGS)}")
            call[k] = v
        return call

    def _check(self, leaf: Leaf, v, check_finite: bool):
        if not leaf.is_tensor:
            if torch.is_tensor(v) or v != leaf.value:
                shown = "a tensor" if torch.is_tensor(v) else repr(v)
                raise self._error(f"{leaf.name} is {shown} but the graph was compiled with {leaf.value!r}")
            return v
        if not torch.is_tensor(v):
            raise self._error(f"{leaf.name} must be a tensor, got {type(v).__name__}")
        if tuple(v.shape) != leaf.shape or dtype_name(v.dtype) != leaf.dtype or not _same_device(v.device, self.device):
            raise self._error(f"{leaf.name} is {list(v.shape)} {dtype_name(v.dtype)} on {v.device}; "
                              f"expected {list(leaf.shape)} {leaf.dtype} on {self.device}")
        if check_finite and v.is_floating_point() and not bool(torch.isfinite(v).all()):
            raise ValueError(f"{leaf.name} contains NaN or inf (check_finite=True); the compiled UNet would "
                             f"propagate them into its output")
        return v

    def _timestep(self, timestep):
        leaf = self.leaf("timestep")
        if leaf is None or not leaf.is_tensor or timestep is None:
            return timestep
        t = torch.as_tensor(timestep, device=self.device)
        dtype = getattr(torch, leaf.dtype)
        if not dtype.is_floating_point and t.is_floating_point() and bool((t != t.trunc()).any()):
            raise ValueError(f"timestep {t.tolist()} is fractional but this graph was exported with an integer "
                             f"timestep ({leaf.dtype}); it would be truncated. Export with a float32 timestep "
                             f"(compiled_unet.compile does)")
        if tuple(t.shape) != leaf.shape and t.numel() == 1:
            # A real copy: an expanded size-1 tensor keeps stride 0, which compiled code does not expect.
            t = t.reshape(()).expand(leaf.shape).clone(memory_format=torch.contiguous_format)
        return t.to(dtype)

    def _error(self, what: str) -> ValueError:
        return ValueError(f"compiled UNet called with other inputs than it was compiled for ({what}). "
                          f"It expects exactly: {self.describe()}. Compile again (or use shape buckets) "
                          f"for other shapes.")

    # ----- example inputs for a signature (CLI `run`, load tests): seeded, named like the leaves
    def random_inputs(self, seed: int = 0) -> tuple[tuple, dict]:
        g = torch.Generator().manual_seed(seed)
        values = []
        for leaf in self.leaves:
            if not leaf.is_tensor:
                values.append(leaf.value)
            elif leaf.name == "timestep":
                values.append(torch.full(leaf.shape, 500.0).to(getattr(torch, leaf.dtype)))
            else:
                values.append(torch.randn(leaf.shape, generator=g).to(getattr(torch, leaf.dtype)))
        return self.structure(values)

    def structure(self, values: list) -> tuple[tuple, dict]:
        """Leaf values (in order) -> (args, kwargs) of a call; constant leaves (return_dict) left out."""
        args, kwargs = pytree.tree_unflatten(list(values), self.treespec)
        return tuple(args), {k: v for k, v in kwargs.items() if k != "return_dict" and k not in INTERNAL_INPUTS}

    # ----- serialized in artifacts
    def to_json(self) -> dict:
        return {"spec": self.spec, "device": self.device,
                "leaves": [{"name": x.name, "shape": None if x.shape is None else list(x.shape), "dtype": x.dtype,
                            "value": x.value} for x in self.leaves]}

    @classmethod
    def from_json(cls, d: dict) -> "Signature":
        leaves = tuple(Leaf(x["name"], None if x["shape"] is None else tuple(x["shape"]), x["dtype"], x["value"])
                       for x in d["leaves"])
        return cls(leaves, d["spec"], d["device"])


def _same_device(device: torch.device, expected: str) -> bool:
    expected = torch.device(expected)
    if device.type != expected.type:
        return False
    # "cuda" and "cuda:0" are the same device when the current device is 0.
    return device.index == expected.index or None in (device.index, expected.index)
