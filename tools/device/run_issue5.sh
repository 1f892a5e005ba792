#!/usr/bin/env bash
# One device run for issue #5 on 2 GPUs: a forced drop and restore under live decode
# (`kunserve bench drop`), then the burst replay with
# --overload-policy drop vs recompute. Logs and JSON under $OUT.
# Usage (repo root, nvidia-h200-x2): bash tools/device/run_issue5.sh [steps...]
# steps: gpu-tests mixed-bench pack-probe exchange-probe drop-bench replay sizing (default: gpu-tests
# drop-bench replay). exchange-probe: where a drop's first KV exchange spends its time
# (tools/device/exchange_probe.py).
# sizing: a server whose KV cache is sized from --gpu-memory-utilization ${UTIL:-0.85} (the graphs
# counted), its device memory beside the budget, then one drop bench cycle on it. MEMORY=vmm|torch (default vmm);
# POLICIES (default "recompute drop") picks the replay's overload policies; TRACE and START
# (default azure-code, 824), DURATION (60 s) and TIME_SCALE (1) its window (a policy "drop@N"
# serves with --pipeline-max-num-batched-tokens N, "drop+cost" with --pipeline-chunk-cost
# attention); KV_BLOCKS the KV
# cache per GPU (16-token blocks); GOODPUT the replay's SLOs (default "ttft:2000 tpot:100");
# EXCHANGE_BYTES (drop-bench) one server per --kv-exchange-bytes-per-step value; CYCLES
# (drop-bench, default 2) the drop and restore cycles on each server; SERVE_EXTRA (replay)
# more flags for every replay server (e.g. "--max-compute-use 0.6").
set -uo pipefail
source "$(dirname "$0")/env.sh"
steps=${*:-gpu-tests drop-bench replay}
MEMORY=${MEMORY:-vmm}
KV_BLOCKS=${KV_BLOCKS:-2048}  # 16-token blocks of 128 KiB/token: 4 GiB of KV per GPU
SERVE=(python3 -m coordinator.cli serve --model llama-3-8b --load-format dummy --port 50051
       --metrics-port 8000 --memory-backend "$MEMORY" --max-num-batched-tokens 8192)
FIXED_KV=(--num-kv-blocks "$KV_BLOCKS")  # every step but sizing

start_server() {  # $1: log name; the rest: extra serve flags
  local log="$OUT/$1.log"; shift
  ("${SERVE[@]}" "$@" >"$log" 2>&1 &)
  for _ in $(seq 1 300); do grep -q "kunserve: serving" "$log" && return 0; sleep 1; done
  echo "server did not start"; tail -30 "$log"; return 1
}
stop_server() { pkill -f "coordinator.cli serve"; sleep 3; ray stop --force >/dev/null 2>&1; }

for step in $steps; do
  echo "=== $step $(date +%T)"
  case $step in
    gpu-tests)
      timeout 150 python3 -m pytest -q -m gpu -x tests/workers/test_pipeline.py 2>&1 | tee "$OUT/gpu_pipeline.log" | tail -15
      timeout 300 python3 -m pytest -q -m gpu tests/workers/test_stage_memory.py \
        tests/workers/test_remote_attention.py tests/workers/test_cuda_graphs.py tests/attention/test_transport.py \
        tests/workers/test_piecewise_graphs.py tests/workers/test_engine_vmm.py tests/kernels/test_triton_kernels.py \
        tests/kernels/test_block_copy.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -8 ;;
    mixed-bench)
      # Mixed steps (a prefill chunk + 32 decodes) through the piecewise graphs vs eager, on
      # one GPU: the engine bench's mixed section alone (one decode point to build the engine).
      timeout 300 python3 -m coordinator.cli bench engine --model llama-3-8b --load-format dummy \
        --max-num-batched-tokens 8192 --batch-sizes 1 --contexts 1024 --steps 4 --no-hf --no-prefill \
        --output-json "$OUT/mixed_bench.json" 2>&1 | tee "$OUT/mixed_bench.log" | tail -12
      timeout 120 python3 -m kernels.bench --only mixed 2>&1 | tee "$OUT/mixed_attention.log" | tail -6 ;;
    pack-probe)
      # The first micro-batch body's packing in a fresh process, new (copies) vs old
      # (torch.cat, whose lazy CUDA load stalled the first drop's first step): host time.
      for v in old new old new; do timeout 60 python3 tools/device/pack_probe.py "$v" 2>&1 | tail -1; done \
        | tee "$OUT/pack_probe.log" ;;
    exchange-probe)
      timeout 180 python3 tools/device/exchange_probe.py "$OUT/exchange_probe.json" 2>&1 \
        | tee "$OUT/exchange_probe.log" | tail -20 ;;
    drop-bench)
      # EXCHANGE_BYTES: a server per value of --kv-exchange-bytes-per-step (outputs suffixed
      # _x<value>); unset: one server with the default.
      for xb in ${EXCHANGE_BYTES:-default}; do
        extra=(); sfx=""
        if [[ $xb != default ]]; then extra=(--kv-exchange-bytes-per-step "$xb"); sfx="_x$xb"; fi
        # The first pipelined steps' phases are timed after device syncs (the gap's breakdown;
        # SYNC_PHASES=0 leaves the server unsynced, as it serves by default).
        KUNSERVE_SYNC_STEP_PHASES=${SYNC_PHASES:-1} start_server "serve_drop$sfx" "${FIXED_KV[@]}" --overload-policy drop --no-auto-transitions "${extra[@]}" || continue
        # Two cycles on one server: what the second drop no longer pays was a one-time cost.
        # Triton kernels compiled during each cycle are listed (a first-drop cost suspect).
        cache=${TRITON_CACHE_DIR:-$HOME/.triton/cache}
        for cycle in $(seq 1 "${CYCLES:-2}"); do
          touch /tmp/cycle_marker
          timeout 240 python3 -m coordinator.cli bench drop --num-requests 16 --prompt-len 1024 \
            --max-tokens 6000 --phase-s 4 --weight-gb 14.96 \
            --output-json "$OUT/drop_bench$sfx$cycle.json" 2>&1 | tee "$OUT/drop_bench$sfx$cycle.log"
          find "$cache" -newer /tmp/cycle_marker -name "*.json" ! -name "__grp__*" 2>/dev/null \
            | xargs -r -n1 basename | sort | uniq -c | tee "$OUT/triton_compiled$sfx$cycle.log"
        done
        grep -E "drop:|drop on worker|drop switch|restore|pipeline step|kv exchange|CUDA graphs: kept|captured the decode graph|Traceback|Error" "$OUT/serve_drop$sfx.log" | tail -60
        grep -E "steady pipelined|stage [0-9]+ device:" "$OUT/serve_drop$sfx.log"
        stop_server
      done ;;
    sizing)
      start_server serve_sizing --overload-policy drop --no-auto-transitions \
        --gpu-memory-utilization "${UTIL:-0.85}" || continue
      grep -E "KV cache|CUDA graphs: captured|Triton:" "$OUT/serve_sizing.log" | cut -c 1-300
      nvidia-smi --query-gpu=index,memory.used,memory.total --format=csv | tee "$OUT/sizing_memory.log"
      echo "budget per GPU: ${UTIL:-0.85} x total"
      timeout 200 python3 -m coordinator.cli bench drop --num-requests 16 --prompt-len 1024 \
        --max-tokens 6000 --phase-s 4 --weight-gb 14.96 --output-json "$OUT/drop_bench_sized.json" \
        2>&1 | tee "$OUT/drop_bench_sized.log" | tail -8
      stop_server ;;
    replay)
      for spec in ${POLICIES:-recompute drop}; do
        # drop@N: the drop policy with --pipeline-max-num-batched-tokens N (outputs drop_bN);
        # drop+cost: with --pipeline-chunk-cost attention (outputs drop_cost)
        extra=()
        if [[ $spec == *+cost ]]; then spec=${spec%+cost}; extra=(--pipeline-chunk-cost attention); fi
        policy=${spec%@*}; name=$policy
        if [[ $spec == *@* ]]; then extra+=(--pipeline-max-num-batched-tokens "${spec#*@}"); name="${policy}_b${spec#*@}"; fi
        if [[ ${#extra[@]} -gt 0 && ${extra[0]} == --pipeline-chunk-cost ]]; then name="${name}_cost"; fi
        # shellcheck disable=SC2206  # SERVE_EXTRA: more serve flags, split on spaces
        start_server "serve_$name" "${FIXED_KV[@]}" --overload-policy "$policy" --planner-cooldown-s 5 "${extra[@]}" ${SERVE_EXTRA:-} || continue
        touch /tmp/replay_marker; echo "replay starts $(date +%T.%N)" | tee "$OUT/replay_${name}_clock.log"
        timeout 200 python3 -m coordinator.cli replay --port 50051 --trace "${TRACE:-azure-code}" \
          --start "${START:-824}" --duration "${DURATION:-60}" --time-scale ${TIME_SCALE:-1} --max-output-len 512 \
          --drain-timeout 60 --disable-tqdm --save-result --result-dir "$OUT" \
          --result-filename "replay_$name.json" --plot "$OUT/replay_$name.png" --label "$name" \
          --goodput ${GOODPUT:-ttft:2000 tpot:100} --save-detailed \
          2>&1 | tee "$OUT/replay_$name.log" | tail -30
        grep -E "drop:|drop switch|restore|decision|kv exchange|pipeline step|CUDA graphs: kept|Traceback|Error|WARNING" "$OUT/serve_$name.log" | tail -40
        grep -E "steady pipelined|stage [0-9]+ device:" "$OUT/serve_$name.log"
        # Triton kernels compiled while serving, with the time each was written (stall suspects)
        find "${TRITON_CACHE_DIR:-$HOME/.triton/cache}" -newer /tmp/replay_marker -name "*.json" ! -name "__grp__*" \
          -printf "%TT %f\n" 2>/dev/null | sort >> "$OUT/replay_${name}_clock.log"
        stop_server
      done ;;
  esac
done
# A call brings back only a few files: the logs travel as one archive, named for the steps so
# that a second invocation into the same $OUT does not overwrite the first one's.
archive="logs_$(echo "$steps" | tr ' ' '-')_$(date +%H%M%S).tgz"
# KUNSERVE_STAGE_TRACE_DIR=$OUT/trace (the stages' micro-batch traces) travels in it too.
(cd "$OUT" && tar czf "$archive" ./*.log $([[ -d trace ]] && echo ./trace) && rm -rf ./*.log ./trace)
echo "logs: $OUT/$archive"
