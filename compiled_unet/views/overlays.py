"""The overlay document: per-node block, module path, op, category, provenance and (profiled) time, for the
exported and the optimized graph, plus the per-pass deltas. One plain dict (JSON-ready), the single source
for the Model Explorer node data (explorer.py) and the HTML report (html_report.py).

    {"format": "compiled_unet.views.overlay/1", "title": ...,
     "graphs": {"exported":  {"nodes": {name: {"block", "module", "op", "category", "pass", "ms"?}}},
                "optimized": {"nodes": {name: {..., "origin", "rewired": [...]}}}},
     "passes": [{"name", "rewrites", "created", "erased", "rewired", "nodes_after"}],
     "pass_colors": {label: css colour}, "profile": {...} | null}

"pass" is the colouring label: on the optimized graph the last pass that created or rewired the node
("exported" if none did); on the exported graph "erased by <pass>" or "kept".
"""
from __future__ import annotations

from ..inspect_graph import block_of, op_name
from .categories import category
from .explorer import module_path
from .provenance import EXPORTED, Provenance

FORMAT = "compiled_unet.views.overlay/1"
# Okabe-Ito plus a few: one colour per pass in pass order, "exported"/"kept" left white.
_PALETTE = ("#E69F00", "#56B4E9", "#009E73", "#F0E442", "#0072B2", "#D55E00", "#CC79A7", "#999933",
            "#88CCEE", "#AA4499", "#44AA99", "#882255", "#117733", "#332288")


def _node_entry(node, ms: dict | None) -> dict:
    entry = {"block": block_of(node), "module": "/".join(module_path(node)),
             "op": op_name(node) if node.op == "call_function" else node.op, "category": category(node)}
    if ms is not None and node.name in ms:
        entry["ms"] = ms[node.name]
    return entry


def build_overlay(exported, optimized, prov: Provenance, profiles: dict | None = None, title: str = "UNet") -> dict:
    """The overlay document for `exported` -> `optimized` (from views.provenance.optimize_traced).
    profiles: optional {"exported": NodeProfile, "optimized": NodeProfile}."""
    profiles = profiles or {}
    pass_names = [d.name for d in prov.deltas]
    colors = {name: _PALETTE[i % len(_PALETTE)] for i, name in enumerate(pass_names)}
    colors.update({f"erased by {name}": c for name, c in list(colors.items())})
    colors.update({EXPORTED: "#FFFFFF", "kept": "#FFFFFF"})

    ms = profiles.get("exported")
    ex_nodes = {}
    for n in exported.graph.nodes:
        e = _node_entry(n, ms.node_ms if ms else None)
        eraser = prov.erased_by.get(n.name)
        e["pass"] = f"erased by {eraser}" if eraser else "kept"
        ex_nodes[n.name] = e
    ms = profiles.get("optimized")
    opt_nodes = {}
    for n in optimized.graph.nodes:
        e = _node_entry(n, ms.node_ms if ms else None)
        e["origin"] = prov.origin[n.name]
        e["rewired"] = list(prov.rewired.get(n.name, []))
        e["pass"] = prov.last_touch(n.name)
        opt_nodes[n.name] = e
    profile = None
    if profiles:
        profile = {gid: {"whole_ms": p.whole_ms, "node_sum_ms": p.total_ms, "repeats": p.repeats, "device": p.device,
                         "measures": "eager ATen call per node, fx.Interpreter, median of repeats"}
                   for gid, p in profiles.items()}
    return {
        "format": FORMAT, "title": title,
        "graphs": {"exported": {"nodes": ex_nodes}, "optimized": {"nodes": opt_nodes}},
        "passes": [vars(d).copy() for d in prov.deltas],
        "pass_colors": colors,
        "profile": profile,
    }


def time_by(overlay: dict, graph: str, key: str) -> dict[str, float]:
    """Summed milliseconds per `key` ("block" or "category") of one graph's profiled nodes."""
    out: dict[str, float] = {}
    for info in overlay["graphs"][graph]["nodes"].values():
        if info.get("ms") is not None:
            out[info[key]] = out.get(info[key], 0.0) + info["ms"]
    return out
