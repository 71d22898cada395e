"""tests/xla run in the XLA environment (.venv-xla: torch 2.9.1 + torch-xla 2.9.0, PJRT_DEVICE=CPU).

scripts/test.sh runs them there with COMPILED_UNET_REQUIRE_XLA=1, where a missing torch_xla is an error.
Anywhere else (e.g. a plain `pytest` in the default environment) they are not collected.
"""
import importlib.util
import os

if importlib.util.find_spec("torch_xla") is None:
    if os.environ.get("COMPILED_UNET_REQUIRE_XLA") == "1":
        raise RuntimeError("tests/xla: torch_xla is not importable in this environment; run bash scripts/env_xla.sh")
    collect_ignore_glob = ["test_*.py"]
