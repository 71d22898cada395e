# Sourced by the other scripts: create or reuse .venv and install the project from its own files.
# Re-installs only when pyproject.toml or requirements/constraints.txt changed (stamp file).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${COMPILED_UNET_VENV:-$ROOT/.venv}"
PYTHON_BIN="${PYTHON_BIN:-python3.11}"
command -v "$PYTHON_BIN" >/dev/null 2>&1 || PYTHON_BIN=python3
stamp_of() { cat "$ROOT/pyproject.toml" "$ROOT/requirements/constraints.txt" | sha256sum | cut -c1-16; }
if [ ! -x "$VENV/bin/python" ]; then
  echo "[env] creating $VENV" >&2
  "$PYTHON_BIN" -m venv "$VENV"
fi
if [ "$(cat "$VENV/.stamp" 2>/dev/null)" != "$(stamp_of)" ]; then
  echo "[env] installing compiled-unet and its test dependencies into $VENV" >&2
  # torch first and pinned, so nothing can resolve a CUDA build of it.
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -c "$ROOT/requirements/constraints.txt" torch
  "$VENV/bin/python" -m pip install -q --disable-pip-version-check -c "$ROOT/requirements/constraints.txt" -e "$ROOT[test,flax,serve,explorer,progress]"
  stamp_of > "$VENV/.stamp"
fi
export PATH="$VENV/bin:$PATH"
# A persistent Inductor cache inside the checkout: compiled kernels are reused across tests and runs.
export TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-$ROOT/.cache/inductor}"
# compiled_unet's own cache (AOTInductor libraries extracted once from loaded packages), also inside the checkout.
export COMPILED_UNET_CACHE_DIR="${COMPILED_UNET_CACHE_DIR:-$ROOT/.cache/compiled_unet}"
