#!/usr/bin/env bash
# Runs the whole test suite, in two pytest runs:
#   1. the default environment (.venv, torch 2.13): everything but tests/xla;
#   2. the XLA environment (.venv-xla, torch 2.9.1 + torch-xla 2.9.0, PJRT_DEVICE=CPU): tests/xla.
# Extra arguments are split between them (see below). Both run; the exit status is non-zero if either failed. Each environment is created or reused
# first (scripts/env.sh, scripts/env_xla.sh). COMPILED_UNET_SKIP_XLA=1 skips the XLA run (and says so).
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$ROOT"

# Split the extra arguments: test paths under tests/xla go to the XLA run, other test paths to the default
# run, options (-k, -x, -m, ...) to both. With paths given, a run that got none of them is skipped.
opts=() main_paths=() xla_paths=()
for a in "$@"; do
  case "$a" in
    tests/xla|tests/xla/*|./tests/xla|./tests/xla/*) xla_paths+=("$a") ;;
    tests/*|./tests/*) main_paths+=("$a") ;;
    *) opts+=("$a") ;;
  esac
done
run_main=1 run_xla=1
if [ $((${#main_paths[@]} + ${#xla_paths[@]})) -gt 0 ]; then
  [ ${#main_paths[@]} -gt 0 ] || run_main=0
  [ ${#xla_paths[@]} -gt 0 ] || run_xla=0
fi
[ "${COMPILED_UNET_SKIP_XLA:-0}" = "1" ] && { run_xla=0; echo "[test] XLA tests skipped (COMPILED_UNET_SKIP_XLA=1)" >&2; }

main_rc=0 xla_rc=0
set +e
if [ "$run_main" = 1 ]; then
  # --durations: the slowest tests in every log, to keep the CI budget (~40 minutes on 2 cores) in view.
  python -m pytest --ignore=tests/xla --durations=25 "${opts[@]}" "${main_paths[@]}"
  main_rc=$?
fi
if [ "$run_xla" = 1 ]; then
  echo "[test] XLA tests (tests/xla) in the XLA environment" >&2
  (
    set -e
    source "$ROOT/scripts/env_xla.sh"
    export PJRT_DEVICE="${PJRT_DEVICE:-CPU}" COMPILED_UNET_REQUIRE_XLA=1
    "$XLA_VENV/bin/python" -m pytest "${opts[@]}" "${xla_paths[@]:-tests/xla}"
  )
  xla_rc=$?
fi
set -e
# "no tests collected" (5) only counts as a failure for the full run (no extra arguments): a -k filter may
# leave one of the two runs empty.
if [ $# -gt 0 ]; then
  [ "$main_rc" = 5 ] && main_rc=0
  [ "$xla_rc" = 5 ] && xla_rc=0
fi
echo "[test] default environment: exit $main_rc; XLA environment: exit $xla_rc" >&2
[ "$main_rc" = 0 ] && [ "$xla_rc" = 0 ]
