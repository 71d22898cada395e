"""Time per graph node from an eager run of an exported program, node by node (torch.fx.Interpreter).

What it measures: the wall time of each node's ATen call run eagerly, one node at a time, on the
program's own weights and example inputs (median over `repeats` runs after one warm-up), including the
interpreter's per-node Python overhead (a few microseconds; views and getitems are all overhead). On CUDA
each node is synchronized before and after, so the time is the kernel's, not the launch's. It is the time
of the *eager* graph, which shows where the work is (convolutions, attention, norms), not the time of the
Inductor-compiled code, which fuses nodes and has no per-node time. `whole_ms` is one uninterrupted run
of the same graph for comparison (the per-node sum is larger by the interpreter overhead).
"""
from __future__ import annotations

import dataclasses
import statistics
import time

import torch
import torch.fx as fx


@dataclasses.dataclass
class NodeProfile:
    node_ms: dict[str, float]        # node name -> median milliseconds (call_function nodes only)
    whole_ms: float                  # median of uninterrupted runs of the graph module
    repeats: int
    device: str

    @property
    def total_ms(self) -> float:
        return sum(self.node_ms.values())


class _TimedInterpreter(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, sync):
        super().__init__(gm, garbage_collect_values=True)
        self.sync = sync
        self.times: dict[str, float] = {}

    def run_node(self, n: fx.Node):
        if n.op != "call_function":
            return super().run_node(n)
        self.sync()
        t0 = time.perf_counter()
        out = super().run_node(n)
        self.sync()
        self.times[n.name] = (time.perf_counter() - t0) * 1e3
        return out


def _flat_inputs(ep: torch.export.ExportedProgram, args: tuple, kwargs: dict) -> list:
    flat = list(ep._graph_module_flat_inputs(args, kwargs))
    # A program that writes into its buffers would change them between repeats: run on copies.
    mutated = set(ep.graph_signature.buffers_to_mutate.values())
    if mutated:
        names = [s.target for s in ep.graph_signature.input_specs]
        flat = [t.clone() if name in mutated and torch.is_tensor(t) else t for name, t in zip(names, flat)]
    return flat


def _prepare(ep, args, kwargs):
    if args is None and kwargs is None:
        if ep.example_inputs is None:
            raise ValueError("the program has no example_inputs: pass args/kwargs to profile it")
        args, kwargs = ep.example_inputs
    flat = _flat_inputs(ep, tuple(args or ()), dict(kwargs or {}))
    device = next((t.device for t in flat if torch.is_tensor(t)), torch.device("cpu"))
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    return flat, device, sync


def profile_programs(programs: dict, args: tuple | None = None, kwargs: dict | None = None,
                     repeats: int = 3) -> dict[str, NodeProfile]:
    """profile_nodes for several programs (name -> ExportedProgram) on the same inputs, their runs
    interleaved (A, B, A, B, ...) so that a busy machine slows them alike."""
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
        raise ValueError(f"repeats={repeats!r}: expected a positive integer")
    prepared = {name: _prepare(ep, args, kwargs) for name, ep in programs.items()}
    runs: dict[str, list] = {name: [] for name in programs}
    wholes: dict[str, list] = {name: [] for name in programs}
    with torch.no_grad():
        for name, ep in programs.items():
            ep.graph_module(*prepared[name][0])  # warm-up (allocator, oneDNN primitive caches)
        for _ in range(repeats):
            for name, ep in programs.items():
                flat, _, sync = prepared[name]
                interp = _TimedInterpreter(ep.graph_module, sync)
                interp.run(*flat)
                runs[name].append(interp.times)
                sync()
                t0 = time.perf_counter()
                ep.graph_module(*flat)
                sync()
                wholes[name].append((time.perf_counter() - t0) * 1e3)
    out = {}
    for name in programs:
        node_ms = {n: statistics.median(r[n] for r in runs[name]) for n in runs[name][0]}
        out[name] = NodeProfile(node_ms=node_ms, whole_ms=statistics.median(wholes[name]), repeats=repeats,
                                device=str(prepared[name][1]))
    return out


def profile_nodes(ep: torch.export.ExportedProgram, args: tuple | None = None, kwargs: dict | None = None,
                  repeats: int = 3) -> NodeProfile:
    """Median milliseconds per node of `ep` on (args, kwargs) (default: the program's example inputs)."""
    return profile_programs({"program": ep}, args, kwargs, repeats)["program"]
