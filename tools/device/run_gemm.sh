#!/usr/bin/env bash
# Issue 6, skinny GEMM on one GPU: the fused Triton decode GEMMs (kernels/skinny_gemm.py) vs cuBLAS.
#   tests    gpu tests of the kernels at Llama-3-8B shapes in bf16 (plus the small forced-config
#            cases, natively: partial tiles on both paths), and greedy decode with
#            --decode-gemm triton vs cublas inside captured graphs (stories260K)
#   kernels  the skinny GEMM tables alone (python -m kernels.bench --only skinny): each
#            projection at M = 1, 8, 16 vs F.linear plus the kernels it fuses and the floor,
#            then a launch-config sweep at M = 1 and 16
#   engine   bench engine on a dummy Llama-3-8B (batch 1, 8, 64; context 1k; 16 steps), once
#            with --decode-gemm cublas and once with triton plus the per-kernel profile at
#            batch 1; summary.txt gets the step times side by side
# Usage on the device machine (repo root): OUT=$OUT bash tools/device/run_gemm.sh [steps...]
# (default: all). Logs, *.json and summary.txt land under $OUT; the exit status is non-zero if
# a step failed or was skipped for time.
#
# Time (H200, estimated, not yet measured): tests ~40 s (about 20 Triton compiles of ~1.5 s
# plus 12 small GEMM checks and two stories260K engines capturing graphs up to batch 16);
# kernels ~90 s (~25 compiles, ~110 graph-replay timings of ~0.3 s each, do_bench's 100 ms
# each plus its L2 flushes); engine ~70 s for cublas (16 GB dummy weights, VMM, a profile
# forward of 8192 tokens, graph capture for 7 sizes, 3 points x (16 graph + 16 eager steps)
# after their prefill) and ~80 s for triton (its kernels mostly in Triton's cache by then).
# About 4.7 min in all. --max-num-seqs 64 keeps graph capture to sizes 1..64 (the points need
# no more). Each step's timeout is also cut to what is left of a 345 s budget, so the script
# ends within 6 minutes whatever happens; a step with under 20 s left is skipped.
set -uo pipefail
source "$(dirname "$0")/env.sh"
BUDGET_S=345
deadline=$((SECONDS + BUDGET_S))
ENGINE=(python3 -m coordinator.cli bench engine --model llama-3-8b --load-format dummy
        --batch-sizes 1,8,64 --contexts 1024 --steps 16 --max-num-batched-tokens 8192
        --max-num-seqs 64 --no-hf --no-prefill)
steps=${*:-tests kernels engine}
failed=""
run() {  # run STEP LOG TIMEOUT CMD...: tee the log, record a failure; the budget caps TIMEOUT
  local step=$1 log=$2 limit=$3; shift 3
  local left=$((deadline - SECONDS))
  if [ "$left" -lt 20 ]; then
    echo "$step skipped: ${left}s left of the ${BUDGET_S}s budget" | tee -a "$OUT/summary.txt"
    failed="$failed $step"
    return
  fi
  [ "$limit" -le "$left" ] || limit=$left
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$log"
  local rc=${PIPESTATUS[0]}
  echo "$step rc=$rc (${limit}s limit)" | tee -a "$OUT/summary.txt"
  [ "$rc" -eq 0 ] || failed="$failed $step"
}
compare_engine() {  # step times of the two engine runs side by side, into summary.txt
  python3 - "$OUT/engine_cublas.json" "$OUT/engine_triton.json" <<'EOF' | tee -a "$OUT/summary.txt"
import json, sys
runs = {}
for path in sys.argv[1:]:
    try:
        runs[path] = {(r["batch"], r["context"]): r for r in json.load(open(path))["results"]}
    except (OSError, ValueError, KeyError) as e:
        print(f"engine compare: cannot read {path}: {e}")
        sys.exit(0)
cublas, triton = runs.values()
print("batch ctx  step ms cublas  triton  (x floor cublas  triton)  graph ms cublas  triton")
for key in sorted(cublas):
    a, b = cublas[key], triton.get(key)
    if b is None:
        continue
    print(f"{key[0]:>5} {key[1]:>4} {a['step_ms']:>14.3f} {b['step_ms']:>7.3f} "
          f"{a['vs_floor']:>17.3f} {b['vs_floor']:>7.3f} {a['graph_ms'] or 0:>16.3f} "
          f"{b['graph_ms'] or 0:>7.3f}")
EOF
}
: >"$OUT/summary.txt"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/summary.txt"
for step in $steps; do
  echo "=== $step $(date +%T)"
  case $step in
    tests)
      run tests tests.log 100 python3 -m pytest -q -rs -m "gpu or not gpu" -k "gpu or forced_configs" \
        tests/kernels/test_skinny_gemm.py tests/workers/test_triton_engine.py ;;
    kernels)
      run kernels kernels_skinny.log 150 python3 -m kernels.bench --only skinny \
        --output-json "$OUT/kernels_skinny.json" ;;
    engine)
      run engine-cublas engine_cublas.log 130 "${ENGINE[@]}" --decode-gemm cublas \
        --output-json "$OUT/engine_cublas.json"
      run engine-triton engine_triton.log 140 "${ENGINE[@]}" --decode-gemm triton --profile 1 \
        --output-json "$OUT/engine_triton.json"
      compare_engine ;;
    *) echo "unknown step $step (tests kernels engine)"; exit 2 ;;
  esac
done
echo "=== done $(date +%T) after ${SECONDS}s; failed:${failed:- none}"
[ -z "$failed" ]
