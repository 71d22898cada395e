# Rebuild the diffusers-0.39 compatibility fixtures (tests/flax/fixtures/): create or reuse .venv-flax39
# (diffusers 0.39.0, the last release with Flax classes, + jax/flax + CPU torch 2.13) and run
# tests/flax/make_fixtures.py in it. CI never runs this; it reads the committed fixtures.
#   bash scripts/make_flax_fixtures.sh            # all fixtures
#   bash scripts/make_flax_fixtures.sh sd         # one of them
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${COMPILED_UNET_FLAX39_VENV:-$ROOT/.venv-flax39}"
REQ="$ROOT/tests/flax/requirements-diffusers039.txt"
_py="${PYTHON_BIN:-python3.11}"
command -v "$_py" >/dev/null 2>&1 || _py=python3
# pip here warns about every local index folder of this machine's pip config that lacks a package: hide that.
_pip() { "$VENV/bin/python" -m pip "$@" 2> >(grep -v "^WARNING: Location 'file:" >&2); }
_stamp() { sha256sum < "$REQ" | cut -c1-16; }
if [ ! -x "$VENV/bin/python" ]; then
  echo "[flax39] creating $VENV" >&2
  "$_py" -m venv "$VENV"
fi
if [ "$(cat "$VENV/.stamp" 2>/dev/null)" != "$(_stamp)" ]; then
  echo "[flax39] installing diffusers 0.39.0, jax/flax and CPU torch into $VENV" >&2
  # torch first and pinned, so nothing can resolve a CUDA build of it.
  _pip install -q --disable-pip-version-check -c "$REQ" torch
  _pip install -q --disable-pip-version-check -r "$REQ"
  _stamp > "$VENV/.stamp"
fi
cd "$ROOT"
JAX_PLATFORMS=cpu "$VENV/bin/python" -u tests/flax/make_fixtures.py "$@"
