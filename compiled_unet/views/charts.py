"""Bar charts with matplotlib (the optional `explorer` extra): SVG text for the HTML report, PNG bytes for
benchmarks/plot.py. Figures are built with matplotlib.figure.Figure (no pyplot: no global state, no GUI
backend); SVG text stays text (svg.fonttype none), so a browser can search it and it stays small.
"""
from __future__ import annotations

import io
from typing import Sequence


def _figure(width_in: float, height_in: float):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError("charts need matplotlib (the 'explorer' extra: pip install 'compiled-unet[explorer]')") from None
    return Figure(figsize=(width_in, height_in), layout="constrained")


def hbar(title: str, labels: Sequence[str], series: dict[str, Sequence[float | None]], xlabel: str,
         colors: Sequence[str] | None = None, value_fmt: str = "{:.1f}", ref_line: float | None = None):
    """A horizontal grouped bar chart: one group per label, one bar per series (None: no bar, "n/a")."""
    n, k = len(labels), max(1, len(series))
    fig = _figure(7.5, 0.8 + 0.32 * n * k + 0.25 * n)
    ax = fig.add_subplot()
    height = 0.8 / k
    default = ("#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00")
    vmax = max([v for vals in series.values() for v in vals if v is not None] + [1e-9])
    for j, (name, vals) in enumerate(series.items()):
        color = (colors[j] if colors and j < len(colors) else default[j % len(default)])
        ys = [i + (j - (k - 1) / 2) * height for i in range(n)]
        xs = [v if v is not None else 0 for v in vals]
        bars = ax.barh(ys, xs, height=height * 0.9, color=color, label=name)
        for bar, v in zip(bars, vals):
            ax.text(bar.get_width() + vmax * 0.01, bar.get_y() + bar.get_height() / 2,
                    value_fmt.format(v) if v is not None else "n/a", va="center", fontsize=8)
    if ref_line is not None:
        ax.axvline(ref_line, color="#888888", linewidth=1)
    ax.set_yticks(range(n), labels)
    ax.invert_yaxis()
    ax.set_xlim(0, vmax * 1.18)
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=11, loc="left")
    ax.spines[["top", "right"]].set_visible(False)
    if len(series) > 1:  # under the axes: inside them it covered the labels of the longest bars
        fig.legend(loc="outside lower center", fontsize=8, frameon=False, ncols=len(series))
    return fig


def stacked_hbar(title: str, labels: Sequence[str], parts: dict[str, Sequence[float]], xlabel: str,
                 colors: dict[str, str] | None = None):
    """Horizontal stacked bars: one bar per label, one segment per part (e.g. op category)."""
    fig = _figure(7.5, 1.0 + 0.32 * len(labels))
    ax = fig.add_subplot()
    left = [0.0] * len(labels)
    for name, vals in parts.items():
        if not any(vals):
            continue
        ax.barh(range(len(labels)), vals, left=left, color=(colors or {}).get(name), label=name,
                edgecolor="#555555", linewidth=0.3)
        left = [a + b for a, b in zip(left, vals)]
    ax.set_yticks(range(len(labels)), labels)
    ax.invert_yaxis()
    ax.set_xlabel(xlabel)
    ax.set_title(title, fontsize=11, loc="left")
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(loc="lower right", fontsize=8, frameon=False, ncols=2)
    return fig


def to_svg(fig) -> str:
    """The figure as an <svg> element (no XML prologue), ready to inline in HTML."""
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "compiled_unet"}):
        fig.savefig(buf, format="svg", metadata={"Date": None})
    text = buf.getvalue()
    return text[text.index("<svg"):]


def to_png(fig, dpi: int = 100) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, metadata={"Software": None})
    return buf.getvalue()
