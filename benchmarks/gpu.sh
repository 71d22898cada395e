#!/usr/bin/env bash
# GPU benchmark, one prepared run for a machine with one NVIDIA H100/H200 and torch (CUDA + Triton)
# already installed, no network. Installs nothing; needs only this checkout (PYTHONPATH=. is set here).
#
#   bash benchmarks/gpu.sh                 # SD1.5 structure 64x64 batch 2, SDXL structure 128x128 batch 2, bf16
#   bash benchmarks/gpu.sh --fast-compile  # same without max-autotune (recipe mode reduce-overhead), if time is short
#   bash benchmarks/gpu.sh --dry           # CPU, tiny preset, eager variants, seconds: what CI runs
#   extra arguments go to every benchmarks.bench call (e.g. --rounds 10)
#
# Each record also holds the run's measured peak (bf16 8192² matmul, cuDNN 3x3 conv) and every variant's % of it
# (counted FLOPs / median time), the CPU flags, and compile times; the summary prints them.
#
# Variants: diffusers eager, diffusers + the "diffusion fast" recipe (bf16, SDPA, channels_last, fused QKV,
# torch.compile max-autotune with CUDA graphs), ours eager, ours via compiled_unet.compile (Inductor,
# max_autotune + CUDA graphs). Without diffusers on the machine, the baseline is our own eager model and
# plain torch.compile of it with the same recipe; the table's "baseline:" line says so.
# Writes benchmarks/results/<date>-<preset>-<size>-b2-cuda.json (card name inside) and RESULTS.md rows;
# prints the short table last. Budget: about 8 minutes, most of it cold max-autotune compiles.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python}"

DRY=0
EXTRA=()
for a in "$@"; do
  case "$a" in
    --dry) DRY=1 ;;
    --fast-compile) EXTRA+=(--recipe-mode reduce-overhead --ours-options '{"max_autotune": false}') ;;
    *) EXTRA+=("$a") ;;
  esac
done

if DIFFUSERS="$("$PY" -c 'import diffusers; print(diffusers.__version__)' 2>/dev/null)"; then
  echo "diffusers $DIFFUSERS found: baseline = diffusers"
else
  echo "diffusers NOT installed: baseline = our eager model; recipe = plain torch.compile of it (said in the table)"
fi

if [ "$DRY" = 1 ]; then
  OUT="$(mktemp -d)"
  trap 'rm -rf "$OUT"' EXIT
  COMMON=(--device cpu --dtype fp32 --variants eager,ours-eager --warmup 1 --rounds 2 --no-record)
  CASES=("tiny 8 1")
else
  "$PY" -c "import torch, sys; ok = torch.cuda.is_available(); print('GPU:', torch.cuda.get_device_name() if ok else 'none', '| torch', torch.__version__); sys.exit(0 if ok else 1)" \
    || { echo "gpu.sh: no CUDA device (use --dry on CPU)" >&2; exit 2; }
  OUT=benchmarks/results
  COMMON=(--device cuda --dtype bf16 --warmup 3 --rounds 20 --inner 3 --compile-times fresh)
  CASES=("sd15 64 2" "sdxl 128 2")
fi

DATE="$(date +%F)"
JSONS=()
STATUS=0
START=$SECONDS
for c in "${CASES[@]}"; do
  read -r PRESET SIZE BATCH <<<"$c"
  DEV=cuda; [ "$DRY" = 1 ] && DEV=cpu
  JSON="$OUT/$DATE-$PRESET-$SIZE-b$BATCH-$DEV.json"
  echo "=== $PRESET ${SIZE}x${SIZE} batch $BATCH ($((SECONDS - START)) s elapsed)"
  if "$PY" -m benchmarks.bench --preset "$PRESET" --size "$SIZE" --batch "$BATCH" "${COMMON[@]}" \
       --out-dir "$OUT" --json "$JSON" "${EXTRA[@]}"; then :; else STATUS=1; fi
  [ -f "$JSON" ] && JSONS+=("$JSON")
done

echo
echo "=== summary ($((SECONDS - START)) s)"
if [ "${#JSONS[@]}" -gt 0 ]; then "$PY" -m benchmarks.summary "${JSONS[@]}"; else echo "no results"; STATUS=1; fi
exit $STATUS
