"""Views of an exported UNet for people: Model Explorer (both graphs side by side, grouped by UNet block,
with provenance / op category / time overlays) and one self-contained HTML report.

    from compiled_unet import views
    v = views.build(ep, "sd15", profile=True)        # passes traced, overlays built (and nodes timed)
    views.write_html(v, "report.html")                # matplotlib SVG charts inlined, no network needed
    views.write_explorer(v, "explorer/")              # graphs.json + node data + overlay.json + url.txt
    views.explore(v)                                  # write to a temp folder and serve on 127.0.0.1

Optional extras, imported only when used: ai-edge-model-explorer (explorer files and server), matplotlib
(HTML charts). The module layout: provenance.py (which pass did what), categories.py, profile.py
(per-node eager time), overlays.py (the overlay document), explorer.py, html_report.py, charts.py,
chromium.py (headless Chromium for tests and screenshots).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Sequence


@dataclasses.dataclass
class Views:
    title: str
    exported: Any          # torch.export.ExportedProgram
    optimized: Any         # the program after the passes
    pass_report: Any       # passes.PassReport
    provenance: Any        # views.provenance.Provenance
    overlay: dict          # views.overlays.build_overlay's document


def build(ep, title: str = "UNet", *, passes: Sequence | None = None, profile: bool = False, repeats: int = 3,
          args: tuple | None = None, kwargs: dict | None = None) -> Views:
    """Run the passes on `ep` with provenance tracking and build the overlays; with profile=True also time
    every node of both graphs (eager, node by node; see views/profile.py) on (args, kwargs), by default the
    program's example inputs."""
    from .overlays import build_overlay
    from .provenance import optimize_traced

    optimized, report, prov = optimize_traced(ep, passes)
    profiles = None
    if profile:
        from .profile import profile_programs
        profiles = profile_programs({"exported": ep, "optimized": optimized}, args, kwargs, repeats)
    return Views(title, ep, optimized, report, prov, build_overlay(ep, optimized, prov, profiles, title=title))


def write_html(v: Views, path: str) -> str:
    """Write the HTML report (atomically); returns the path."""
    from .._atomic import write_atomic
    from ..inspect_graph import inspect_program
    from .html_report import render

    write_atomic(path, render(v.title, inspect_program(v.exported), inspect_program(v.optimized, v.pass_report),
                              v.pass_report, v.overlay))
    return path


def write_explorer(v: Views, out_dir: str) -> dict:
    """Write the Model Explorer folder (views/explorer.py describes the files); returns {kind: path}."""
    from .explorer import write_explorer_dir

    return write_explorer_dir(out_dir, v.exported, v.optimized, v.overlay)


def explore(v: Views, out_dir: str | None = None, port: int | None = None, open_browser: bool = True) -> None:
    """Serve both graphs side by side in Model Explorer on 127.0.0.1 (blocks until Ctrl+C)."""
    import tempfile

    from .explorer import DEFAULT_PORT, serve_dir

    out_dir = out_dir or tempfile.mkdtemp(prefix="compiled-unet-explorer-")
    write_explorer(v, out_dir)
    serve_dir(out_dir, port=port or DEFAULT_PORT, open_browser=open_browser)


__all__ = ["Views", "build", "explore", "write_explorer", "write_html"]
