#!/usr/bin/env bash
# One device run for CUDA graphs (issue 6): install carried wheels, the graph GPU tests, then the
# engine bench with graphs (eager beside each point, the captured graph's replay time and the
# host gap per step, prefill at 8k tokens vs the bf16 matmul rate, HF transformers decode
# baseline) and the bench with --enforce-eager. Logs under $OUT.
# Usage on the device machine (repo root): bash tools/device/run_graph_checks.sh [steps...]
# steps: probe test bench-quick bench bench-eager; default: probe test bench-quick (about
# 3 minutes on one H200: batches 1,64,128 at 1k context); bench is the full grid (5 minutes).
set -uo pipefail
source "$(dirname "$0")/env.sh"
BENCH=(python3 -m coordinator.cli bench engine --model llama-3-8b --load-format dummy
       --steps 16 --max-num-batched-tokens 8192)
steps=${*:-probe test bench-quick}
for step in $steps; do
  echo "=== $step $(date +%T)"
  case $step in
    probe)
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
      python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)" ;;
    test)
      timeout 240 python3 -m pytest -q -m gpu tests/workers/test_cuda_graphs.py 2>&1 \
        | tee "$OUT/graph_test.log" | tail -25 ;;
    bench-quick)
      timeout 220 "${BENCH[@]}" --batch-sizes 1,64,128 --contexts 1024 \
        --output-json "$OUT/engine_quick.json" 2>&1 | tee "$OUT/engine_quick.log" ;;
    bench)
      timeout 240 "${BENCH[@]}" --batch-sizes 1,8,64,128,256 --contexts 1024,4096 \
        --output-json "$OUT/engine_graphs.json" 2>&1 | tee "$OUT/engine_graphs.log" ;;
    bench-eager)
      timeout 120 "${BENCH[@]}" --enforce-eager --batch-sizes 1,64 --contexts 1024 \
        --no-prefill --no-hf --output-json "$OUT/engine_eager.json" 2>&1 | tee "$OUT/engine_eager.log" ;;
  esac
done
