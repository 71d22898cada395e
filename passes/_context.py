"""PassContext: what every pass gets besides the graph (weights, signature edits, fake values, eval)."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import operator
import re
from typing import Any, Callable

import torch
import torch.fx as fx
from torch.export.graph_signature import InputKind, InputSpec, TensorArgument

log = logging.getLogger("passes")

aten = torch.ops.aten

# Input kinds in the order torch.export lays placeholders out.
_RANK = {k: i for i, k in enumerate([InputKind.TOKEN, InputKind.PARAMETER, InputKind.BUFFER,
                                      InputKind.CONSTANT_TENSOR, InputKind.CUSTOM_OBJ, InputKind.USER_INPUT])}


@dataclasses.dataclass(frozen=True)
class OptimizeConfig:
    """Options shared by all passes.

    fold_buffers: treat persistent buffers that the graph never mutates as constants (their values may be
        folded into derived weights, e.g. FreeU's b and s buffers). False: they are runtime tensors, like
        inputs. Non-persistent buffers (not in the state dict) are always constants.
    check_operators: verify each derived FreeU operator against torch.fft in float64 when it is built.
    donate_weights: free the memory of each parameter as soon as the program stops reading it (a packed,
        fused or folded copy replaced it), by resizing its storage to zero: the caller's model shares those
        tensors and cannot run afterwards. What keeps a compile's peak near 1x the weights instead of 2x.
    """
    fold_buffers: bool = True
    check_operators: bool = True
    donate_weights: bool = False

    def __post_init__(self):
        if not all(isinstance(v, bool) for v in (self.fold_buffers, self.check_operators, self.donate_weights)):
            raise TypeError("OptimizeConfig fields are booleans")


# --------------------------------------------------------------------------------------------------
# Schema helpers: views and in-place writes, read from the op schema's alias annotations.

def is_view_op(target: Any) -> bool:
    """True for ops whose output may alias their first input (view, reshape, to, contiguous...)."""
    return isinstance(target, torch._ops.OpOverload) and _is_view_schema(target)


@functools.lru_cache(maxsize=None)
def _is_view_schema(op: torch._ops.OpOverload) -> bool:
    s = op._schema
    return bool(s.returns) and s.returns[0].alias_info is not None and not s.returns[0].alias_info.is_write


@functools.lru_cache(maxsize=None)
def _written_arg(op: torch._ops.OpOverload) -> tuple[int, str] | None:
    """(position, name) of the first argument the op writes to, or None."""
    for i, a in enumerate(op._schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            return i, a.name
    return None


def mutated_arg(node: fx.Node) -> fx.Node | None:
    """The tensor argument an in-place/out op writes to, or None."""
    if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
        return None
    w = _written_arg(node.target)
    if w is None:
        return None
    v = node.args[w[0]] if w[0] < len(node.args) else node.kwargs.get(w[1])
    return v if isinstance(v, fx.Node) else None


def view_base(node: fx.Node) -> fx.Node:
    """Follow view ops up to the tensor that owns the storage."""
    while node.op == "call_function" and is_view_op(node.target) and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def mutated_bases(graph: fx.Graph) -> dict[fx.Node, list[fx.Node]]:
    """base tensor node -> in-place nodes writing into it (directly or through views)."""
    out: dict[fx.Node, list[fx.Node]] = {}
    for n in graph.nodes:
        m = mutated_arg(n)
        if m is not None:
            out.setdefault(view_base(m), []).append(n)
    return out


def alias_closure(node: fx.Node) -> set[fx.Node]:
    """node plus every view derived from it (transitively)."""
    seen, todo = {node}, [node]
    while todo:
        for u in todo.pop().users:
            if u not in seen and u.op == "call_function" and is_view_op(u.target) and u.args and u.args[0] in seen:
                seen.add(u)
                todo.append(u)
    return seen


def writes_into(base: fx.Node) -> list[fx.Node]:
    """In-place nodes writing into base's storage (directly or through views), in graph order:
    mutated_bases(graph)[base], found from base's users without scanning the graph."""
    return sorted(u for x in alias_closure(base) for u in x.users if mutated_arg(u) is x)


def val(node: Any) -> Any:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def token_linears(graph: fx.Graph) -> list[tuple[fx.Node, fx.Node, fx.Node, Any]]:
    """(node, x, weight, bias) of every aten.linear over a 3-D floating input [batch, tokens, channels] with a 2-D
    weight: the transformer linears the CPU passes give another kernel."""
    found = []
    for node in graph.nodes:
        if node.op != "call_function" or node.target != torch.ops.aten.linear.default:
            continue
        x, w = node.args[0], node.args[1]
        b = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        xv, wv = val(x), val(w)
        if xv is not None and wv is not None and xv.ndim == 3 and wv.ndim == 2 and xv.is_floating_point():
            found.append((node, x, w, b))
    return found


def op_name(node: fx.Node) -> str:
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return str(t)
    return getattr(t, "__name__", str(t))


def _fqn_to_attr(name: str) -> str:
    return re.sub(r"[^0-9a-zA-Z_]", "_", name)


# --------------------------------------------------------------------------------------------------

class PassContext:
    """Mutable view of an ExportedProgram while passes run: graph module, input specs and tensors.

    Passes read weights through `tensor(node)`, create weights with `add_constant`/`add_parameter`,
    create nodes with `call` (which sets meta["val"]), and evaluate weight-only subgraphs with `evaluate`.
    """

    def __init__(self, gm: fx.GraphModule, input_specs: list[InputSpec], output_specs: list,
                 state_dict: dict[str, torch.Tensor], constants: dict[str, Any], fake_mode: Any,
                 config: OptimizeConfig):
        self.gm = gm
        self.input_specs = input_specs
        self.output_specs = output_specs
        self.state_dict = state_dict
        self.constants = constants
        self.fake_mode = fake_mode
        self.config = config
        self.pass_name = ""
        # Indexes of the signature, built once and kept in step by _add_input / remove_unused_inputs (the
        # only places input_specs change): placeholder name -> spec, and the spec targets.
        self._spec_of: dict[str, InputSpec] = {}
        for s in input_specs:
            self._spec_of.setdefault(getattr(s.arg, "name", None), s)
        self._targets = {s.target for s in input_specs}
        # buffers (and parameters) the program writes; passes never change an output spec's kind
        self._mutated = frozenset(s.target for s in output_specs
                                  if s.kind.name in ("BUFFER_MUTATION", "PARAMETER_MUTATION"))
        self.donated_bytes = 0  # config.donate_weights: the program's own parameter memory freed so far
        # Storages of the parameters the program came with (the caller's model's): only their memory counts as
        # donated; parameters a pass made (a fused QKV weight) are freed too, but are nobody's model.
        self._given = {t.untyped_storage().data_ptr() for t in state_dict.values()
                       if isinstance(t, torch.Tensor) and not t.is_mkldnn and t.layout == torch.strided}

    # ----- signature lookups
    def spec(self, node: fx.Node) -> InputSpec | None:
        return self._spec_of.get(node.name) if node.op == "placeholder" else None

    def fqn(self, node: fx.Node) -> str | None:
        s = self.spec(node)
        return s.target if s is not None else None

    def is_frozen(self, node: fx.Node) -> bool:
        """Placeholder whose value is fixed for the program: parameter, constant or (config) buffer."""
        s = self.spec(node)
        if s is None or s.target in self._mutated:
            return False
        if s.kind in (InputKind.PARAMETER, InputKind.CONSTANT_TENSOR):
            return True
        return s.kind == InputKind.BUFFER and (self.config.fold_buffers or s.persistent is False)

    def tensor(self, node: Any) -> torch.Tensor | None:
        """The value of a parameter/buffer/constant placeholder (None for inputs or computed nodes)."""
        if not isinstance(node, fx.Node):
            return None
        s = self.spec(node)
        if s is None or s.kind == InputKind.USER_INPUT:
            return None
        if s.kind in (InputKind.PARAMETER, InputKind.BUFFER) and s.target in self.state_dict:
            return self.state_dict[s.target]
        t = self.constants.get(s.target)  # constants, and non-persistent buffers
        return t if isinstance(t, torch.Tensor) else None

    # ----- creating weights
    def _unique_target(self, fqn: str) -> str:
        taken = lambda t: t in self.state_dict or t in self.constants or t in self._targets
        out, i = fqn, 1
        while taken(out):
            out, i = f"{fqn}_{i}", i + 1
        return out

    def _add_input(self, kind: InputKind, fqn: str, value: torch.Tensor, persistent=None) -> fx.Node:
        graph = self.gm.graph
        placeholders = graph.find_nodes(op="placeholder")
        rank = _RANK[kind]
        idx = 0  # insert after the last spec whose kind sorts at or before `kind`
        for i, s in enumerate(self.input_specs):
            if _RANK[s.kind] <= rank:
                idx = i + 1
        prefix = {InputKind.PARAMETER: "p_", InputKind.BUFFER: "b_"}.get(kind, "c_")
        name = prefix + _fqn_to_attr(fqn)
        if idx == 0:
            ctx_mgr = graph.inserting_before(placeholders[0] if placeholders else None)
        else:
            ctx_mgr = graph.inserting_after(placeholders[idx - 1])
        with ctx_mgr:
            node = graph.placeholder(name)
        node.meta["val"] = self.fake_mode.from_tensor(value, static_shapes=True) if self.fake_mode else value
        spec = InputSpec(kind=kind, arg=TensorArgument(name=node.name), target=fqn, persistent=persistent)
        self.input_specs.insert(idx, spec)
        self._spec_of[node.name] = spec
        self._targets.add(fqn)
        return node

    def add_constant(self, fqn: str, value: torch.Tensor) -> fx.Node:
        """Register `value` as a lifted constant tensor of the program and return its placeholder."""
        fqn = self._unique_target(fqn)
        self.constants[fqn] = value.detach().contiguous()
        return self._add_input(InputKind.CONSTANT_TENSOR, fqn, self.constants[fqn])

    def add_parameter(self, fqn: str, value: torch.Tensor) -> fx.Node:
        """Register `value` as a new parameter (in state_dict) and return its placeholder."""
        fqn = self._unique_target(fqn)
        self.state_dict[fqn] = torch.nn.Parameter(value.detach().contiguous(), requires_grad=False)
        return self._add_input(InputKind.PARAMETER, fqn, self.state_dict[fqn])

    def remove_unused_inputs(self) -> int:
        """Drop parameter/buffer/constant placeholders nothing reads, with their tensors."""
        dropped = [s for s in map(self._pop_unused_input, self.gm.graph.find_nodes(op="placeholder")) if s]
        if dropped:
            ids = {id(s) for s in dropped}
            self.input_specs[:] = [s for s in self.input_specs if id(s) not in ids]
        return len(dropped)

    def release(self, node: fx.Node) -> None:
        """Erase `node` if nothing reads it, and the views above it, down to the weight they read, which is
        dropped at once when unused: its memory then serves the pass's next allocation instead of waiting
        for the clean-up after the pass (prepack_onednn frees each fused QKV weight as it packs it)."""
        while node.op == "call_function" and not node.users and is_view_op(node.target):
            base = node.args[0]
            self.gm.graph.erase_node(node)
            node = base
        spec = self._pop_unused_input(node) if node.op == "placeholder" else None
        if spec is not None:
            self.input_specs[:] = [s for s in self.input_specs if s is not spec]

    def _pop_unused_input(self, node: fx.Node) -> InputSpec | None:
        """Erase an unused weight placeholder and drop its tensor; returns its spec (still in input_specs),
        or None when the node is read, a user input, or a weight the program writes."""
        s = self.spec(node)
        if node.users or s is None or s.kind in (InputKind.USER_INPUT, InputKind.TOKEN, InputKind.CUSTOM_OBJ):
            return None
        if s.target in self._mutated:
            return None
        del self._spec_of[node.name]
        self._targets.discard(s.target)
        value = self.state_dict.pop(s.target, None)
        self.constants.pop(s.target, None)
        self.gm.graph.erase_node(node)
        if self.config.donate_weights and s.kind == InputKind.PARAMETER:
            self._donate(value)
        return s

    def _donate(self, t: Any) -> None:
        """Free `t`'s memory for every holder (the caller's model too), unless a tensor the program still holds
        shares its storage. Parameters only: lifted constants stay (derive_weights re-runs the passes on them)."""
        ptr = t.untyped_storage().data_ptr() if isinstance(t, torch.Tensor) and not t.is_mkldnn \
            and t.layout == torch.strided else None
        freed = free_storage(t, keep=(*self.state_dict.values(), *self.constants.values()))
        if freed and ptr in self._given:
            self._given.discard(ptr)  # a later allocation may reuse the address
            self.donated_bytes += freed

    # ----- creating nodes
    def call(self, target: Callable, args: tuple, kwargs: dict | None = None, like: fx.Node | None = None) -> fx.Node:
        """graph.call_function at the current insert point, with meta["val"] set (and `like`'s provenance)."""
        node = self.gm.graph.call_function(target, tuple(args), dict(kwargs or {}))
        if like is not None:
            for k in ("stack_trace", "nn_module_stack", "source_fn_stack", "from_node", "custom"):
                if k in like.meta:
                    node.meta[k] = like.meta[k]
        set_fake_val(node, self.fake_mode)
        return node

    # ----- evaluation of weight-only subgraphs
    def dependencies(self, node: fx.Node, stop: set | None = None, max_nodes: int = 200,
                     at: fx.Node | None = None) -> set[fx.Node] | None:
        """Nodes that `node`'s value (as read by node `at`, default node itself) depends on, including
        in-place writes into its storage before `at` (None if more than max_nodes). `stop` nodes are leaves."""
        stop = stop or set()
        at = node if at is None else at
        writes: dict[fx.Node, list[fx.Node]] = {}  # base -> in-place writes into it (found locally, cached)
        needed: set[fx.Node] = set()
        todo = [node]
        while todo:
            n = todo.pop()
            if n in needed:
                continue
            needed.add(n)
            if len(needed) > max_nodes:
                return None
            if n in stop:
                continue
            todo.extend(n.all_input_nodes)
            base = view_base(n)
            if base not in writes:
                writes[base] = writes_into(base)
            for w in writes[base]:  # writes into n's storage before `at` (nodes compare by graph position)
                if w < at and w not in needed:
                    todo.append(w)
        return needed

    def runtime_leaves(self, node: fx.Node, at: fx.Node | None = None) -> list[fx.Node] | None:
        """Placeholders `node` (read at `at`) depends on that are not frozen (user inputs, mutable buffers)."""
        deps = self.dependencies(node, at=at)
        if deps is None:
            return None
        return [p for p in deps if p.op == "placeholder" and not self.is_frozen(p)]

    def evaluate(self, node: fx.Node, overrides: dict[fx.Node, Any] | None = None,
                 max_nodes: int = 200, at: fx.Node | None = None, may_alias: bool = False) -> torch.Tensor | None:
        """Compute `node` from frozen tensors only (replaying in-place writes before it); None if it
        depends on a user input, a non-frozen buffer, a random op, or more than max_nodes nodes.
        `at`: the node reading the value (in-place writes before it count), default `node` itself.
        may_alias: the result may be a view of a weight (for a caller that reads it at once and keeps only
        what it derives), else a result that is a view of a weight comes back as a copy."""
        overrides = overrides or {}
        needed = self.dependencies(node, set(overrides), max_nodes, at)
        if needed is None:
            return None
        for n in needed:
            if n in overrides:
                continue
            if n.op == "placeholder" and not self.is_frozen(n):
                return None
            if n.op not in ("placeholder", "call_function"):
                return None
            if n.op == "call_function" and isinstance(n.target, torch._ops.OpOverload):
                if n.target._schema.is_mutable and mutated_arg(n) is None:
                    return None
                if torch.Tag.nondeterministic_seeded in n.target.tags:
                    return None
        # Only weights that a replayed in-place write changes are cloned: a clone of every weight read
        # (e.g. each conv weight prepack_onednn packs) doubles the passes' transient memory for nothing.
        written = {view_base(mutated_arg(n)) for n in needed if mutated_arg(n) is not None}
        env: dict[fx.Node, Any] = {}
        for n in sorted(needed):  # graph order
            if n in overrides:
                env[n] = overrides[n]
            elif n.op == "placeholder":
                env[n] = self.tensor(n).detach().clone() if n in written else self.tensor(n).detach()
            else:
                args = fx.map_arg(n.args, env.__getitem__)
                kwargs = fx.map_arg(n.kwargs, env.__getitem__)
                try:
                    env[n] = n.target(*args, **kwargs)
                except Exception as e:  # a weight-only subgraph that does not run is not folded
                    log.debug("evaluate %s failed: %s", n, e)
                    return None
        out = env[node]
        if not isinstance(out, torch.Tensor):
            return None
        if may_alias or out.layout != torch.strided:
            return out
        # What a pass keeps must not change when the model's weights are later written in place.
        weights = {_storage(self.tensor(n)) for n in needed
                   if n.op == "placeholder" and n not in overrides and n not in written}
        return out.clone() if _storage(out) in weights else out


def _storage(t: torch.Tensor) -> int | None:
    return t.untyped_storage().data_ptr() if t.layout == torch.strided else None


def set_fake_val(node: fx.Node, fake_mode: Any) -> None:
    """node.meta['val'] from running its op on its inputs' fake values."""
    args = fx.map_arg(node.args, lambda n: n.meta.get("val"))
    kwargs = fx.map_arg(node.kwargs, lambda n: n.meta.get("val"))
    if node.target is operator.getitem:
        node.meta["val"] = args[0][args[1]]
        return
    with (fake_mode if fake_mode is not None else contextlib.nullcontext()):
        node.meta["val"] = node.target(*args, **kwargs)


def only_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def free_storage(t: Any, keep=()) -> int:
    """Free the memory of `t`'s storage for every tensor that views it (resized to zero bytes), unless one of the
    tensors in `keep` shares it or the memory is not torch's to free; returns the bytes freed. For donated weights
    (`donate_weights=True`) only: any other holder of that storage, the caller's model included, is left with an
    empty tensor. Opaque (oneDNN) tensors are not freed here; they go when their last reference does."""
    if not isinstance(t, torch.Tensor) or t.is_mkldnn or t.layout != torch.strided:
        return 0
    storage = t.untyped_storage()
    if storage.nbytes() == 0 or not storage.resizable():  # not resizable: memory torch does not own (numpy, a file)
        return 0
    ptr = storage.data_ptr()
    for held in keep:
        if isinstance(held, torch.Tensor) and not held.is_mkldnn and held.layout == torch.strided \
                and held.untyped_storage().data_ptr() == ptr:
            return 0
    nbytes = storage.nbytes()
    storage.resize_(0)
    return nbytes
