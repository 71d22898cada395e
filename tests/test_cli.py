"""The `compiled-unet` CLI: the README's main job runs, and user errors are one line with exit code 2."""
import subprocess
import sys

from compiled_unet.cli import main


def test_demo_tiny_reports_ok(capsys):
    assert main(["demo", "--preset", "tiny", "--repeats", "1", "--size", "8"]) == 0
    out = capsys.readouterr().out
    assert "(tolerance 1e-5): OK" in out and "exported ms" in out


def test_unknown_preset_is_one_line_error():
    proc = subprocess.run([sys.executable, "-m", "compiled_unet.cli", "demo", "--preset", "nope"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "compiled-unet: error: unknown preset 'nope'; expected one of ['sd15', 'sd21', 'sdxl', 'tiny']"]
    assert "Traceback" not in proc.stderr


def test_inspect_json_reports_blocks_and_passes(capsys, tmp_path):
    import json
    svg = tmp_path / "unet.svg"
    assert main(["inspect", "--preset", "tiny", "--size", "8", "--format", "json", "--svg", str(svg)]) == 0
    report = json.loads(capsys.readouterr().out)
    assert {"down_blocks.0", "mid_block", "up_blocks.1"} <= set(report["blocks"])
    assert report["passes"]["fuse_qkv"] == 8  # 2 transformer blocks x (attn1 QKV + attn2 KV) x 2 attention blocks
    assert report["parameter_bytes"] > 0
    assert svg.read_text().startswith("<svg") and "down_blocks.0" in svg.read_text()


def test_inspect_saved_program_and_bad_file(capsys, tmp_path):
    import torch

    import compiled_unet
    from compiled_unet.presets import build_random, example_inputs
    sample, t, kw = example_inputs("tiny", latent_size=8)
    ep = compiled_unet.export(build_random("tiny"), sample, t, **kw)
    path = tmp_path / "tiny.pt2"
    torch.export.save(ep, str(path))
    assert main(["inspect", "--program", str(path), "--no-passes"]) == 0
    assert "up_blocks.1" in capsys.readouterr().out
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(b"not a program")
    assert main(["inspect", "--program", str(bad)]) == 2
    assert "not a loadable exported program" in capsys.readouterr().err
    assert main(["inspect", "--program", str(tmp_path / "missing.pt2")]) == 2
