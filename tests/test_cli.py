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
