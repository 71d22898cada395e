"""The views as a person sees them (issue 13): the HTML report and the Model Explorer page rendered in
headless Chromium, checked for the elements a person looks for (block names, pass names, overlays) and
screenshotted. SD1.5 preset (latent 8x8: the graph is the same for any size) and diffusers' own UNet.

Set VIEWS_SCREENSHOTS=DIR to keep the screenshots. Export only (no Inductor compile); marked slow because a
browser and an SD1.5-sized export take a minute.
"""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest
import torch

from compiled_unet import UNet2DConditionModel, export, views
from compiled_unet.presets import PRESETS, example_inputs

pytestmark = pytest.mark.slow
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BLOCKS_SD = ["down_blocks.0", "down_blocks.3", "mid_block", "up_blocks.0", "up_blocks.3"]
PASSES_SEEN = ["remove_asserts", "remove_dropout", "fuse_qkv", "constant_fold"]


@pytest.fixture(scope="module")
def browser():
    pytest.importorskip("model_explorer")  # the `explorer` extra (installed by scripts/env.sh and CI)
    from compiled_unet.views.chromium import Browser, find_chromium

    if find_chromium() is None:
        pytest.skip("Chromium not installed (apt-get install -y chromium; .ci/run installs it)")
    with Browser(width=1600, height=1000) as b:
        yield b


def _keep(path: str, name: str) -> None:
    out = os.environ.get("VIEWS_SCREENSHOTS")
    if out:
        os.makedirs(out, exist_ok=True)
        shutil.copyfile(path, os.path.join(out, name))


def _check_png(path: str, width: int) -> None:
    """A real picture: PNG of the page's width, not one flat colour (a blank or failed page)."""
    from PIL import Image  # matplotlib's dependency

    img = Image.open(path).convert("RGB")
    assert img.size[0] == width and img.size[1] >= 500
    colours = img.resize((200, 120)).getcolors(maxcolors=200 * 120)
    assert colours is not None and len(colours) > 20, "screenshot is (nearly) one colour"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(out_dir: str):
    """Model Explorer on 127.0.0.1 for a folder from --explorer-out, in a child process (the CLI's path)."""
    port = _free_port()
    code = ("from compiled_unet.views.explorer import serve_dir; "
            f"serve_dir({out_dir!r}, port={port}, open_browser=False)")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 90
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/check_health", timeout=2) as r:
                if r.read() == b"model_explorer_ok":
                    return proc, port
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"Model Explorer did not start: {proc.stdout.read().decode()[-2000:]}")
        time.sleep(0.5)


def _look(browser, v, tmp_path, name: str, blocks: list[str], expect_time: bool) -> None:
    # The HTML report, opened from disk.
    html = views.write_html(v, str(tmp_path / f"{name}.html"))
    wanted = blocks + PASSES_SEEN + ["Ops per block", "Passes", "parameters"]
    wanted += ["time per block", "time per op category"] if expect_time else []
    text = browser.open("file://" + html, wait_for=wanted, timeout=60, settle=0.5)
    assert v.title in text
    shot = str(tmp_path / f"{name}-report.png")
    browser.screenshot(shot, full_page=True)
    _check_png(shot, 1600)
    _keep(shot, f"{name}-report.png")

    # Model Explorer: both graphs side by side with the overlays, served from the --explorer-out folder.
    out = str(tmp_path / f"{name}-explorer")
    paths = views.write_explorer(v, out)
    proc, port = _serve(out)
    try:
        url = f"http://127.0.0.1:{port}/" + open(paths["url"]).read().strip()
        wanted = ["exported", "optimized", f"{len(list(v.optimized.graph.nodes))} nodes", "provenance",
                  "op category", "erased by fuse_qkv", "#matmul"] + blocks
        wanted += ["time (ms)"] if expect_time else []
        text = browser.open(url, wait_for=wanted, timeout=150, settle=3)
        assert f"{v.title} | exported" in text  # the left pane shows the exported graph
        shot = str(tmp_path / f"{name}-explorer.png")
        browser.screenshot(shot)
        _check_png(shot, 1600)
        _keep(shot, f"{name}-explorer.png")
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_views_sd15_preset_in_chromium(browser, tmp_path):
    # The SD1.5 structure with zero weights: built on the meta device and materialized without the random
    # init (which costs a minute on 2 cores). The views show structure; values play no part (the passes
    # rewrite the same: 34/70/90/32/1, 1774 nodes, as with build_random("sd15")).
    with torch.device("meta"):
        model = UNet2DConditionModel(**PRESETS["sd15"].config)
    model = model.to_empty(device="cpu").eval()
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.zero_()
    sample, t, kwargs = example_inputs("sd15", batch=1, latent_size=8)
    ep = export(model, sample, t, **kwargs)
    del model
    _look(browser, views.build(ep, "sd15"), tmp_path, "sd15", BLOCKS_SD, expect_time=False)


def test_views_diffusers_unet_in_chromium(browser, tmp_path):
    """A program exported from diffusers' own UNet2DConditionModel (small config, FreeU on so that the
    FreeU passes fire), profiled: the time overlay and the time charts appear too."""
    diffusers = pytest.importorskip("diffusers")  # the test oracle; CI installs it
    torch.manual_seed(0)
    model = diffusers.UNet2DConditionModel(**PRESETS["tiny"].config).eval()
    model.enable_freeu(s1=0.9, s2=0.2, b1=1.2, b2=1.4)
    sample, t, kwargs = example_inputs("tiny", batch=1, latent_size=8)
    ep = export(model, sample, t, **kwargs)
    v = views.build(ep, "diffusers-tiny", profile=True, repeats=1)
    assert any(e["pass"] == "erased by freeu_fourier" for e in v.overlay["graphs"]["exported"]["nodes"].values())
    _look(browser, v, tmp_path, "diffusers", ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.1",
                                              "freeu_fourier"], expect_time=True)

