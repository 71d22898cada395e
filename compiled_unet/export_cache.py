"""The exported graph of our UNet, kept on disk: a second process skips `torch.export` (SD1.5: ~1.5 s of a ~6.5 s
warm compile; benchmarks/NOTES.md).

    key = export_cache.key(unet, args, kwargs)        # None (with the reason logged) when it cannot be described
    program = export_cache.load(key, unet, args, kwargs) or export(...)
    export_cache.store(key, program)

What is stored is the graph only (nodes, their metadata, the program's signature); the weights are the UNet's
own tensors, attached on load by name exactly as export attaches them. The key describes everything the traced
graph depends on; anything it cannot describe makes the UNet uncacheable (exported every time), never a guess:
- this library's source files, torch's and Python's versions;
- every submodule: its class, each attribute (configs, processors and other library objects field by field),
  each parameter's and buffer's name, shape, dtype and device; hooks, a class outside this library and
  torch.nn, a method replaced on a class or an instance, or an attribute of a type it does not know refuse;
- the example inputs' structure, shapes, strides, dtypes and devices, and their non-tensor values;
- global state tracing reads: default dtype, autocast, deterministic algorithms, inference mode, active
  torch function / dispatch modes (any active mode refuses).
Not covered: torch's own functions replaced process-wide by the caller (`torch.nn.functional.x = ...`);
such a process should pass `compile(..., export_cache=False)` or set COMPILED_UNET_EXPORT_CACHE=0.

Entries live in Inductor's cache folder (`compile(cache_dir=...)` or TORCHINDUCTOR_CACHE_DIR), so the folder that
makes another machine's compile warm carries them too; the least recently used go beyond MAX_ENTRIES. A file is
written atomically and checked on load (a checksum, then an unpickler that can build only graph pieces: operators
by name, dtypes, signature and pytree classes): a damaged or foreign entry is a miss (logged, exported again,
overwritten), never a wrong graph and never code of the file's choosing.
"""
from __future__ import annotations

import contextlib
import enum
import functools
import hashlib
import io
import logging
import os
import pickle
import sys
import types

import torch
import torch.fx as fx
from torch.export import ExportedProgram
from torch.export.graph_signature import InputKind

from . import _lru
from ._atomic import write_atomic
from ._source import source_digest

log = logging.getLogger("compiled_unet.export_cache")

FORMAT = b"compiled_unet.export/1\n"
# torch's compile counters (`torch._dynamo.utils.counters`): counters["compiled_unet"]["export_cache_hit"] etc.
COUNTERS = "compiled_unet"
FOLDER = "compiled_unet_export"
MAX_ENTRIES = 256  # ~2 MB each for SD1.5: the least recently used go beyond this (a library upgrade re-keys them all)
_DIGEST_LEN = 32  # sha256 of the payload, after FORMAT


class NotCacheable(Exception):
    """The UNet, its inputs or the process's state hold something the key cannot describe."""


def enabled() -> bool:
    return os.environ.get("COMPILED_UNET_EXPORT_CACHE", "1") != "0"


def folder() -> str:
    from torch._inductor.runtime.cache_dir_utils import cache_dir

    return os.path.join(cache_dir(), FOLDER)


# -- the key -------------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _code_version() -> str:
    """This library's source (every .py file of the package), torch's and Python's versions."""
    root = os.path.dirname(os.path.abspath(__file__))
    return f"{source_digest(root)} torch {torch.__version__} python {sys.version_info[:3]}"


_OURS = __name__.rpartition(".")[0] + "."          # "compiled_unet."
_KNOWN_MODULES = (_OURS, "torch.nn.")
_SIMPLE = (type(None), bool, int, float, complex, str, bytes, torch.dtype, torch.device, torch.layout,
           torch.memory_format, torch.Size)
# Module attributes that are not inputs of the trace (export forces eval(); hooks are checked separately).
_SKIPPED_ATTRS = {"training", "_parameters", "_buffers", "_modules", "_non_persistent_buffers_set",
                  "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
                  "_load_state_dict_post_hooks", "_is_full_backward_hook"}
_HOOK_ATTRS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called")


def _is_ours(obj) -> bool:
    return getattr(obj, "__module__", "").startswith(_KNOWN_MODULES)


def _check_class(cls: type, where: str) -> None:
    """Refuse a class from elsewhere, or one of whose methods was replaced after import."""
    if not _is_ours(cls):
        raise NotCacheable(f"{where}: {cls.__module__}.{cls.__qualname__} is not a class of compiled_unet or torch.nn")
    for klass in cls.__mro__:
        if klass is object or not _is_ours(klass):
            continue
        for name, value in vars(klass).items():
            fn = value.__func__ if isinstance(value, (staticmethod, classmethod)) else value
            if isinstance(fn, types.FunctionType) and fn.__module__ != klass.__module__:
                raise NotCacheable(f"{klass.__qualname__}.{name} was replaced ({fn.__module__}.{fn.__qualname__})")


def _class_data(cls: type) -> tuple:
    """The class-level data attributes of a library class and its library bases (a forward reading `self.flag`
    reads the class's value when the instance has none): described like instance attributes."""
    out = []
    for klass in cls.__mro__:
        if not klass.__module__.startswith(_OURS):
            continue
        for name, value in sorted(vars(klass).items()):
            if name.startswith("__") or callable(value) or isinstance(value, (property, staticmethod, classmethod,
                                                                                types.MemberDescriptorType)):
                continue
            out.append((klass.__qualname__, name, _describe(value, f"{klass.__qualname__}.{name}")))
    return tuple(out)


def _describe(value, where: str, depth: int = 0):
    """A hashable, process-independent description of an attribute's value, or NotCacheable."""
    if depth > 8:
        raise NotCacheable(f"{where}: nested too deep")
    if isinstance(value, torch.Tensor):
        if value.numel() > 1 << 16 or value.is_meta or value.layout != torch.strided:
            raise NotCacheable(f"{where}: a tensor attribute that is not a parameter or buffer")
        data = value.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        return ("tensor", str(value.dtype), tuple(value.shape), str(value.device), hashlib.sha256(data).hexdigest())
    if isinstance(value, _SIMPLE):
        return (type(value).__name__, repr(value))
    if isinstance(value, enum.Enum):
        _check_class(type(value), where)
        return ("enum", type(value).__qualname__, value.name)
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, tuple(_describe(v, f"{where}[{i}]", depth + 1) for i, v in enumerate(value)))
    if isinstance(value, (set, frozenset)):
        return (type(value).__name__, tuple(sorted(repr(_describe(v, where, depth + 1)) for v in value)))
    if isinstance(value, dict):
        if type(value) is not dict and not _is_ours(type(value)) and type(value).__module__ != "collections":
            raise NotCacheable(f"{where}: a {type(value).__qualname__}")
        return ("dict", type(value).__qualname__,
                tuple((repr(k), _describe(v, f"{where}[{k!r}]", depth + 1)) for k, v in value.items()))
    if isinstance(value, (types.FunctionType, types.BuiltinFunctionType)):
        module, name = getattr(value, "__module__", None) or "", getattr(value, "__qualname__", "")
        if not module.startswith((_OURS, "torch.")) or _resolve(module, name) is not value:
            raise NotCacheable(f"{where}: the function {module}.{name}, not one of compiled_unet's or torch's own")
        return ("function", module, name)
    if isinstance(value, type):
        _check_class(value, where)
        return ("class", value.__module__, value.__qualname__)
    if isinstance(value, torch.nn.Module):  # a module held outside _modules (e.g. a shared reference)
        raise NotCacheable(f"{where}: a module held as a plain attribute")
    cls = type(value)
    _check_class(cls, where)
    state = getattr(value, "__dict__", None)
    if state is None:
        raise NotCacheable(f"{where}: a {cls.__qualname__} without attributes to describe")
    return ("object", cls.__module__, cls.__qualname__,
            tuple((k, _describe(v, f"{where}.{k}", depth + 1)) for k, v in sorted(state.items())))


def _describe_module(name: str, module: torch.nn.Module) -> tuple:
    where = name or "the UNet"
    _check_class(type(module), where)
    for attr in _HOOK_ATTRS:
        if getattr(module, attr, None):
            raise NotCacheable(f"{where} has {attr.strip('_').replace('_', ' ')}")
    if getattr(module, "_compiled_call_impl", None) is not None:
        raise NotCacheable(f"{where} was torch.compile'd in place")
    attrs = []
    for k, v in sorted(vars(module).items()):
        if k in _SKIPPED_ATTRS or k in _HOOK_ATTRS or k == "_compiled_call_impl":
            continue
        if k in ("forward", "__call__") or isinstance(v, types.MethodType):
            raise NotCacheable(f"{where}.{k}: a method set on the instance")
        attrs.append((k, _describe(v, f"{where}.{k}")))
    tensors = tuple((kind, k, None if t is None else (str(t.dtype), tuple(t.shape), str(t.device), t.layout == torch.strided))
                    for kind, d in (("p", module._parameters), ("b", module._buffers)) for k, t in d.items())
    return (name, _class_data(type(module)), tuple(attrs), tensors, tuple(sorted(module._non_persistent_buffers_set)),
            tuple(module._modules))


def _resolve(module: str, qualname: str):
    obj = sys.modules.get(module)
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
    return obj


# Functions of this library's modules and of the torch namespaces its model code calls, as they were when
# compiled_unet was imported: one replaced since (`compiled_unet.processors._split_heads = f`,
# `torch.nn.functional.silu = f`, `torch.Tensor.view = f`) makes the UNet uncacheable.
_TORCH_NAMESPACES = ("torch", "torch.nn.functional", "torch.Tensor")
_NAMESPACES: dict[str, dict[str, object]] = {}


def _namespace(name: str):
    return torch.Tensor if name == "torch.Tensor" else sys.modules.get(name)


def remember_namespaces() -> None:
    """Snapshot the functions of every loaded compiled_unet module (and torch's namespaces) not seen yet."""
    for name in [n for n in list(sys.modules) if n.startswith(_OURS)] + list(_TORCH_NAMESPACES):
        space = _namespace(name)
        if name in _NAMESPACES or space is None or name == __name__:
            continue
        _NAMESPACES[name] = _watched(space)


def _watched(space) -> dict[str, object]:
    """The functions of a namespace, and for a library module also its public data (constants such as block
    tables): rebinding any of them since import makes the UNet uncacheable."""
    ours = isinstance(space, types.ModuleType) and space.__name__.startswith(_OURS)
    return {k: v for k, v in vars(space).items() if not k.startswith("__") and not isinstance(v, types.ModuleType)
            and ((callable(v) and not isinstance(v, type)) or (ours and not k.startswith("_")))}


def _shared_tensors(unet: torch.nn.Module) -> tuple:
    """(name, the first name of the same tensor) for each tied parameter or buffer: export gives a tied tensor one
    input, so two UNets that differ only in what is tied have different graphs."""
    first: dict[int, str] = {}
    tied = []
    for name, t in [*unet.named_parameters(remove_duplicate=False), *unet.named_buffers(remove_duplicate=False)]:
        if first.setdefault(id(t), name) != name:
            tied.append((name, first[id(t)]))
    return tuple(tied)


def process_refusal() -> str | None:
    """Why a key over this library's source cannot be trusted in this process (one of its functions or torch's
    rebound since import, global hooks, an active torch function mode), or None. The package cache's key of a
    compile's passes asks it too (backends/package_cache.py)."""
    try:
        _describe_globals()
    except NotCacheable as e:
        return str(e)
    return None


def _describe_globals() -> tuple:
    from torch.nn.modules import module as nn_module

    for hooks in ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                  "_global_backward_pre_hooks", "_global_forward_hooks_always_called"):
        if getattr(nn_module, hooks, None):
            raise NotCacheable(f"global module hooks are registered ({hooks})")
    if torch._C._len_torch_function_stack() or torch._C._len_torch_dispatch_stack():
        raise NotCacheable("a torch function or dispatch mode is active")
    for name in [n for n in sys.modules if n.startswith(_OURS) and n != __name__] + list(_TORCH_NAMESPACES):
        if name not in _NAMESPACES:
            remember_namespaces()
        remembered, space = _NAMESPACES.get(name, {}), _namespace(name)
        for attr, value in remembered.items():
            if getattr(space, attr, None) is not value:
                raise NotCacheable(f"{name}.{attr} was replaced after compiled_unet was imported")
        if name == "torch.Tensor" and _watched(space).keys() - remembered.keys():  # a method added over a base's
            raise NotCacheable(f"torch.Tensor gained {sorted(_watched(space).keys() - remembered.keys())}")
    autocast = tuple((d, torch.is_autocast_enabled(d), str(torch.get_autocast_dtype(d))) for d in ("cpu", "cuda"))
    return (str(torch.get_default_dtype()), autocast, torch.are_deterministic_algorithms_enabled(),
            torch.is_inference_mode_enabled(), torch.is_grad_enabled())


def _describe_inputs(args, kwargs) -> tuple:
    import torch.utils._pytree as pytree

    leaves, spec = pytree.tree_flatten((args, kwargs))
    out = []
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, torch.Tensor):
            out.append(("tensor", str(leaf.dtype), tuple(leaf.shape), tuple(leaf.stride()), str(leaf.device),
                        leaf.storage_offset(), type(leaf).__name__))
        else:
            out.append(_describe(leaf, f"input {i}"))
    return str(spec), tuple(out)


def key(unet: torch.nn.Module, args: tuple, kwargs: dict) -> str | None:
    """The cache key of exporting `unet` on (args, kwargs), or None (why: logged) when it cannot be described."""
    if not enabled():
        return None
    try:
        described = (_code_version(), _describe_globals(), _describe_inputs(args, kwargs),
                     tuple(_describe_module(n, m) for n, m in unet.named_modules(remove_duplicate=False)),
                     _shared_tensors(unet))
    except NotCacheable as e:
        log.info("export cache: not used for this UNet (%s)", e)
        _count("uncacheable")
        return None
    return hashlib.sha256(repr(described).encode()).hexdigest()[:40]


def _count(what: str) -> None:
    from torch._dynamo.utils import counters

    counters[COUNTERS][f"export_cache_{what}"] += 1


# -- the entry -----------------------------------------------------------------------------------------------------

def _op_from(namespace: str, name: str, overload: str) -> torch._ops.OpOverload:
    """An operator overload by name (`torch.ops.aten.conv2d.default`); anything else is refused."""
    if not all(isinstance(p, str) and p.isidentifier() and not p.startswith("__") for p in (namespace, name, overload)):
        raise pickle.UnpicklingError(f"not an operator name: {namespace!r}.{name!r}.{overload!r}")
    op = getattr(getattr(getattr(torch.ops, namespace), name), overload)
    if not isinstance(op, torch._ops.OpOverload):
        raise pickle.UnpicklingError(f"torch.ops.{namespace}.{name}.{overload} is not an operator overload")
    return op


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, fx.Node):
            return ("node", obj.name)
        if isinstance(obj, torch._subclasses.fake_tensor.FakeTensor):
            return ("fake", tuple(obj.shape), tuple(obj.stride()), obj.dtype, str(obj.device), obj.storage_offset())
        if isinstance(obj, torch.Tensor):
            raise NotCacheable("a real tensor in the graph's metadata")
        return None

    def reducer_override(self, obj):
        if isinstance(obj, torch._ops.OpOverload):
            return _op_from, (obj.namespace, obj._opname, obj._overloadname)
        return NotImplemented


# What an entry may name: graph pieces, nothing that runs code on load. Functions by name; from the modules, classes
# only (signatures, pytree specs, immutable containers: constructing one runs no code of the file's choosing).
_ALLOWED = {("builtins", n) for n in ("tuple", "list", "dict", "set", "frozenset", "slice", "complex")} | {
    (__name__, "_op_from"), ("_operator", "getitem"), ("operator", "getitem"), ("collections", "OrderedDict"),
    ("torch", "Size"), ("torch", "device"), ("torch.serialization", "_get_layout"),
    ("torch.fx.passes.shape_prop", "TensorMetadata"),
}
_CLASS_MODULES = ("torch.export.graph_signature", "torch.export.exported_program", "torch.utils._pytree",
                  "torch.fx.immutable_collections")


def _is_torch_enum(module: str, name: str) -> bool:
    """A dtype, layout or memory format (pickled by name)."""
    if module not in ("torch", "torch._utils"):
        return False
    value = getattr(torch, name.removeprefix("torch."), None)
    return isinstance(value, (torch.dtype, torch.layout, torch.memory_format))


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, mode):
        super().__init__(file)
        self._mode = mode

    def find_class(self, module, name):
        if (module, name) in _ALLOWED or _is_torch_enum(module, name):
            return super().find_class(module, name)
        if module in _CLASS_MODULES and "." not in name and isinstance(getattr(sys.modules.get(module), name, None), type):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"an export cache entry names {module}.{name}")

    def persistent_load(self, pid):
        if pid[0] == "node":
            return _NodeRef(pid[1])
        if pid[0] == "fake":
            shape, stride, dtype, device, offset = pid[1:]
            with self._mode:
                t = torch.empty_strided(shape, stride, dtype=dtype, device=device)
                return t.as_strided(shape, stride, offset) if offset else t
        raise pickle.UnpicklingError(f"unknown reference {pid[0]!r}")


class _NodeRef(str):
    """A reference to an earlier node, by name, until the graph is rebuilt."""


def _entry_path(k: str) -> str:
    return os.path.join(folder(), k + ".pkl")


def store(k: str | None, program: ExportedProgram) -> None:
    """Write the graph of `program` under key `k` (atomically); nothing when `k` is None or the graph holds
    something the entry cannot name (logged)."""
    if k is None:
        return
    try:
        payload = _dumps(program)
    except Exception as e:  # noqa: BLE001 - a graph the entry cannot hold is simply not stored; the compile goes on
        log.info("export cache: not stored (%s: %s)", type(e).__name__, e)
        return
    try:
        _lru.prune(folder(), ".pkl", MAX_ENTRIES, incoming_bytes=len(payload))
        write_atomic(_entry_path(k), FORMAT + hashlib.sha256(payload).digest() + payload)
        _count("stored")
    except OSError as e:
        log.warning("export cache: could not write %s (%s)", _entry_path(k), e)


def _dumps(program: ExportedProgram) -> bytes:
    if program.range_constraints:
        raise NotCacheable("dynamic shapes")
    sig = program.graph_signature
    if any(s.kind in (InputKind.CUSTOM_OBJ, InputKind.TOKEN) for s in sig.input_specs):
        raise NotCacheable("custom objects or effect tokens")
    constants = {}
    for s in sig.input_specs:
        if s.kind == InputKind.CONSTANT_TENSOR:
            constants[s.target] = program.constants[s.target]
    if sum(t.numel() * t.element_size() for t in constants.values()) > 1 << 24:
        raise NotCacheable("large lifted constants")
    gm = program.graph_module
    if any(n.op in ("get_attr", "call_module") for n in gm.graph.nodes) or list(gm.children()):
        raise NotCacheable("submodules or attributes in the graph")
    nodes = [(n.name, n.op, n.target, n.args, n.kwargs, dict(n.meta)) for n in gm.graph.nodes]
    buf = io.BytesIO()
    constants_bytes = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in constants.items()}, constants_bytes)
    _Pickler(buf, protocol=4).dump({
        "nodes": nodes, "signature": sig, "module_call_graph": program.module_call_graph,
        "graph_meta": {k: v for k, v in gm.meta.items() if k == "inline_constraints" and not v},
        "constants": constants_bytes.getvalue(),
        "constant_devices": {k: str(v.device) for k, v in constants.items()},
    })
    return buf.getvalue()


def load(k: str | None, unet: torch.nn.Module, args: tuple, kwargs: dict) -> ExportedProgram | None:
    """The program stored under `k` with `unet`'s own weights and (args, kwargs) as its example inputs;
    None when there is no usable entry (a damaged one is logged and ignored)."""
    if k is None:
        return None
    path = _entry_path(k)
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        _count("miss")
        return None
    except OSError as e:
        log.warning("export cache: cannot read %s (%s)", path, e)
        return None
    try:
        program = _loads(data, unet, args, kwargs)
    except Exception as e:  # any failure to rebuild is a miss: the caller exports instead
        log.warning("export cache: ignoring the damaged entry %s (%s: %s)", path, type(e).__name__, e)
        _count("damaged")
        return None
    _count("hit")
    with contextlib.suppress(OSError):
        os.utime(path)  # recently used: kept by _lru.prune
    return program


def _loads(data: bytes, unet, args, kwargs) -> ExportedProgram:
    from torch._export.verifier import TrainingIRVerifier
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.fx.experimental.symbolic_shapes import ShapeEnv

    head = len(FORMAT)
    if data[:head] != FORMAT or hashlib.sha256(data[head + _DIGEST_LEN:]).digest() != data[head:head + _DIGEST_LEN]:
        raise ValueError("wrong format or checksum")
    mode = FakeTensorMode(shape_env=ShapeEnv(), allow_non_fake_inputs=True, export=True)
    entry = _Unpickler(io.BytesIO(data[head + _DIGEST_LEN:]), mode).load()
    graph = fx.Graph()
    nodes: dict[str, fx.Node] = {}

    def resolve(a):
        return nodes[a] if isinstance(a, _NodeRef) else a

    for name, op, target, node_args, node_kwargs, meta in entry["nodes"]:
        node = graph.create_node(op, target, fx.node.map_aggregate(node_args, resolve),
                                 fx.node.map_aggregate(node_kwargs, resolve), name=name)
        if node.name != name:
            raise ValueError(f"node {name!r} came back as {node.name!r}")
        node.meta = meta
        nodes[name] = node
    sig = entry["signature"]
    params, buffers = dict(unet.named_parameters(remove_duplicate=False)), dict(unet.named_buffers(remove_duplicate=False))
    constants = torch.load(io.BytesIO(entry["constants"]), weights_only=True) if entry["constants"] else {}
    constants = {k: v.to(entry["constant_devices"][k]) for k, v in constants.items()}
    state_dict = {}
    for s in sig.input_specs:
        if s.kind == InputKind.PARAMETER:
            state_dict[s.target] = params[s.target]
        elif s.kind == InputKind.BUFFER:
            (state_dict if s.persistent else constants)[s.target] = buffers[s.target]
        elif s.kind == InputKind.CONSTANT_TENSOR:
            if s.target not in constants:
                raise ValueError(f"the constant {s.target} is missing")
    # root {}: the program makes the graph's module (and its code) itself; a module made here for the graph's
    # metadata cost one more code generation (~0.05 s for SD1.5)
    ep = ExportedProgram(root={}, graph=graph, graph_signature=sig, state_dict=state_dict, range_constraints={},
                         module_call_graph=entry["module_call_graph"], example_inputs=(args, kwargs),
                         constants=constants, verifiers=[TrainingIRVerifier])
    ep.graph_module.meta.update(entry["graph_meta"])
    return ep
