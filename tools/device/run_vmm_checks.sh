#!/usr/bin/env bash
# One device run for the VMM memory layer (~4 min on an H200): gpu-marked VMM tests (the
# engine on VMM included), the GPU e2e suite (its worker on VMM: --memory-backend defaults to
# auto = vmm on CUDA), then the VMM benchmark.
# Usage on the device machine (repo root): bash tools/device/run_vmm_checks.sh [steps...]
# steps: probe vmm-test e2e vmm-bench (default: all). Logs, vmm.json and summary.txt land
# under $OUT; the exit status is non-zero if any step failed.
set -uo pipefail
source "$(dirname "$0")/env.sh"
VMM_TESTS="tests/kernels/test_vmm.py tests/workers/test_kv_pool.py tests/workers/test_weight_arena.py tests/workers/test_engine_vmm.py"
steps=${*:-probe vmm-test e2e vmm-bench}
failed=""
run() {  # run STEP LOG TIMEOUT CMD...: tee the log, record a failure
  local step=$1 log=$2 limit=$3; shift 3
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$log" | tail -25
  local rc=${PIPESTATUS[0]}
  echo "$step rc=$rc" | tee -a "$OUT/summary.txt"
  [ "$rc" -eq 0 ] || failed="$failed $step"
}
: >"$OUT/summary.txt"
for step in $steps; do
  echo "=== $step $(date +%T)"
  case $step in
    probe)
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
      python3 -c "import torch, cuda.bindings; print('torch', torch.__version__, 'cuda-bindings', cuda.bindings.__version__, 'gpus', torch.cuda.device_count())"
      python3 -c "import torch; torch.zeros(1, device='cuda'); from kernels.vmm import CudaVmmBackend; b = CudaVmmBackend(0); print('chunk', b.chunk_bytes, 'batched_unmap', b.batched_unmap, 'free/total', b.mem_get_info()); b.close()" ;;
    vmm-test)
      run vmm-test vmm_test.log 240 python3 -m pytest -q -m gpu -rs --durations=8 $VMM_TESTS ;;
    e2e)
      run e2e e2e_gpu.log 240 python3 -m pytest -q -m gpu -rs tests/coordinator/test_serve_gpu.py
      ray stop --force >/dev/null 2>&1 ;;
    vmm-bench)
      run vmm-bench vmm_bench.log 300 python3 -c "from kernels.bench_vmm import run_vmm_bench; run_vmm_bench('$OUT/vmm.json')" ;;
    *) echo "unknown step $step (probe vmm-test e2e vmm-bench)"; exit 2 ;;
  esac
done
echo "=== done $(date +%T); failed:${failed:- none}"
[ -z "$failed" ]
