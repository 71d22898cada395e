"""A bar chart of speed-up ratios as a PNG, drawn with matplotlib (compiled_unet.views.charts).

matplotlib comes with the pinned `explorer` extra (the README's commands install it); a grey line marks 1.0x.
"""
from __future__ import annotations


def ratio_chart(title: str, rows: list[tuple[str, list[float | None]]], series: list[str]) -> bytes:
    """Horizontal bars: one group per variant, one bar per series (e.g. "vs eager", "vs recipe").
    `rows`: (variant label, [ratio or None per series]); None draws no bar and says "n/a"."""
    from compiled_unet.views.charts import hbar, to_png

    labels = [name for name, _ in rows]
    by_series = {s: [vals[i] if i < len(vals) else None for _, vals in rows] for i, s in enumerate(series)}
    return to_png(hbar(title, labels, by_series, "speed-up (x)", value_fmt="{:.2f}x", ref_line=1.0))
