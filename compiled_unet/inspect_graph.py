"""Graph reports for people and tools: op histograms per UNet block, parameter bytes, a block picture.

Works on any ExportedProgram of a UNet (ours or diffusers'), before or after `passes.optimize`. The
block of a node comes from its `nn_module_stack` (set by torch.export); nodes that passes created
without one are counted under "(passes)".
"""
from __future__ import annotations

import collections
import html
import json
import re
from dataclasses import dataclass, field
from typing import Optional

import torch

_BLOCK = re.compile(r"^(down_blocks\.\d+|up_blocks\.\d+|mid_block)")


def op_name(node: torch.fx.Node) -> str:
    target = node.target
    name = getattr(target, "__name__", None) or str(target)
    if hasattr(target, "_schema"):  # OpOverload: "aten::conv2d" -> "conv2d"
        name = target._schema.name.split("::")[-1]
    return name.replace(".default", "")


def block_of(node: torch.fx.Node) -> str:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return "(passes)" if node.op == "call_function" else "(io)"
    paths = [path for path, _ in stack.values()]
    # Paths look like "down_blocks.0.attentions.0" (or "L['self'].down_blocks[0]" on older torch).
    for path in paths:
        clean = re.sub(r"\[(\d+)\]", r".\1", path.replace("L['self'].", "").replace("L__self__.", ""))
        m = _BLOCK.match(clean)
        if m:
            return m.group(1)
    top = [re.sub(r"\[(\d+)\]", r".\1", p.replace("L['self'].", "")) for p in paths if p]
    return top[-1].split(".")[0] if top and top[-1] else "(top)"


@dataclass
class GraphReport:
    total_ops: int
    blocks: dict  # block -> Counter(op -> count)
    parameter_bytes: int
    constant_bytes: int
    inputs: list
    passes: Optional[dict] = None  # pass name -> rewrites
    pass_table: Optional[str] = None
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps({
            "total_ops": self.total_ops,
            "blocks": {b: dict(c.most_common()) for b, c in self.blocks.items()},
            "parameter_bytes": self.parameter_bytes, "constant_bytes": self.constant_bytes,
            "inputs": self.inputs, "passes": self.passes, **self.extra,
        }, indent=2)

    def text(self, top: int = 6) -> str:
        lines = [f"ops: {self.total_ops}   parameters: {self.parameter_bytes / 2**20:.2f} MiB   "
                 f"constants: {self.constant_bytes / 2**20:.2f} MiB",
                 "inputs: " + ", ".join(self.inputs), "", f"{'block':16s} {'ops':>6s}  most common"]
        for block, counter in self.blocks.items():
            common = ", ".join(f"{k} x{v}" for k, v in counter.most_common(top))
            lines.append(f"{block:16s} {sum(counter.values()):6d}  {common}")
        if self.pass_table:
            lines += ["", "passes (rewrites, nodes and changed op counts after each pass):", self.pass_table]
        return "\n".join(lines)


def _block_order(name: str) -> tuple:
    if name.startswith("down_blocks"):
        return (1, int(name.split(".")[1]))
    if name == "mid_block":
        return (2, 0)
    if name.startswith("up_blocks"):
        return (3, int(name.split(".")[1]))
    return (0, 0) if name not in ("(passes)", "(io)") else (4, 0)


def inspect_program(ep: torch.export.ExportedProgram, pass_report=None) -> GraphReport:
    blocks: dict = collections.defaultdict(collections.Counter)
    total = 0
    for node in ep.graph.nodes:
        if node.op != "call_function":
            continue
        blocks[block_of(node)][op_name(node)] += 1
        total += 1
    ordered = {b: blocks[b] for b in sorted(blocks, key=_block_order)}
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts if torch.is_tensor(t))  # noqa: E731
    sig = ep.graph_signature
    inputs = [f"{s.arg.name}" for s in sig.input_specs if s.kind == torch.export.graph_signature.InputKind.USER_INPUT]
    return GraphReport(
        total_ops=total, blocks=ordered, parameter_bytes=nbytes(ep.state_dict.values()),
        constant_bytes=nbytes(ep.constants.values()), inputs=inputs,
        passes=dict(pass_report.rewrites) if pass_report is not None else None,
        pass_table=pass_report.table() if pass_report is not None else None)


def block_svg(report: GraphReport, title: str = "UNet") -> str:
    """A left-to-right picture of the blocks (boxes sized by op count) with the skip arcs."""
    names = [b for b in report.blocks if b not in ("(io)",)]
    w, h, gap, top = 130, 60, 24, 70
    width = len(names) * (w + gap) + gap
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{top + h + 120}" '
             f'font-family="sans-serif" font-size="11">',
             f'<text x="{gap}" y="24" font-size="15" font-weight="bold">{html.escape(title)}: '
             f'{report.total_ops} ops</text>']
    max_ops = max((sum(c.values()) for c in report.blocks.values()), default=1)
    centers = {}
    for i, name in enumerate(names):
        x = gap + i * (w + gap)
        ops = sum(report.blocks[name].values())
        shade = int(235 - 120 * ops / max_ops)
        color = f"rgb({shade},{shade + 10 if shade < 245 else 255},255)"
        parts.append(f'<rect x="{x}" y="{top}" width="{w}" height="{h}" rx="6" fill="{color}" stroke="#335"/>')
        parts.append(f'<text x="{x + 6}" y="{top + 16}" font-weight="bold">{html.escape(name)}</text>')
        parts.append(f'<text x="{x + 6}" y="{top + 31}">{ops} ops</text>')
        common = ", ".join(f"{k}×{v}" for k, v in report.blocks[name].most_common(2))
        parts.append(f'<text x="{x + 6}" y="{top + 46}" font-size="9">{html.escape(common)}</text>')
        if i:
            parts.append(f'<line x1="{x - gap}" y1="{top + h / 2}" x2="{x}" y2="{top + h / 2}" stroke="#335"/>')
        centers[name] = x + w / 2
    downs = [n for n in names if n.startswith("down_blocks")]
    ups = [n for n in names if n.startswith("up_blocks")]
    for d, u in zip(downs, reversed(ups)):  # skip connections: down i feeds up (n-1-i)
        x1, x2 = centers[d], centers[u]
        parts.append(f'<path d="M{x1},{top + h} C{x1},{top + h + 90} {x2},{top + h + 90} {x2},{top + h}" '
                     f'fill="none" stroke="#c55" stroke-dasharray="4 3"/>')
    parts.append("</svg>")
    return "\n".join(parts)
