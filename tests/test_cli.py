"""The `compiled-unet` CLI: the README's main job runs, and user errors are one line with exit code 2."""
import subprocess
import sys

import compiled_unet._atomic  # noqa: F401 - used through compiled_unet in a test

from compiled_unet.cli import main


def test_demo_tiny_reports_ok_and_writes_an_artifact(capsys, tmp_path):
    # The README's demo as CI's main job runs it (tiny preset at its own 16x16 latent): the graphs it compiles
    # are those the main job compiled, so in CI Inductor's cache makes this test cheap.
    artifact = tmp_path / "demo.pt2"
    assert main(["demo", "--preset", "tiny", "--repeats", "1", "--artifact", str(artifact)]) == 0
    out = capsys.readouterr().out
    assert "(tolerance 1e-4): OK" in out and "compiled ms" in out and f"artifact: {artifact}" in out
    assert artifact.stat().st_size > 0
    # The README's serving step: run the artifact the demo wrote.
    assert main(["run", str(artifact), "--repeats", "1"]) == 0
    assert "shape (1, 4, 16, 16) -> (1, 4, 16, 16) float32" in capsys.readouterr().out


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


def test_compile_then_run_with_given_inputs(capsys, tmp_path):
    import torch
    from safetensors.torch import load_file, save_file

    from compiled_unet.presets import build_random
    artifact = tmp_path / "tiny.pt2"
    # The demo's shape (batch 1, 16x16, 8 tokens): in CI, the main job's demo compiled this graph already.
    assert main(["compile", "--preset", "tiny", "--shapes", "1x16x16", "-o", str(artifact)]) == 0
    assert f"artifact: {artifact}" in capsys.readouterr().out
    g = torch.Generator().manual_seed(3)
    inputs = {"sample": torch.randn(1, 4, 16, 16, generator=g), "timestep": torch.tensor([900.0]),
              "encoder_hidden_states": torch.randn(1, 8, 32, generator=g)}
    save_file(inputs, str(tmp_path / "in.safetensors"))
    out_path = tmp_path / "out.safetensors"
    assert main(["run", str(artifact), "--inputs", str(tmp_path / "in.safetensors"), "--output", str(out_path),
                 "--repeats", "1"]) == 0
    got = load_file(str(out_path))["sample"]
    with torch.no_grad():  # the preset's weights are seeded, so eager rebuilds the same model
        ref = build_random("tiny")(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"]).sample
    assert (got - ref).abs().max().item() <= 1e-4 * max(1.0, ref.abs().max().item())
    # An input file that lacks a tensor the artifact takes: one clear line, exit 2.
    save_file({"sample": inputs["sample"]}, str(tmp_path / "partial.safetensors"))
    assert main(["run", str(artifact), "--inputs", str(tmp_path / "partial.safetensors")]) == 2
    assert "missing tensors ['timestep', 'encoder_hidden_states']" in capsys.readouterr().err


def test_compile_and_run_error_paths(capsys, tmp_path):
    assert main(["compile", "--shapes", "1x8", "-o", str(tmp_path / "x.pt2")]) == 2
    assert "--shapes '1x8': expected BATCHxHEIGHTxWIDTH" in capsys.readouterr().err
    assert main(["compile", "--backend", "tpu", "-o", str(tmp_path / "x.pt2")]) == 2
    assert "--backend 'tpu': expected inductor or xla" in capsys.readouterr().err
    assert main(["compile", "--checkpoint", str(tmp_path / "none"), "-o", str(tmp_path / "x.pt2")]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "missing.pt2")]) == 2
    assert "no such artifact" in capsys.readouterr().err
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(b"not a package")
    assert main(["run", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad}: not a compiled UNet artifact, or a damaged one" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "folder").mkdir()
    assert main(["run", str(tmp_path / "folder")]) == 2
    assert "not a compiled UNet artifact" in capsys.readouterr().err


def test_error_after_a_long_compile_is_one_line(capsys, tmp_path, monkeypatch):
    """A user error that only shows when the artifact is written (an unwritable path), after the compile:
    one line and exit 2, no traceback (the compile itself is stubbed here: what is tested is the verb)."""
    import compiled_unet

    blocker = tmp_path / "file"
    blocker.write_text("a file where a folder should be")
    monkeypatch.setattr(compiled_unet, "compile", lambda *a, **k: object())
    monkeypatch.setattr(compiled_unet, "save", lambda compiled, path: compiled_unet._atomic.write_atomic(path, b""))
    assert main(["compile", "--preset", "tiny", "--shapes", "1x8x8", "-o", str(blocker / "unet.pt2")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("compiled-unet: error: ") and str(blocker) in err and len(err.strip().splitlines()) == 1


def test_inspect_an_artifact_shows_what_its_compile_recorded(capsys, tmp_path):
    """`inspect --artifact` reads a package's document (no load): its inputs, options and the pass table of the
    compile that made it; a saved jit graph says it recorded none; a bad file is a one-line error."""
    import json

    from compiled_fixtures import swappable

    compiled, path = swappable()  # an AOT package (unfrozen), shared with test_inductor.py
    assert main(["inspect", "--artifact", path]) == 0
    out = capsys.readouterr().out
    assert "sample: [2, 4, 8, 8] float32" in out and "aot=True" in out
    assert "fuse_qkv" in out and compiled.report.table() in out
    assert main(["inspect", "--artifact", path, "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out)["passes"] == compiled.report.rewrites
    jit_saved = tmp_path / "demo.pt2"
    assert main(["demo", "--preset", "tiny", "--repeats", "1", "--artifact", str(jit_saved)]) == 0
    capsys.readouterr()
    assert main(["inspect", "--artifact", str(jit_saved)]) == 0
    assert "passes: not recorded" in capsys.readouterr().out
    bad = tmp_path / "bad.pt2"
    bad.write_bytes(b"not a package")
    assert main(["inspect", "--artifact", str(bad)]) == 2
    assert "not a compiled UNet artifact" in capsys.readouterr().err
    assert main(["inspect", "--artifact", str(tmp_path / "missing.pt2")]) == 2
