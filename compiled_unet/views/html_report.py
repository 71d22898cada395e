"""One self-contained HTML page for an inspected UNet: summary and parameter bytes, the block picture
(inline SVG), the per-block op table, the per-pass table (rewrites, nodes created/erased/rewired, op
counts that changed), op categories per block, and with a profile the time per block and per op category.
Charts are matplotlib SVG, inlined; no script, stylesheet or font is fetched at view time.
"""
from __future__ import annotations

import html

from ..inspect_graph import GraphReport, block_svg
from .categories import CATEGORIES, COLORS
from .charts import hbar, stacked_hbar, to_svg
from .overlays import time_by

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",sans-serif;margin:24px;color:#222;max-width:1200px}
h1{font-size:22px;margin-bottom:4px} h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:13px;margin:8px 0} td,th{border:1px solid #ccc;padding:3px 7px}
th{background:#f3f5f8;text-align:left} td.n{text-align:right;font-variant-numeric:tabular-nums}
.muted{color:#666;font-size:13px} .fig{overflow-x:auto;margin:8px 0} .sw{display:inline-block;width:10px;
height:10px;border:1px solid #888;margin-right:4px}
"""


def _table(head: list[str], rows: list[list], numeric_from: int = 1, numeric_to: int | None = None) -> str:
    """An HTML table; columns numeric_from..numeric_to (exclusive) are right-aligned numbers."""
    out = ['<div class="fig"><table><tr>' + "".join(f"<th>{html.escape(str(h))}</th>" for h in head) + "</tr>"]
    for r in rows:
        cells = []
        for i, c in enumerate(r):
            klass = ' class="n"' if numeric_from <= i < (numeric_to or len(r)) else ""
            cells.append(f"<td{klass}>{html.escape(str(c))}</td>")
        out.append("<tr>" + "".join(cells) + "</tr>")
    return "\n".join(out) + "</table></div>"


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def render(title: str, exported: GraphReport, optimized: GraphReport, pass_report, overlay: dict) -> str:
    """The page as text. `exported`/`optimized`: inspect_graph reports of both programs; pass_report: the
    passes' PassReport; overlay: views.overlays.build_overlay's document (with profile if one was taken)."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}: compiled_unet "
             f"inspect</title><style>{_CSS}</style></head><body>",
             f"<h1>{html.escape(title)}</h1>",
             '<p class="muted">compiled-unet inspect: the exported graph and the graph after the passes. '
             "Self-contained page (no network).</p>"]

    # Summary
    parts.append("<h2 id='summary'>Summary</h2>")
    parts.append(_table(["", "exported", "optimized"], [
        ["ops (call_function nodes)", exported.total_ops, optimized.total_ops],
        ["parameters", _mib(exported.parameter_bytes), _mib(optimized.parameter_bytes)],
        ["constants", _mib(exported.constant_bytes), _mib(optimized.constant_bytes)],
        ["inputs", ", ".join(exported.inputs), ", ".join(optimized.inputs)],
    ]))

    # Block picture
    parts.append("<h2 id='blocks'>Blocks</h2><div class='fig'>" + block_svg(optimized, title=f"{title} (optimized)")
                 + "</div>")

    # Per-block op table
    parts.append("<h2 id='ops'>Ops per block</h2>")
    rows = []
    for block in dict.fromkeys(list(exported.blocks) + list(optimized.blocks)):
        ce, co = exported.blocks.get(block), optimized.blocks.get(block)
        common = ", ".join(f"{k} ×{v}" for k, v in (co or ce).most_common(6))
        rows.append([block, sum(ce.values()) if ce else 0, sum(co.values()) if co else 0, common])
    parts.append(_table(["block", "ops exported", "ops optimized", "most common (optimized)"], rows, numeric_to=3))

    # Per-pass table
    parts.append("<h2 id='passes'>Passes</h2>")
    deltas = {d["name"]: d for d in overlay["passes"]}
    keys = set(pass_report.ops_before) | set(pass_report.ops_after)
    changed = sorted(k for k in keys if pass_report.ops_before.get(k, 0) != pass_report.ops_after.get(k, 0))
    short = [o.replace("aten.", "").replace(".default", "") for o in changed]
    head = ["pass", "rewrites", "nodes after", "created", "erased", "rewired"] + short
    rows = [["(exported)", "", pass_report.nodes_before, "", "", ""] + [pass_report.ops_before.get(o, 0) for o in changed]]
    for s in pass_report.stats:
        d = deltas.get(s.name, {})
        rows.append([s.name, s.rewrites, s.nodes_after, d.get("created", ""), d.get("erased", ""), d.get("rewired", "")]
                    + [s.ops_after.get(o, 0) for o in changed])
    table = _table(head, rows)
    for s in pass_report.stats:  # a colour swatch per pass, the same colours as the provenance overlay
        colour = overlay["pass_colors"].get(s.name, "#fff")
        table = table.replace(f"<td>{html.escape(s.name)}</td>",
                              f"<td><span class='sw' style='background:{colour}'></span>{html.escape(s.name)}</td>", 1)
    parts.append(table)
    parts.append('<p class="muted">created / erased / rewired: graph nodes the pass (and the clean-up after it) '
                 "added, removed, or whose inputs it changed. Colours match the Model Explorer provenance overlay.</p>")

    # Categories per block (op counts), always
    nodes = overlay["graphs"]["optimized"]["nodes"]
    blocks = [b for b in optimized.blocks]
    counts = {c: [0] * len(blocks) for c in CATEGORIES if c != "io"}
    for info in nodes.values():
        if info["category"] != "io" and info["block"] in blocks:
            counts[info["category"]][blocks.index(info["block"])] += 1
    parts.append("<h2 id='categories'>Op categories per block (optimized)</h2><div class='fig'>"
                 + to_svg(stacked_hbar("ops per block by category", blocks, counts, "ops", COLORS)) + "</div>")

    # Profile
    prof = overlay.get("profile")
    parts.append("<h2 id='profile'>Time</h2>")
    if prof:
        graphs = [g for g in ("exported", "optimized") if g in prof]
        tb = {g: time_by(overlay, g, "block") for g in graphs}
        tc = {g: time_by(overlay, g, "category") for g in graphs}
        block_names = [b for b in dict.fromkeys(list(exported.blocks) + list(optimized.blocks))
                       if any(b in tb[g] for g in graphs)]
        cats = [c for c in CATEGORIES if any(c in tc[g] for g in graphs)]
        parts.append("<div class='fig'>" + to_svg(hbar("time per block (eager, per node, summed)", block_names,
                     {g: [tb[g].get(b) for b in block_names] for g in graphs}, "milliseconds")) + "</div>")
        parts.append("<div class='fig'>" + to_svg(hbar("time per op category", cats,
                     {g: [tc[g].get(c) for c in cats] for g in graphs}, "milliseconds")) + "</div>")
        parts.append(_table(["graph", "whole run (ms)", "sum of nodes (ms)", "repeats", "device"],
                            [[g, f"{prof[g]['whole_ms']:.1f}", f"{prof[g]['node_sum_ms']:.1f}", prof[g]["repeats"],
                              prof[g]["device"]] for g in graphs]))
        parts.append('<p class="muted">Measured: each node\'s ATen call run eagerly, one node at a time '
                     "(torch.fx.Interpreter), median over the repeats, including a few microseconds of interpreter "
                     "overhead per node. It shows where eager work goes, not the time of Inductor's fused code.</p>")
    else:
        parts.append('<p class="muted">Not profiled (run with --profile).</p>')
    parts.append("</body></html>")
    return "\n".join(parts)
