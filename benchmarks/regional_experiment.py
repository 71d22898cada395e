"""Experiment (not a library feature): compile each distinct UNet block once and stitch the blocks.

The optimized graph (CPU default passes + prepack_onednn, so speed does not need freezing) is split at
top-level block boundaries (down/up/mid resnets, attentions, samplers; glue in between); each part's
weights become inputs; parts with the same structure and input metadata share one torch.compile (no
freezing). Prints export/split time, compile + first call time, rel L2 vs eager, median step time.
Results and what they mean: benchmarks/NOTES.md ("Regional compile of our graph").

    python benchmarks/regional_experiment.py sd15 32      # preset, latent size; cold Inductor cache
"""
import functools
import json
import os
import re
import sys
import tempfile
import time

os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="inductor_regional_")

import torch  # noqa: E402
import torch.fx as fx  # noqa: E402
import torch.utils._pytree as pytree  # noqa: E402
from torch.fx.passes.split_module import split_module  # noqa: E402

import compiled_unet  # noqa: E402
from compiled_unet import passes  # noqa: E402
from compiled_unet import presets  # noqa: E402
from compiled_unet._pytree import children  # noqa: E402
from compiled_unet.backends.inductor import _flat_module  # noqa: E402
from compiled_unet.runtime import Signature  # noqa: E402

BLOCK = re.compile(r"(down_blocks|up_blocks)\.\d+\.(attentions|resnets|downsamplers|upsamplers)\.\d+"
                   r"|mid_block\.(attentions|resnets)\.\d+")


def block_of(node: fx.Node) -> str:
    for path, _ in (node.meta.get("nn_module_stack") or {}).values():
        path = path.replace("L['self'].", "")
        if BLOCK.fullmatch(path):
            return path
    return "glue"


def split_by_block(gm: fx.GraphModule) -> fx.GraphModule:
    """One part per run of consecutive nodes of the same block."""
    part, current, last = {}, 0, None
    for node in gm.graph.nodes:
        if node.op in ("placeholder", "output", "get_attr"):
            continue
        if block_of(node) != last:
            current, last = current + 1, block_of(node)
        part[node] = current
    return split_module(gm, gm, lambda n: part[n], keep_original_order=True)


def lift_weights(part: fx.GraphModule) -> list:
    """Turn the part's get_attr weights into trailing inputs; returns their tensors in input order."""
    graph, weights = part.graph, []
    anchor = [n for n in graph.nodes if n.op == "placeholder"][-1]
    for node in [n for n in graph.nodes if n.op == "get_attr"]:
        with graph.inserting_after(anchor):
            anchor = graph.placeholder(f"weight_{len(weights)}")
        weights.append(functools.reduce(getattr, node.target.split("."), part))
        node.replace_all_uses_with(anchor)
        graph.erase_node(node)
    part.recompile()
    return weights


def structure_key(part: fx.GraphModule, example_args: list) -> tuple:
    """Equal for parts with the same ops, wiring, literal arguments and input metadata."""
    index, items = {}, []
    for i, node in enumerate(part.graph.nodes):
        index[node] = i
        ref = functools.partial(fx.map_arg, fn=lambda a: ("node", index[a]))
        items.append((node.op, "input" if node.op == "placeholder" else str(node.target),
                      str(ref(node.args)), str(ref(node.kwargs))))
    metas = tuple((tuple(a.shape), str(a.dtype), a.is_mkldnn, None if a.is_mkldnn else tuple(a.stride()))
                  if torch.is_tensor(a) else repr(a) for a in example_args)
    return tuple(items), metas


class Bound(torch.nn.Module):
    """A (shared) compiled part called with this instance's weights."""

    def __init__(self, fn, weights):
        super().__init__()
        self.fn, self.weights = fn, weights

    def forward(self, *args):
        return self.fn(*args, *self.weights)


def main(name: str, size: int) -> None:
    model = presets.build_random(name)
    sample, timestep, kwargs = presets.example_inputs(name, 1, size)
    with torch.no_grad():
        ref = model(sample, timestep, **kwargs).sample
    t_start = time.perf_counter()
    ep = compiled_unet.export(model, sample, timestep, **kwargs)
    ep, _ = passes.optimize(ep, list(passes.default_passes("cpu")) + [passes.prepack_onednn])
    gm, in_spec, _ = _flat_module(ep)
    args, kw = Signature.from_program(ep).bind(sample, timestep, **kwargs)
    flat = pytree.tree_flatten((args, {k: kw[k] for k in children(in_spec)[1].context}))[0]
    stitched = split_by_block(gm)
    parts = {n.target: getattr(stitched, n.target) for n in stitched.graph.nodes if n.op == "call_module"}
    weights = {k: lift_weights(p) for k, p in parts.items()}

    seen = {}  # one eager pass records each part's inputs (their metadata decides sharing)

    def recorder(key):
        def run(*a):
            seen[key] = a
            return parts[key](*a, *weights[key])
        return run

    for key in parts:
        setattr(stitched, key, Bound(recorder(key), []))
    with torch.no_grad():
        stitched(*flat)
    t_split = time.perf_counter()
    compiled = {}
    for key, part in parts.items():
        sig = structure_key(part, list(seen[key]) + weights[key])
        if sig not in compiled:
            compiled[sig] = torch.compile(part, fullgraph=True, dynamic=False)
        setattr(stitched, key, Bound(compiled[sig], weights[key]))
    t0 = time.perf_counter()
    with torch.no_grad():
        out = stitched(*flat)[0]
    t_first = time.perf_counter()
    times = []
    with torch.no_grad():
        for _ in range(6):
            t1 = time.perf_counter()
            stitched(*flat)
            times.append(time.perf_counter() - t1)
    print(json.dumps({"parts": len(parts), "distinct": len(compiled),
                      "export_passes_split_s": round(t_split - t_start, 1),
                      "compile_first_call_s": round(t_first - t0, 1), "total_s": round(t_first - t_start, 1),
                      "rel_l2": ((out - ref).norm() / ref.norm()).item(),
                      "median_ms": round(sorted(times)[3] * 1e3, 1)}))


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "tiny", int(sys.argv[2]) if len(sys.argv) > 2 else 8)
