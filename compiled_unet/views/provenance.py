"""Which pass created, rewired or erased each node: `passes.optimize` with every pass wrapped in a tracker.

The tracker snapshots the graph (node -> its inputs) when each pass starts and diffs it when the next one
starts (and once more at the end), so a pass is charged with what it did *and* with the clean-up the
runner made after it (dead code, unused weights). Node objects are compared by identity inside one run;
the result is keyed by node name (names are unique in an FX graph and survive into the returned program).

    ep2, report, prov = optimize_traced(ep)
    prov.origin["linear_12"]      # "exported" or the pass that created the node
    prov.rewired["add_7"]         # passes that changed the node's inputs, in order
    prov.erased_by["dropout_3"]   # (exported graph) the pass that removed the node
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch.fx as fx

EXPORTED = "exported"


@dataclasses.dataclass
class PassDelta:
    """What one pass (plus the clean-up after it) changed, in graph nodes."""
    name: str
    rewrites: int
    created: int
    erased: int
    rewired: int
    nodes_after: int


@dataclasses.dataclass
class Provenance:
    """origin/rewired: keyed by the optimized graph's node names; erased_by/renamed: by the exported graph's."""
    origin: dict[str, str]            # optimized node -> "exported" or the pass that created it
    rewired: dict[str, list[str]]     # optimized node -> passes that changed its inputs (in pass order)
    erased_by: dict[str, str]         # exported node -> pass that removed it
    renamed: dict[str, str]           # exported name -> optimized name, where the runner's graph copy renamed
    deltas: list[PassDelta]

    def last_touch(self, name: str) -> str:
        """The last pass that created or rewired the optimized node `name` ("exported" if none)."""
        touches = self.rewired.get(name) or []
        return touches[-1] if touches else self.origin[name]


def _inputs(node: fx.Node) -> tuple:
    # The node's inputs by identity, plus its target: what "rewired" compares.
    return (node.target, tuple(id(n) for n in node.all_input_nodes), repr_args(node))


def repr_args(node: fx.Node) -> str:
    """Non-node arguments as text (a pass that changes a literal, e.g. a view size, rewrote the node)."""
    def lit(a):
        return "%" if isinstance(a, fx.Node) else a
    return repr((fx.node.map_aggregate(node.args, lit), fx.node.map_aggregate(dict(node.kwargs), lit)))


class _Tracker:
    def __init__(self, exported_nodes: list[fx.Node]):
        self.first: dict[fx.Node, str] = {}         # node -> origin
        self.rewired: dict[fx.Node, list[str]] = {}
        self.erased: dict[fx.Node, str] = {}
        self.deltas: list[PassDelta] = []
        self._snap: dict[fx.Node, tuple] | None = None
        self._pending: tuple[str, int] | None = None  # (pass name, rewrites) not yet diffed
        self._exported = exported_nodes

    def snapshot(self, graph: fx.Graph) -> None:
        self._snap = {n: _inputs(n) for n in graph.nodes}
        for n in graph.nodes:
            self.first.setdefault(n, EXPORTED)

    def settle(self, graph: fx.Graph) -> None:
        """Charge the pending pass with the difference between the snapshot and `graph`."""
        if self._pending is None:
            return
        name, rewrites = self._pending
        now = list(graph.nodes)
        alive = set(now)
        created = [n for n in now if n not in self._snap]
        erased = [n for n in self._snap if n not in alive]
        rewired = [n for n in now if n in self._snap and _inputs(n) != self._snap[n]]
        for n in created:
            self.first[n] = name
        for n in erased:
            self.erased.setdefault(n, name)
        for n in rewired:
            self.rewired.setdefault(n, []).append(name)
        self.deltas.append(PassDelta(name, rewrites, len(created), len(erased), len(rewired), len(now)))
        self._pending = None

    def wrap(self, p):
        from compiled_unet.passes import pass_name

        name = pass_name(p)

        def traced(gm: fx.GraphModule, ctx) -> int:
            self.settle(gm.graph)
            if not self._exported:
                self._exported.extend(gm.graph.nodes)  # the runner's copy of the exported graph
            self.snapshot(gm.graph)
            n = int(p(gm, ctx))
            self._pending = (name, n)
            return n

        traced.name = name  # the report keeps the pass's own name
        return traced


def optimize_traced(ep, passes: Sequence | None = None, config=None):
    """`passes.optimize(ep, passes, config)` that also returns a Provenance (see the module docstring)."""
    from compiled_unet import passes as P

    pass_list = list(P.DEFAULT_PASSES if passes is None else passes)
    copied: list[fx.Node] = []
    tracker = _Tracker(copied)
    ep2, report = P.optimize(ep, [tracker.wrap(p) for p in pass_list], config)
    tracker.settle(ep2.graph)  # the last pass and its clean-up
    final = list(ep2.graph.nodes)
    if copied and any(n not in tracker.first for n in final):
        # ExportedProgram copied the nodes: fall back to names (unique in a graph, so equivalent).
        raise AssertionError("the optimized program's nodes are not the runner's (provenance would be wrong)")
    # The runner copies the exported graph first (names are kept unless they collide): map by position.
    exported_names = [n.name for n in ep.graph.nodes]
    renamed = {old: new.name for old, new in zip(exported_names, copied) if old != new.name}
    by_copy = dict(zip(copied, exported_names))
    return ep2, report, Provenance(
        origin={n.name: tracker.first.get(n, EXPORTED) for n in final},
        rewired={n.name: list(tracker.rewired[n]) for n in final if n in tracker.rewired},
        erased_by={by_copy[n]: p for n, p in tracker.erased.items() if n in by_copy},
        renamed=renamed,
        deltas=tracker.deltas,
    )
