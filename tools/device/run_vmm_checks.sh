#!/usr/bin/env bash
# One device run for the VMM memory layer: gpu-marked VMM tests, then the VMM benchmark.
# Usage on the device machine (repo root): bash tools/device/run_vmm_checks.sh [steps...]
# steps: probe vmm-test vmm-bench (default: all). Logs and vmm.json land under $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl >"$OUT/pip.log" 2>&1 || { cat "$OUT/pip.log"; exit 1; }
  export PYTHONPATH=/tmp/site:$PWD
else
  export PYTHONPATH=$PWD
fi
VMM_TESTS="tests/kernels/test_vmm.py tests/workers/test_kv_pool.py tests/workers/test_weight_arena.py"
steps=${*:-probe vmm-test vmm-bench}
for step in $steps; do
  echo "=== $step $(date +%T)"
  case $step in
    probe)
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
      python3 -c "import torch, cuda.bindings; print('torch', torch.__version__, 'cuda-bindings', cuda.bindings.__version__, 'gpus', torch.cuda.device_count())"
      python3 -c "import torch; torch.zeros(1, device='cuda'); from kernels.vmm import CudaVmmBackend; b = CudaVmmBackend(0); print('chunk', b.chunk_bytes, 'batched_unmap', b.batched_unmap, 'free/total', b.mem_get_info()); b.close()" ;;
    vmm-test)
      timeout 300 python3 -m pytest -q -m gpu -rs $VMM_TESTS 2>&1 | tee "$OUT/vmm_test.log" | tail -20 ;;
    vmm-bench)
      timeout 420 python3 -c "from kernels.bench_vmm import run_vmm_bench; run_vmm_bench('$OUT/vmm.json')" \
        2>&1 | tee "$OUT/vmm_bench.log" | tail -60 ;;
    *) echo "unknown step $step (probe vmm-test vmm-bench)"; exit 2 ;;
  esac
done
