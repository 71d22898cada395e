# The XLA environment: create or reuse .venv-xla (torch 2.9.1 + torch-xla 2.9.0, requirements/xla.txt)
# with the project installed editable. Run it (`bash scripts/env_xla.sh`) or source it like env.sh;
# sourcing also puts .venv-xla first on PATH and sets PJRT_DEVICE (CPU unless already set, e.g. TPU).
# Re-installs only when pyproject.toml or requirements/xla.txt changed (stamp file).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
XLA_VENV="${COMPILED_UNET_XLA_VENV:-$ROOT/.venv-xla}"
_xla_python="${PYTHON_BIN:-python3.11}"
command -v "$_xla_python" >/dev/null 2>&1 || _xla_python=python3
# pip here warns about every local index folder of this machine's pip config that lacks a package: hide that.
_xla_pip() { "$XLA_VENV/bin/python" -m pip "$@" 2> >(grep -v "^WARNING: Location 'file:" >&2); }
_xla_stamp() { cat "$ROOT/pyproject.toml" "$ROOT/requirements/xla.txt" | sha256sum | cut -c1-16; }
if [ ! -x "$XLA_VENV/bin/python" ]; then
  echo "[env-xla] creating $XLA_VENV" >&2
  "$_xla_python" -m venv "$XLA_VENV"
fi
if [ "$(cat "$XLA_VENV/.stamp" 2>/dev/null)" != "$(_xla_stamp)" ]; then
  # ~3 GB of wheels unpack to ~7 GB; say so up front instead of pip's "[Errno 28] No space left on device"
  # half-way through (seen in CI on a machine whose disk other runs had filled).
  _need_kb=$((9 * 1024 * 1024))
  _free_kb=$(df -Pk "$XLA_VENV" | awk 'NR == 2 {print $4}')
  if [ "${_free_kb:-0}" -lt "$_need_kb" ]; then
    echo "[env-xla] not enough disk for the XLA environment: it needs about 9 GB free on the disk of $XLA_VENV" \
         "(torch 2.9.1 CUDA build + torch-xla), $((_free_kb / 1024 / 1024)) GB are free." \
         "Free some space, or set COMPILED_UNET_XLA_VENV to a folder on a larger disk." >&2
    exit 1
  fi
  echo "[env-xla] installing torch 2.9.1, torch-xla 2.9.0 and compiled-unet into $XLA_VENV (first time: ~3 GB download, ~7 GB on disk)" >&2
  _t0=$SECONDS
  # --no-cache-dir: pip's wheel cache would keep a second, 3 GB copy of what it just installed.
  _xla_pip install -q --disable-pip-version-check --no-cache-dir -r "$ROOT/requirements/xla.txt"
  _xla_pip install -q --disable-pip-version-check -c "$ROOT/requirements/xla.txt" -e "$ROOT"
  PJRT_DEVICE=CPU "$XLA_VENV/bin/python" -c "import torch, torch_xla; assert torch.__version__.startswith('2.9.'), torch.__version__"
  _xla_stamp > "$XLA_VENV/.stamp"
  echo "[env-xla] ready in $((SECONDS - _t0)) s" >&2
fi
export PATH="$XLA_VENV/bin:$PATH"
export PJRT_DEVICE="${PJRT_DEVICE:-CPU}"
