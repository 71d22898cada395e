"""Model Explorer (ai-edge-model-explorer, the optional `explorer` extra) views of an exported UNet.

`write_explorer_dir` writes, with no server:
    graphs.json            both graphs ("exported", "optimized") as Model Explorer graph JSON, grouped by
                           the UNet's module hierarchy (down_blocks.0/attentions.0/...), one collection
    provenance.json        node data: which pass created or rewired each node (optimized graph) and which
                           pass erased it (exported graph); a colour per pass
    category.json          node data: op category (matmul/conv/attention/norm/elementwise/layout/other)
    time_ms.json           node data (with --profile): median eager milliseconds per node, a gradient
    overlay.json           all of it in one plain file (see views/overlays.py), for tools and tests
    url.txt                the page address that opens both graphs side by side with the overlays
`serve_dir` starts Model Explorer's local server on 127.0.0.1 for such a folder.
"""
from __future__ import annotations

import json
import os
import re
import urllib.parse

from .._atomic import write_atomic
from .categories import COLORS

GRAPH_IDS = ("exported", "optimized")
NODE_DATA = ("category", "provenance", "time_ms")  # the last one loaded is shown: time if profiled
SETTINGS = {"const_element_count_limit": 16}  # the adapter's only setting (its default {} raises KeyError)


def _require_model_explorer():
    try:
        import model_explorer  # noqa: F401
    except ImportError:
        raise ImportError("Model Explorer views need the 'explorer' extra: pip install 'compiled-unet[explorer]' "
                          "(ai-edge-model-explorer)") from None
    return model_explorer


def module_path(node) -> list[str]:
    """The node's module path from nn_module_stack, e.g. ["down_blocks.0", "attentions.0", "proj_in"]."""
    stack = node.meta.get("nn_module_stack") or {}
    out, prev = [], ""
    for path, _cls in stack.values():
        clean = re.sub(r"\[(\d+)\]", r".\1", str(path).replace("L['self'].", "").replace("L__self__.", ""))
        if not clean:
            continue
        rel = clean[len(prev) + 1:] if prev and clean.startswith(prev + ".") else clean
        # down_blocks.0 stays one group (the unit people look for), deeper paths one group per module
        out.append(rel)
        prev = clean
    return out


def graph_json(ep, graph_id: str) -> dict:
    """One Model Explorer graph for `ep` (its ExportedProgram adapter), namespaces = module paths."""
    _require_model_explorer()
    from model_explorer.pytorch_exported_program_adapter_impl import PytorchExportedProgramAdapterImpl
    from model_explorer.utils import convert_adapter_response

    class Adapter(PytorchExportedProgramAdapterImpl):
        def print_tensor(self, tensor, size_limit: int = 16):
            # Non-tensor example inputs (a flag such as return_dict) reach here too; 0.1.34 assumes tensors.
            return super().print_tensor(tensor, size_limit) if hasattr(tensor, "shape") else json.dumps(tensor)

    graphs = convert_adapter_response(Adapter(ep, dict(SETTINGS)).convert())
    (graph,) = graphs["graphs"]
    graph["id"] = graph_id
    by_name = {n.name: n for n in ep.graph.nodes}
    for node in graph["nodes"]:
        fx_node = by_name.get(node["id"])
        if fx_node is None or fx_node.op == "placeholder":
            continue  # the adapter puts inputs and weights in "inputs"
        node["namespace"] = "/".join(module_path(fx_node))
    return graph


def node_data_files(overlay: dict) -> dict[str, dict]:
    """Model Explorer node data (ModelNodeData JSON: graph id -> results) for each overlay in `overlay`."""
    pass_colors = overlay["pass_colors"]
    out: dict[str, dict] = {"provenance": {}, "category": {}}
    has_time = False
    for gid in GRAPH_IDS:
        nodes = overlay["graphs"][gid]["nodes"]
        prov, cat, tms = {}, {}, {}
        for name, info in nodes.items():
            label = info["pass"]
            prov[name] = {"value": label, "bgColor": pass_colors.get(label, "#FFFFFF")}
            cat[name] = {"value": info["category"], "bgColor": COLORS[info["category"]]}
            if info.get("ms") is not None:
                tms[name] = {"value": round(info["ms"], 4)}
        out["provenance"][gid] = {"results": prov, "name": "provenance", "showExpandedSummaryOnGroupNode": True,
                                  "showLabelCountColumnsInChildrenStatsTable": True}
        out["category"][gid] = {"results": cat, "name": "op category", "showExpandedSummaryOnGroupNode": True,
                                "showLabelCountColumnsInChildrenStatsTable": True}
        if tms:
            has_time = True
            out.setdefault("time_ms", {})[gid] = {
                "results": tms, "name": "time (ms)",
                "gradient": [{"stop": 0, "bgColor": "#FFFFFF"}, {"stop": 0.25, "bgColor": "#FDD49E"},
                             {"stop": 1, "bgColor": "#D7301F"}]}
    if not has_time:
        out.pop("time_ms", None)
    return out


def page_query(graphs_path: str, node_data_paths: list[str], label: str = "") -> str:
    """The `?data=...` query that opens both graphs in two panes, with the node data loaded."""
    panes = [{"deepestExpandedGroupNodeIds": [], "selectedNodeId": "", "selectedGraphId": gid,
              "selectedCollectionLabel": label, "widthFraction": 0.5} for gid in GRAPH_IDS]
    data = {"models": [{"url": os.path.abspath(graphs_path)}],
            "nodeData": [os.path.abspath(p) for p in node_data_paths],
            "nodeDataTargets": ["" for _ in node_data_paths],
            "uiState": {"paneStates": panes}}
    return "?data=" + urllib.parse.quote(json.dumps(data))


def write_explorer_dir(out_dir: str, exported, optimized, overlay: dict) -> dict[str, str]:
    """Write the folder described in the module docstring; returns {kind: path}."""
    os.makedirs(out_dir, exist_ok=True)
    paths = {"graphs": os.path.join(out_dir, "graphs.json"), "overlay": os.path.join(out_dir, "overlay.json")}
    # {label, graphs} is the JSON loader's graph-collection form; the label names the collection in the UI.
    collection = {"label": overlay.get("title", "UNet"),
                  "graphs": [graph_json(exported, "exported"), graph_json(optimized, "optimized")]}
    write_atomic(paths["graphs"], json.dumps(collection))
    write_atomic(paths["overlay"], json.dumps(overlay, indent=1))
    for kind, data in node_data_files(overlay).items():
        paths[kind] = os.path.join(out_dir, f"{kind}.json")
        write_atomic(paths[kind], json.dumps(data))
    nd = [paths[k] for k in NODE_DATA if k in paths]
    paths["url"] = os.path.join(out_dir, "url.txt")
    write_atomic(paths["url"], page_query(paths["graphs"], nd, collection["label"]) + "\n")
    return paths


DEFAULT_PORT = 8765  # not Model Explorer's 8080, which it silently moves to 8081..8099 when taken


def serve_dir(out_dir: str, host: str = "127.0.0.1", port: int = DEFAULT_PORT, open_browser: bool = True) -> None:
    """Serve a folder from `write_explorer_dir` with Model Explorer (blocks until Ctrl+C)."""
    me = _require_model_explorer()
    from model_explorer import server

    graphs = os.path.join(out_dir, "graphs.json")
    if not os.path.isfile(graphs):
        raise FileNotFoundError(f"{out_dir}: no graphs.json (write it with --explorer-out)")
    nd = [os.path.join(out_dir, f"{k}.json") for k in NODE_DATA if os.path.isfile(os.path.join(out_dir, f"{k}.json"))]
    with open(graphs) as f:
        label = json.load(f).get("label", "")
    query = page_query(graphs, nd, label)
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        if s.connect_ex((host, port)) == 0:
            raise OSError(f"--port {port}: already in use on {host} (pick another port)")
    print(f"Model Explorer {getattr(me, '__version__', '')}: open http://{host}:{port}/{query}", flush=True)
    if open_browser:
        import threading
        import webbrowser
        threading.Timer(2.0, lambda: webbrowser.open_new_tab(f"http://{host}:{port}/{query}")).start()
    server.start(host=host, port=port, config=None, no_open_in_browser=True)


def main(argv=None) -> int:
    """python -m compiled_unet.views.explorer DIR [--port N] [--no-open]: serve a --explorer-out folder."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m compiled_unet.views.explorer", description=main.__doc__)
    parser.add_argument("folder", help="a folder written by `compiled-unet inspect --explorer-out`")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT)
    parser.add_argument("--no-open", action="store_true", help="do not open a browser tab")
    args = parser.parse_args(argv)
    try:
        serve_dir(args.folder, port=args.port, open_browser=not args.no_open)
    except (OSError, ImportError) as e:
        print(f"error: {e}", file=__import__("sys").stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
