#!/usr/bin/env bash
# Issue 6 on one GPU: where a decode step's time goes, and SmolLM2 greedy Triton vs torch.
#   probe         GPU, driver and package versions
#   profile-test  gpu tests of the per-kernel profile (tests/workers/test_bench_profile.py)
#   bench         the engine bench on a dummy Llama-3-8B with CUDA graphs: decode at batch
#                 1,8,64,128,256 x context 1k,4k (eager beside each point, graph replay time,
#                 host gap), the HF transformers baseline, prefill at 8k tokens, then the
#                 per-kernel table of the decode graph at batch 1 and 64 (each context)
#                 (~6 min on an H200)
#   smollm2       tests/workers/test_smollm2_gpu.py, when $KUNSERVE_CACHE_DIR (default
#                 .xfer/cache) holds SmolLM2-135M-Instruct (tools/device/unpack_smollm2.sh)
# Usage on the device machine (repo root): bash tools/device/run_issue6.sh [steps...]
# (default: all). Logs, engine_issue6.json and summary.txt land under $OUT; the exit status
# is non-zero if a step failed.
set -uo pipefail
source "$(dirname "$0")/env.sh"
export KUNSERVE_CACHE_DIR=${KUNSERVE_CACHE_DIR:-$PWD/.xfer/cache}
SMOLLM2=$KUNSERVE_CACHE_DIR/SmolLM2-135M-Instruct
BENCH=(python3 -m coordinator.cli bench engine --model llama-3-8b --load-format dummy
       --steps 16 --max-num-batched-tokens 8192)
steps=${*:-probe profile-test bench smollm2}
failed=""
run() {  # run STEP LOG TIMEOUT CMD...: tee the log, record a failure
  local step=$1 log=$2 limit=$3; shift 3
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$log"
  local rc=${PIPESTATUS[0]}
  echo "$step rc=$rc" | tee -a "$OUT/summary.txt"
  [ "$rc" -eq 0 ] || failed="$failed $step"
}
: >"$OUT/summary.txt"
for step in $steps; do
  echo "=== $step $(date +%T)"
  case $step in
    probe)
      nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
      python3 -c "import torch, triton, transformers, gguf; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__, 'transformers', transformers.__version__)" ;;
    profile-test)
      run profile-test profile_test.log 240 python3 -m pytest -q -m gpu -rs tests/workers/test_bench_profile.py ;;
    bench)
      run bench engine_issue6.log 480 "${BENCH[@]}" --batch-sizes 1,8,64,128,256 \
        --contexts 1024,4096 --profile 1,64 --output-json "$OUT/engine_issue6.json" ;;
    smollm2)
      if [ -f "$SMOLLM2/config.json" ]; then
        run smollm2 smollm2_gpu.log 300 python3 -m pytest -q -m gpu -rs tests/workers/test_smollm2_gpu.py
      else
        echo "smollm2 skipped: no $SMOLLM2 (carry .xfer/part1 and .xfer/part2, run tools/device/unpack_smollm2.sh)" \
          | tee -a "$OUT/summary.txt"
      fi ;;
    *) echo "unknown step $step (probe profile-test bench smollm2)"; exit 2 ;;
  esac
done
echo "=== done $(date +%T); failed:${failed:- none}"
[ -z "$failed" ]
