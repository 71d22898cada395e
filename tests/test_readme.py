"""README's code runs as written: its "Use" and "Compile, ship, serve" blocks are executed here with a tiny
model in place of SD1.5 (the substitutions below are the only edits; each must apply, so a README change
that drifts from them fails this test instead of going stale).
"""
from __future__ import annotations

import os
import re
import types

import pytest
import torch

from compiled_fixtures import assert_close_to_eager

README = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
TINY = dict(block_out_channels=(32, 64), layers_per_block=1, norm_num_groups=8, cross_attention_dim=32,
            attention_head_dim=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), sample_size=8)
# SD1.5 sizes in the README -> the tiny model's.
SUBSTITUTIONS = {
    "torch.randn(1, 4, 64, 64)": "torch.randn(1, 4, 8, 8)",
    "torch.randn(1, 77, 768)": "torch.randn(1, 7, 32)",
}


def _block(heading: str) -> str:
    text = open(README).read()
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    match = re.search(r"```python\n(.*?)```", section, re.S)
    assert match, f"README section {heading!r} has no python block"
    return match.group(1)


def _substituted(code: str, extra: dict) -> str:
    for old, new in {**SUBSTITUTIONS, **extra}.items():
        if old in code:
            code = code.replace(old, new)
    return code


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    from compiled_unet import UNet2DConditionModel

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("readme") / "unet"
    UNet2DConditionModel(**TINY).save_pretrained(folder)
    return str(folder)


def test_use_block_runs(tiny_folder, tmp_path, monkeypatch):
    code = _block("Use")
    assert "path/to/sd15/unet" in code and all(k in code for k in SUBSTITUTIONS)
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec(compile(_substituted(code, {'"path/to/sd15/unet"': repr(tiny_folder)}), "README:Use", "exec"), ns)
    assert_close_to_eager(ns["out2"], ns["out"])
    assert os.path.isfile(tmp_path / "out" / "unet" / "config.json")


@pytest.mark.slow
def test_compile_block_runs(tmp_path, monkeypatch):
    from compiled_unet.presets import build_random, example_inputs

    code = _block("Compile, ship, serve")
    monkeypatch.chdir(tmp_path)
    # The demo's model and shapes (tiny preset, 16x16, 8 tokens): in CI, the main job's demo compiled these
    # graphs already, so Inductor's cache serves most of the three compiles below.
    unet, finetuned = build_random("tiny"), build_random("tiny", seed=1)
    sample, t, kwargs = example_inputs("tiny")
    text = kwargs.pop("encoder_hidden_states")
    assert not kwargs
    pipe = types.SimpleNamespace(unet=None)
    ns = dict(unet=unet, finetuned=finetuned, sample=sample, t=t, text=text, pipe=pipe)
    exec(compile(_substituted(code, {}), "README:Compile", "exec"), ns)
    with torch.no_grad():
        ref = unet(sample, t, text).sample
        ref_finetuned = finetuned(sample, t, text).sample
    assert pipe.unet is ns["compiled"]
    assert_close_to_eager(ns["compiled"](sample, t, text).sample, ref)
    assert_close_to_eager(ns["served"](sample, t, text).sample, ref)
    assert_close_to_eager(ns["swappable"](sample, t, text).sample, ref_finetuned)
    assert os.listdir(tmp_path) == ["unet.pt2"]
