"""Packaging: the repo's passes/ folder installs as `compiled_unet.passes`, never as a top-level `passes`."""
import ast
import importlib.metadata
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _setuptools_table() -> dict:
    tomllib = pytest.importorskip("tomllib")
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_pyproject_lists_every_subpackage_and_maps_passes():
    table = _setuptools_table()
    assert table["package-dir"] == {"compiled_unet.passes": "passes"}
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "compiled_unet").rglob("__init__.py")}
    missing = sorted(found - set(table["packages"]))
    assert not missing, f"add {missing} to [tool.setuptools] packages in pyproject.toml (or the wheel lacks them)"
    assert "compiled_unet.passes" in table["packages"]
    assert not any(p == "passes" or p.startswith("passes.") for p in table["packages"])


def test_installed_import_path_outside_the_checkout(tmp_path):
    """From a directory that is not the repo root (as an installed user sees it): `compiled_unet.passes`
    imports, and there is no top-level `passes`."""
    try:
        importlib.metadata.distribution("compiled-unet")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("compiled-unet is not installed (scripts/env.sh installs it)")
    code = ("import importlib.util, compiled_unet.passes as p; "
            "print(p.__name__, p.optimize.__module__, importlib.util.find_spec('passes'))")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["compiled_unet.passes", "compiled_unet.passes._runner", "None"]


def _top_level_passes_imports(path: pathlib.Path) -> list[str]:
    tree = ast.parse(path.read_text(), str(path))
    bad = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module]
        bad += [f"{path.relative_to(ROOT)}:{node.lineno}" for n in names if n == "passes" or n.startswith("passes.")]
    return bad


def test_nothing_imports_a_top_level_passes():
    """Works from the repo root only by accident (cwd on sys.path); installed, `import passes` fails."""
    files = [p for d in ("compiled_unet", "passes", "tests", "examples", "benchmarks") for p in (ROOT / d).rglob("*.py")]
    bad = [hit for p in files for hit in _top_level_passes_imports(p)]
    assert not bad, f"use `from compiled_unet import passes` instead of `import passes` at {bad}"
