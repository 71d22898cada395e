#!/usr/bin/env bash
# GPU benchmark, one prepared run for a machine with one NVIDIA H100/H200 and torch (CUDA + Triton)
# already installed, no network. Installs nothing; needs only this checkout (run as the wheel lays it out when the
# project is not installed: benchmarks/_bare_checkout.py).
#
#   bash benchmarks/gpu.sh                 # gate (tiny), SD1.5 64x64 batch 2, SDXL 128x128 batch 2, bf16: ~8 min
#   bash benchmarks/gpu.sh --max-autotune  # the published recipe in full and ours with max_autotune (~20+ min)
#   bash benchmarks/gpu.sh --wheels .whl   # first install the wheels in .whl (e.g. diffusers) into a temp folder
#   bash benchmarks/gpu.sh --tests         # also run the GPU tests (pytest -m gpu) after the gate
#   bash benchmarks/gpu.sh --dry           # CPU, tiny preset, eager variants, seconds: what CI runs
#   extra arguments go to every benchmarks.bench call (e.g. --rounds 10, --variants ...)
#
# The lent H200 has torch 2.11 + Triton but no diffusers. Fetch it here (pure Python) and carry .whl:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 importlib_metadata
#
# Each record also holds the run's measured peak (bf16 8192² matmul, cuDNN 3x3 conv) and every variant's % of it
# (counted FLOPs / median time), the CPU flags, and compile times; the summary prints them.
#
# Variants: diffusers eager, diffusers + the "diffusion fast" recipe (bf16, SDPA, channels_last, fused QKV,
# torch.compile with CUDA graphs), ours eager, ours via compiled_unet.compile (Inductor + CUDA graphs). Without
# diffusers the baseline is our own eager model and plain torch.compile of it (the table's "baseline:" line).
# Default budget (measured on an H200 lease, 2026-12-04): both sides compile without autotuning (recipe mode
# reduce-overhead, no coordinate descent: that tuning alone took the tiny model's recipe compile to 185 s; ours
# max_autotune off). Cold compiles there: ours 31 s tiny, 66 s SD1.5. SDXL runs without the recipe by default
# (its cold compile would not fit one 10-minute call); --variants all adds it.
# Writes benchmarks/results/<date>-<preset>-<size>-b2-cuda.json (card name inside) and RESULTS.md rows;
# prints the short table last.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-$(command -v python || command -v python3)}"  # the GPU machine has python3 only
TMPS=()
trap 'rm -rf "${TMPS[@]}"' EXIT

DRY=0 FULL=0 TESTS=0 WANT_WHEELS=0 WHEELS=""
EXTRA=()
for a in "$@"; do
  case "$a" in
    --dry) DRY=1 ;;
    --max-autotune) FULL=1 ;;
    --tests) TESTS=1 ;;
    --wheels) WANT_WHEELS=1 ;;
    *) if [ "$WANT_WHEELS" = 1 ]; then WHEELS="$a"; WANT_WHEELS=0; else EXTRA+=("$a"); fi ;;
  esac
done
if [ "$FULL" = 0 ]; then
  EXTRA=(--recipe-mode reduce-overhead --recipe-config '{"coordinate_descent_tuning": false}'
         --ours-options '{"max_autotune": false}' "${EXTRA[@]}")
fi
if [ -n "$WHEELS" ]; then
  SITE="$(mktemp -d)"; TMPS+=("$SITE")
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "$WHEELS"/*.whl \
    || { echo "gpu.sh: could not install the wheels in $WHEELS" >&2; exit 2; }
  export PYTHONPATH="$PYTHONPATH:$SITE"
fi

if DIFFUSERS="$("$PY" -c 'import diffusers; print(diffusers.__version__)' 2>/dev/null)"; then
  echo "diffusers $DIFFUSERS found: baseline = diffusers"
else
  echo "diffusers NOT installed: baseline = our eager model; recipe = plain torch.compile of it (said in the table)"
fi

if [ "$DRY" = 1 ]; then
  OUT="$(mktemp -d)"; TMPS+=("$OUT")
  COMMON=(--device cpu --dtype fp32 --warmup 1 --rounds 2 --no-record)
  CASES=("tiny 8 1 eager,ours-eager")
else
  "$PY" -c "import torch, sys; ok = torch.cuda.is_available(); print('GPU:', torch.cuda.get_device_name() if ok else 'none', '| torch', torch.__version__); sys.exit(0 if ok else 1)" \
    || { echo "gpu.sh: no CUDA device (use --dry on CPU)" >&2; exit 2; }
  OUT=benchmarks/results
  COMMON=(--device cuda --dtype bf16 --warmup 3 --rounds 20 --inner 3 --compile-times fresh)
  CASES=("sd15 64 2 -" "sdxl 128 2 eager,ours-eager,ours-inductor")
fi

if [ "$DRY" = 0 ]; then
  # Gate: the tiny structure through ours on the GPU (about a minute), checked against the fp32 reference. A
  # failure here would fail the big cases too: stop before they spend the device's minutes.
  echo "=== gate: tiny 16x16 batch 2 on cuda"
  GATE="$(mktemp -d)"; TMPS+=("$GATE")
  "$PY" -m benchmarks.bench --preset tiny --size 16 --batch 2 --device cuda --dtype bf16 --warmup 1 --rounds 3 \
      --variants eager,ours-eager,ours-inductor --compile-times reuse --no-record --max-rel-l2 0.05 \
      --out-dir "$GATE" "${EXTRA[@]}" \
    || { echo "gpu.sh: the gate (tiny case) failed; the SD1.5/SDXL cases were not run" >&2; exit 3; }
  if [ "$TESTS" = 1 ]; then
    echo "=== GPU tests (pytest -m gpu)"
    "$PY" -m pytest -q -m gpu -p no:cacheprovider $(grep -l "mark.gpu" tests/*.py) || STATUS_TESTS=1
  fi
fi

DATE="$(date +%F)"
JSONS=()
STATUS=0
START=$SECONDS
for c in "${CASES[@]}"; do
  read -r PRESET SIZE BATCH VARIANTS <<<"$c"
  PICK=(); [ "$VARIANTS" != - ] && PICK=(--variants "$VARIANTS")  # "-": all the device's variants
  DEV=cuda; [ "$DRY" = 1 ] && DEV=cpu
  JSON="$OUT/$DATE-$PRESET-$SIZE-b$BATCH-$DEV.json"
  echo "=== $PRESET ${SIZE}x${SIZE} batch $BATCH ($((SECONDS - START)) s elapsed)"
  if "$PY" -m benchmarks.bench --preset "$PRESET" --size "$SIZE" --batch "$BATCH" "${COMMON[@]}" \
       "${PICK[@]}" --out-dir "$OUT" --json "$JSON" "${EXTRA[@]}"; then :; else STATUS=1; fi
  [ -f "$JSON" ] && JSONS+=("$JSON")
done

echo
echo "=== summary ($((SECONDS - START)) s)"
if [ "${#JSONS[@]}" -gt 0 ]; then "$PY" -m benchmarks.summary "${JSONS[@]}"; else echo "no results"; STATUS=1; fi
[ "${STATUS_TESTS:-0}" = 1 ] && { echo "gpu.sh: GPU tests failed (above)"; STATUS=1; }
exit $STATUS
