#!/usr/bin/env bash
# Runs the whole test suite (creates/reuses .venv first). Extra arguments go to pytest.
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"
exec python -m pytest "$@"
