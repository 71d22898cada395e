"""compiled_unet.views (issue 13): provenance and category overlays checked against the graphs themselves,
the pass report, the Model Explorer files and the HTML report. CPU, export only (no compile).

The oracle for provenance is the pair of graphs: a node the overlay calls "exported" must be in the exported
graph with the same op, a node created by a pass must not be, a node "erased by" a pass must be gone.
"""
from __future__ import annotations

import collections
import json
import os
import re

import pytest
import torch

from compiled_unet import export
from compiled_unet.presets import build_random, example_inputs

FREEU = dict(s1=0.9, s2=0.2, b1=1.2, b2=1.4)  # FreeU on: more passes fire (freeu_fourier, fold_channel_scale)


@pytest.fixture(scope="module")
def tiny_views():
    from compiled_unet import views

    model = build_random("tiny")
    model.enable_freeu(**FREEU)
    sample, t, kwargs = example_inputs("tiny", batch=1, latent_size=8)
    ep = export(model, sample, t, **kwargs)
    return views.build(ep, "tiny")


def _calls(graph):
    return [n for n in graph.nodes if n.op == "call_function"]


def test_passes_keep_nn_module_stack(tiny_views):
    """Every node of the optimized graph that computes something came from a module (the UNet is the root
    module), so every one must still carry nn_module_stack after all passes: Model Explorer groups by it."""
    exported_missing = [n.name for n in _calls(tiny_views.exported.graph) if not n.meta.get("nn_module_stack")]
    assert exported_missing == []  # torch.export sets it on every op of a module's forward
    missing = [n.name for n in _calls(tiny_views.optimized.graph) if not n.meta.get("nn_module_stack")]
    assert missing == [], f"passes dropped nn_module_stack on {missing[:10]}"


def test_every_optimized_node_has_provenance(tiny_views):
    v = tiny_views
    nodes = v.overlay["graphs"]["optimized"]["nodes"]
    assert set(nodes) == {n.name for n in v.optimized.graph.nodes}
    exported = {n.name: n for n in v.exported.graph.nodes}
    pass_names = [s.name for s in v.pass_report.stats]
    for n in v.optimized.graph.nodes:
        e = nodes[n.name]
        assert e["origin"] == "exported" or e["origin"] in pass_names
        if e["origin"] == "exported":  # oracle: the exported graph has this node, with the same op
            assert n.name in exported and exported[n.name].target == n.target, n.name
        else:  # created by a pass: not in the exported graph
            assert n.name not in exported, n.name
        assert all(p in pass_names for p in e["rewired"])
        assert e["pass"] == (e["rewired"][-1] if e["rewired"] else e["origin"])


def test_erased_nodes_are_gone(tiny_views):
    v = tiny_views
    optimized = {n.name for n in v.optimized.graph.nodes}
    for name, e in v.overlay["graphs"]["exported"]["nodes"].items():
        if e["pass"].startswith("erased by "):
            assert name not in optimized, name
        else:
            assert e["pass"] == "kept" and name in optimized, name


def test_counts_match_the_pass_report(tiny_views):
    """Per pass: nodes after = nodes before + created - erased, equal to the PassReport's column; a pass
    that reports no rewrite changed no node; totals equal the report's final counts."""
    v = tiny_views
    deltas = v.overlay["passes"]
    assert [d["name"] for d in deltas] == [s.name for s in v.pass_report.stats]
    before = v.pass_report.nodes_before
    for d, s in zip(deltas, v.pass_report.stats):
        assert d["rewrites"] == s.rewrites
        assert d["nodes_after"] == s.nodes_after == before + d["created"] - d["erased"], d
        if s.rewrites == 0:
            assert d["created"] == d["erased"] == d["rewired"] == 0, d
        before = s.nodes_after
    nodes = v.overlay["graphs"]["optimized"]["nodes"]
    assert len(nodes) == v.pass_report.nodes_after
    calls = [e for e in nodes.values() if e["category"] != "io"]
    assert len(calls) == sum(v.pass_report.ops_after.values())
    # Nodes created per pass and still present never exceed what the pass created.
    surviving = collections.Counter(e["origin"] for e in nodes.values())
    for d in deltas:
        assert surviving.get(d["name"], 0) <= d["created"]


def test_known_rewrites_are_attributed(tiny_views):
    """fuse_qkv replaces the q/k/v projection weights; FreeU's Fourier filter loses its FFTs."""
    ex = tiny_views.overlay["graphs"]["exported"]["nodes"]
    for name, e in ex.items():
        if re.search(r"attn1_to_[qkv]_weight$", name):
            assert e["pass"] == "erased by fuse_qkv", (name, e)
        if e["op"].startswith("fft_"):
            assert e["pass"] == "erased by freeu_fourier", (name, e)
        if e["op"] == "dropout":
            assert e["pass"] == "erased by remove_dropout", (name, e)
    opt = tiny_views.overlay["graphs"]["optimized"]["nodes"]
    assert any(e["origin"] == "fuse_qkv" and e["category"] == "matmul" for e in opt.values())


def test_categories_and_blocks(tiny_views):
    from compiled_unet.views.categories import category_of_op

    assert [category_of_op(o) for o in ("conv2d", "linear", "scaled_dot_product_attention", "group_norm",
                                        "add", "mul_", "view", "some_new_op")] == \
        ["conv", "matmul", "attention", "norm", "elementwise", "elementwise", "layout", "other"]
    nodes = tiny_views.overlay["graphs"]["optimized"]["nodes"]
    cats = collections.Counter(e["category"] for e in nodes.values())
    assert cats["conv"] and cats["matmul"] and cats["attention"] and cats["norm"]
    blocks = {e["block"] for e in nodes.values()}
    assert {"down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"} <= blocks
    for e in nodes.values():  # the module path starts with the block (where the node is in a block)
        if e["block"].startswith(("down_blocks", "up_blocks", "mid_block")):
            assert e["module"].split("/")[0] == e["block"], e


def test_explorer_files(tiny_views, tmp_path):
    pytest.importorskip("model_explorer")  # the `explorer` extra, installed by scripts/env.sh and CI
    from compiled_unet import views

    paths = views.write_explorer(tiny_views, str(tmp_path))
    graphs = json.loads(open(paths["graphs"]).read())
    assert graphs["label"] == "tiny" and [g["id"] for g in graphs["graphs"]] == ["exported", "optimized"]
    for g, ep in zip(graphs["graphs"], (tiny_views.exported, tiny_views.optimized)):
        assert [n["id"] for n in g["nodes"]] == [n.name for n in ep.graph.nodes]
        ns = {n["id"]: n["namespace"] for n in g["nodes"]}
        for n in _calls(ep.graph):
            block = tiny_views.overlay["graphs"][g["id"]]["nodes"][n.name]["block"]
            if block.startswith(("down_blocks", "up_blocks", "mid_block")):
                assert ns[n.name].split("/")[0] == block  # grouped by UNet block
    for kind in ("provenance", "category"):
        data = json.loads(open(paths[kind]).read())
        for gid, ep in (("exported", tiny_views.exported), ("optimized", tiny_views.optimized)):
            assert set(data[gid]["results"]) == {n.name for n in ep.graph.nodes}, (kind, gid)
    assert "time_ms" not in paths  # not profiled
    url = open(paths["url"]).read()
    assert "optimized" in url and "provenance.json" in url


def test_profile_times_every_node(tiny_views):
    from compiled_unet.views.profile import profile_nodes

    prof = profile_nodes(tiny_views.optimized, repeats=1)
    assert set(prof.node_ms) == {n.name for n in _calls(tiny_views.optimized.graph)}
    assert all(t >= 0 for t in prof.node_ms.values()) and prof.whole_ms > 0
    with pytest.raises(ValueError, match="repeats"):
        profile_nodes(tiny_views.optimized, repeats=0)


def test_interpreter_run_equals_the_program(tiny_views):
    """The timed run is the program's computation: the node-by-node interpreter gives the same output as
    calling the graph module (bitwise: the same ATen calls in the same order)."""
    from compiled_unet.views.profile import _TimedInterpreter, _prepare

    ep = tiny_views.optimized
    flat, _, sync = _prepare(ep, None, None)
    with torch.no_grad():
        ref = ep.graph_module(*flat)
        out = _TimedInterpreter(ep.graph_module, sync).run(*flat)
    assert torch.equal(out[0], ref[0])


def test_html_report_is_self_contained(tiny_views, tmp_path):
    pytest.importorskip("matplotlib")  # the `explorer` extra
    from compiled_unet import views

    path = views.write_html(tiny_views, str(tmp_path / "r.html"))
    page = open(path).read()
    for s in ("down_blocks.0", "mid_block", "up_blocks.1", "fuse_qkv", "freeu_fourier", "remove_dropout",
              "Ops per block", "Passes", "parameters"):
        assert s in page, s
    assert page.count("<svg") >= 2  # the block picture and the category chart
    assert "Not profiled" in page
    # No fetches at view time: no scripts, stylesheets, images or fonts from anywhere.
    assert not re.search(r"<script|<link|<img|@import|url\((?!#)", page)  # url(#clip) is in-page
    assert not re.search(r"(src|href)=\"https?:", page)


def test_cli_inspect_views_bad_arguments(capsys):
    from compiled_unet import cli

    assert cli.main(["inspect", "--preset", "tiny", "--profile", "--profile-repeats", "0"]) == 2
    assert "--profile-repeats 0" in capsys.readouterr().err


def test_cli_inspect_writes_html_and_explorer_files(tmp_path, capsys):
    """`compiled-unet inspect --html --explorer-out` (FreeU on) writes both; the overlay's counts are the
    text report's pass table's."""
    pytest.importorskip("model_explorer")
    from compiled_unet import cli

    html, out = str(tmp_path / "r.html"), str(tmp_path / "me")
    assert cli.main(["inspect", "--preset", "tiny", "--size", "8", "--freeu", "0.9,0.2,1.2,1.4",
                     "--html", html, "--explorer-out", out]) == 0
    printed = capsys.readouterr().out
    assert "HTML report written" in printed and "python -m compiled_unet.views.explorer" in printed
    overlay = json.loads(open(os.path.join(out, "overlay.json")).read())
    table = printed.split("passes (rewrites")[1]
    for d in overlay["passes"]:  # each pass row of the printed table: name, rewrites, nodes after
        row = next(line.split() for line in table.splitlines() if line.split()[:1] == [d["name"]])
        assert (int(row[1]), int(row[2])) == (d["rewrites"], d["nodes_after"]), row
    assert "freeu_fourier" in open(html).read()
    assert sorted(os.listdir(out)) == ["category.json", "graphs.json", "overlay.json", "provenance.json", "url.txt"]
