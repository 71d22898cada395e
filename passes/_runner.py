"""Pass manager: runs passes on a copy of an ExportedProgram, cleans up after each, reports counts."""
from __future__ import annotations

import collections
import copy
import dataclasses
import logging
import time
from typing import Callable, Sequence

import torch
import torch.fx as fx
from torch.export import ExportedProgram
from torch.export.graph_signature import ExportGraphSignature, TensorArgument

from ._context import OptimizeConfig, PassContext, is_view_op, mutated_arg, op_name, set_fake_val, view_base

log = logging.getLogger("passes")

PassFn = Callable[[fx.GraphModule, PassContext], int]


def with_weights(ep: ExportedProgram, tensors: dict[str, torch.Tensor]) -> ExportedProgram:
    """`ep` (graph shared) with the weights or constants named in `tensors` replaced: parameters stay
    parameters. A name that is neither is a KeyError: a caller replacing weights must not lose one."""
    state_dict, constants = dict(ep.state_dict), dict(ep.constants)
    for name, value in tensors.items():
        if name in state_dict:
            old = state_dict[name]
            state_dict[name] = (torch.nn.Parameter(value, requires_grad=False)
                                if isinstance(old, torch.nn.Parameter) else value)
        elif name in constants:
            constants[name] = value
        else:
            raise KeyError(f"{name!r} is neither a weight nor a constant of the program")
    return ExportedProgram(
        root=ep.graph_module, graph=ep.graph, graph_signature=ep.graph_signature, state_dict=state_dict,
        range_constraints=ep.range_constraints, module_call_graph=ep.module_call_graph,
        example_inputs=ep.example_inputs, constants=constants, verifiers=ep.verifiers)


def pass_name(p: PassFn) -> str:
    return getattr(p, "name", None) or getattr(p, "__name__", None) or type(p).__name__


def op_counts(graph: fx.Graph) -> collections.Counter:
    return collections.Counter(op_name(n) for n in graph.nodes if n.op == "call_function")


@dataclasses.dataclass
class PassStat:
    name: str
    rewrites: int
    nodes_after: int
    ops_after: collections.Counter
    seconds: float


@dataclasses.dataclass
class PassReport:
    """What `optimize` did: rewrites per pass, node and op counts before/after (see `table()`)."""
    nodes_before: int
    ops_before: collections.Counter
    stats: list[PassStat] = dataclasses.field(default_factory=list)
    donated_bytes: int = 0  # OptimizeConfig(donate_weights=True): the program's own parameter memory the passes freed

    @property
    def rewrites(self) -> dict[str, int]:
        return {s.name: s.rewrites for s in self.stats}

    @property
    def nodes_after(self) -> int:
        return self.stats[-1].nodes_after if self.stats else self.nodes_before

    @property
    def ops_after(self) -> collections.Counter:
        return self.stats[-1].ops_after if self.stats else self.ops_before

    def __getitem__(self, name: str) -> int:
        return self.rewrites[name]

    def table(self, ops: Sequence[str] | None = None) -> str:
        """One row per pass: rewrites, graph nodes after it, and counts of the `ops` that changed."""
        if ops is None:
            keys = set(self.ops_before) | set(self.ops_after)
            ops = sorted(k for k in keys if self.ops_before.get(k, 0) != self.ops_after.get(k, 0))
        short = [o.replace("aten.", "").replace(".default", "") for o in ops]
        head = ["pass", "rewrites", "nodes"] + short
        rows = [["(exported)", "", str(self.nodes_before)] + [str(self.ops_before.get(o, 0)) for o in ops]]
        for s in self.stats:
            rows.append([s.name, str(s.rewrites), str(s.nodes_after)] + [str(s.ops_after.get(o, 0)) for o in ops])
        widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
        fmt = lambda r: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
        return "\n".join([fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])

    def __str__(self) -> str:
        return self.table()

    def to_json(self) -> dict:
        """What an artifact records of the passes that made its graph: rewrites, node and op counts. Not the
        seconds or donated bytes, which describe one compile, not the graph (the same program, the same record)."""
        return {"nodes_before": self.nodes_before, "ops_before": dict(self.ops_before),
                "stats": [{"name": s.name, "rewrites": s.rewrites, "nodes_after": s.nodes_after,
                           "ops_after": dict(s.ops_after)} for s in self.stats]}

    @classmethod
    def from_json(cls, d: dict) -> "PassReport":
        """The report `to_json` recorded (each pass's seconds read as 0.0: not recorded). ValueError if damaged."""
        try:
            return cls(int(d["nodes_before"]), collections.Counter({str(k): int(v) for k, v in d["ops_before"].items()}),
                       [PassStat(str(s["name"]), int(s["rewrites"]), int(s["nodes_after"]),
                                 collections.Counter({str(k): int(v) for k, v in s["ops_after"].items()}), 0.0)
                        for s in d["stats"]])
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ValueError(f"damaged pass report ({type(e).__name__}: {e})") from None


# --------------------------------------------------------------------------------------------------

def lazy_graph_module(root, graph: fx.Graph) -> fx.GraphModule:
    """`fx.GraphModule(root, graph)` whose Python code is generated when something needs it (a call, `.code`,
    printing, pickling), not at construction and not at each `recompile()`.

    Why: generating and compiling the code of SD1.5's graph (~2200 nodes) takes ~0.05 s, and a compile made
    the code of graphs nobody ran or read ten times: the pass runner's copy, its recompile, the jit runner's
    module, the pruning of its inputs, AOTAutograd's placeholder renaming (twice): ~0.3-0.5 s of a 5-7 s warm
    compile (benchmarks/NOTES.md). torch's Inductor uses the same class for its own graphs."""
    try:
        from torch.fx._lazy_graph_module import _LazyGraphModule
    except ImportError:  # not in this torch: code made eagerly
        return fx.GraphModule(root, graph)
    return _LazyGraphModule(root, graph)


def _copy_graph_module(ep: ExportedProgram) -> tuple[fx.GraphModule, dict[str, str]]:
    """Copy of the program's graph module (node meta copied shallowly: fake values are shared), and the
    renames graph_copy made (old name -> new name)."""
    graph = fx.Graph()
    env: dict = {}
    out = graph.graph_copy(ep.graph, env)
    graph.output(out)
    gm = lazy_graph_module(ep.graph_module, graph)
    gm.meta.update(ep.graph_module.meta)
    return gm, {old.name: new.name for old, new in env.items() if old.name != new.name}


def _renamed(spec, renames: dict[str, str]):
    spec = copy.copy(spec)
    name = getattr(spec.arg, "name", None)
    if name in renames and isinstance(spec.arg, TensorArgument):
        spec.arg = TensorArgument(name=renames[name])
    return spec


def remove_dead_writes(graph: fx.Graph) -> int:
    """Erase in-place writes into temporaries that nothing reads afterwards (DCE keeps them as impure)."""
    writes = [n for n in graph.nodes if mutated_arg(n) is not None]  # graph order
    erased: set[fx.Node] = set()
    changed = True
    while changed:
        changed = False
        for n in reversed(writes):
            if n.users:
                continue
            base = view_base(mutated_arg(n))
            if base.op != "call_function":
                continue  # writes into inputs or buffers are program effects
            if _readers(base) <= {n}:
                graph.erase_node(n)
                erased.add(n)
                changed = True
        writes = [n for n in writes if n not in erased]
    return len(erased)


def _readers(base: fx.Node) -> set[fx.Node]:
    """Non-view users of base or of any view of it."""
    out, todo, seen = set(), [base], {base}
    while todo:
        x = todo.pop()
        for u in x.users:
            if u.op == "call_function" and is_view_op(u.target) and u.args and u.args[0] is x:
                if u not in seen:
                    seen.add(u)
                    todo.append(u)
            else:
                out.add(u)
    return out


def _has_effect(node: fx.Node) -> bool:
    """What dead code elimination keeps even when unused: all but call_function nodes, in-place writes and
    side-effectful ops. Unlike Node.is_impure, unused random ops go (SDPA is tagged nondeterministic_seeded
    for its dropout)."""
    if node.op != "call_function":
        return True
    t = node.target
    if isinstance(t, torch._ops.OpOverload):
        return t._schema.is_mutable or t in fx.node._side_effectful_functions or mutated_arg(node) is not None
    return node.is_impure()


def _sync_output_specs(gm: fx.GraphModule, ctx: PassContext) -> None:
    """Output specs name the nodes they return: follow replacements of those nodes."""
    out = gm.graph.output_node()
    flat = out.args[0] if isinstance(out.args[0], (tuple, list)) else (out.args[0],)
    for spec, node in zip(ctx.output_specs, flat):
        if isinstance(node, fx.Node) and isinstance(spec.arg, TensorArgument) and spec.arg.name != node.name:
            spec.arg = TensorArgument(name=node.name)


def cleanup(gm: fx.GraphModule, ctx: PassContext, recompile: bool = True) -> None:
    """Shared clean-up after every pass: dead writes and code, unused weights, vals, lint, recompile.
    recompile=False leaves gm's Python code stale (`optimize` regenerates it once, after the last pass:
    on SD1.5 each regeneration costs ~0.3 s, and passes read the graph, never gm.code)."""
    remove_dead_writes(gm.graph)
    gm.graph.eliminate_dead_code(is_impure_node=_has_effect)
    ctx.remove_unused_inputs()
    _sync_output_specs(gm, ctx)
    for n in gm.graph.nodes:
        if n.op == "call_function" and "val" not in n.meta:
            set_fake_val(n, ctx.fake_mode)
    gm.graph.lint()
    if recompile:
        gm.recompile()


def _fake_mode(ep: ExportedProgram):
    from torch._guards import detect_fake_mode
    return detect_fake_mode([n.meta["val"] for n in ep.graph.nodes if isinstance(n.meta.get("val"), torch.Tensor)])


def optimize(exported_program: ExportedProgram, passes: Sequence[PassFn] | None = None,
             config: OptimizeConfig | None = None) -> tuple[ExportedProgram, PassReport]:
    """Run `passes` (default: passes.DEFAULT_PASSES, in order) on a copy of `exported_program`.

    Returns a new ExportedProgram (the input is not modified) and a PassReport.
    """
    from . import DEFAULT_PASSES
    passes = list(DEFAULT_PASSES if passes is None else passes)
    config = config or OptimizeConfig()
    ep = exported_program
    gm, renames = _copy_graph_module(ep)
    sig = ep.graph_signature
    ctx = PassContext(gm, [_renamed(s, renames) for s in sig.input_specs], [_renamed(s, renames) for s in sig.output_specs],
                      dict(ep.state_dict), dict(ep.constants), _fake_mode(ep), config)
    report = PassReport(nodes_before=len(gm.graph.nodes), ops_before=op_counts(gm.graph))
    for p in passes:
        name = pass_name(p)
        ctx.pass_name = name
        t0 = time.perf_counter()
        n = int(p(gm, ctx))
        cleanup(gm, ctx, recompile=False)
        report.stats.append(PassStat(name, n, len(gm.graph.nodes), op_counts(gm.graph), time.perf_counter() - t0))
        log.info("pass %s: %d rewrite(s), %d nodes", name, n, len(gm.graph.nodes))
    gm.recompile()
    report.donated_bytes = ctx.donated_bytes
    new_sig = ExportGraphSignature(input_specs=ctx.input_specs, output_specs=ctx.output_specs)
    out = ExportedProgram(
        root=gm, graph=gm.graph, graph_signature=new_sig, state_dict=ctx.state_dict,
        range_constraints=copy.deepcopy(ep.range_constraints),
        module_call_graph=copy.deepcopy(ep.module_call_graph),
        example_inputs=ep.example_inputs, constants=ctx.constants, verifiers=ep.verifiers,
    )
    return out, report
