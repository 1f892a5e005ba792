#!/usr/bin/env bash
# One device run: install carried wheels, then GPU tests and benchmarks, logs under $OUT.
# Usage on the device machine (repo root): bash tools/device/run_gpu_checks.sh [steps...]
# steps: probe kernels-test kernels-bench engine-bench serve e2e (default: all), and
# prefill-depth (not in the default): a 1,024-token prefill chunk by the context it ends at,
# its attention at several tile configurations vs SDPA flash (bench kernels --only chunks), and
# the whole model's chunk time vs its FLOPs (bench engine --chunk-depths; issue #5's tail).
set -uo pipefail
source "$(dirname "$0")/env.sh"
steps=${*:-probe kernels-test kernels-bench engine-bench serve e2e}
for step in $steps; do
  echo "=== $step $(date +%T)"
  case $step in
    probe)
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
      python3 -c "import torch, triton, google.protobuf as p, grpc, ray; print('torch', torch.__version__, 'triton', triton.__version__, 'protobuf', p.__version__, 'grpc', grpc.__version__, 'ray', ray.__version__)"
      python3 -c "from proto.kunserve.v1 import inference_pb2; print('proto ok')" ;;
    kernels-test)
      timeout 300 python3 -m pytest -q -m gpu tests/kernels 2>&1 | tee "$OUT/kernels_test.log" | tail -15 ;;
    prefill-depth)
      timeout 240 python3 -m coordinator.cli bench kernels --only chunks --output-json "$OUT/chunks.json" 2>&1 \
        | tee "$OUT/chunks_bench.log" | tail -30
      timeout 200 python3 -m coordinator.cli bench engine --model llama-3-8b --load-format dummy \
        --max-num-batched-tokens 8192 --batch-sizes 1 --contexts 1024 --steps 4 --no-hf \
        --no-prefill --no-mixed --chunk-depths 1024,2048,4096,7168 \
        --output-json "$OUT/chunk_depths.json" 2>&1 | tee "$OUT/chunk_depths.log" | tail -8 ;;
    kernels-bench)
      timeout 300 python3 -m coordinator.cli bench kernels --output-json "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels_bench.log" ;;
    engine-bench)
      for backend in torch triton; do
        timeout 240 python3 -m coordinator.cli bench engine --model llama-3-8b --load-format dummy \
          --attention-backend $backend --batch-sizes 1,64 --contexts 1024 --steps 16 \
          --max-num-batched-tokens 8192 --output-json "$OUT/engine_$backend.json" 2>&1 | tee -a "$OUT/engine_bench.log"
      done ;;
    serve)
      (python3 -m coordinator.cli serve --model llama-3-8b --load-format dummy --port 50051 \
          --metrics-port 8000 >"$OUT/serve.log" 2>&1 &)
      for i in $(seq 1 120); do grep -q "kunserve: serving" "$OUT/serve.log" && break; sleep 1; done
      tail -3 "$OUT/serve.log"
      python3 -m coordinator.cli generate --max-tokens 16 --temperature 0 "Once upon a time"; echo " [rc=$?]"
      python3 -m coordinator.cli generate --max-tokens 0 "x"; echo " [rc=$? expected non-zero]"
      python3 - <<'PY'
import grpc
from proto.kunserve.v1 import inference_pb2 as pb, inference_pb2_grpc as g
s = g.InferenceServiceStub(grpc.insecure_channel("127.0.0.1:50051"))
print(s.GetServerInfo(pb.GetServerInfoRequest()))
PY
      if [ -n "${REPLAY_ARGS:-}" ]; then
        timeout 330 python3 -m coordinator.cli replay --port 50051 $REPLAY_ARGS --disable-tqdm \
          --save-result --result-dir "$OUT" --result-filename replay.json --plot "$OUT/replay.png" \
          2>&1 | tee "$OUT/replay.log" | tail -45
      fi
      pkill -f "coordinator.cli serve"; sleep 3; ray stop --force >/dev/null 2>&1 ;;
    engine-bench-full)
      timeout 300 python3 -m coordinator.cli bench engine --model llama-3-8b --load-format dummy \
        --batch-sizes 1,8,64,128,256 --contexts 1024,4096 --steps 16 --max-num-batched-tokens 8192 \
        --output-json "$OUT/engine_full.json" 2>&1 | tee "$OUT/engine_full.log" ;;
    e2e)
      timeout 300 python3 -m pytest -q -m gpu tests/coordinator/test_serve_gpu.py 2>&1 | tee "$OUT/e2e_gpu.log" | tail -15 ;;
  esac
done
