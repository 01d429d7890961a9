#!/usr/bin/env bash
# One device call: GPU tests, then FP8 against bf16 in the same run on the same machine:
# Llama-3-8B batch-1 decode with --quantization fp8 vs none, and the nano-vllm workload (Qwen3-0.6B)
# with --kv-cache-dtype fp8 vs auto (only with the argument kv). Peers off (the peer is the other
# setting). GPU_TESTS (default tests/gpu) names the tests run first. Before the benchmarks, the decode GEMM kernels on Llama-3-8B's shapes (bench/kernels/fp8_gemv_bench.py).
#   bench/fp8_session.sh OUT_DIR [kv]
set -uo pipefail
out=${1:?usage: $0 OUT_DIR [kv]}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
cd "$(dirname "$0")/.."
source bench/device_install.sh
mkdir -p "$out"
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
timeout 200 python3 -m pytest ${GPU_TESTS:-tests/gpu} -q -p no:cacheprovider --timeout 120 2>&1 | tee "$out/gpu_tests.log" | tail -12
PYTHONPATH=${PYTHONPATH:-}:.:sagellm_cuda timeout 120 python3 bench/kernels/fp8_gemv_bench.py 2>&1 | tee "$out/fp8_gemv.log"
common=(--backend cuda --dtype bfloat16)
for q in none fp8; do
  echo "== latency llama-3-8b --quantization $q"
  timeout 150 python3 -m sagellm_core bench latency --model-shape llama-3-8b "${common[@]}" --input-len 128 \
    --output-len 256 --quantization "$q" --output-dir "$out/latency-$q" 2>&1 | tee "$out/latency-$q.log" \
    | grep -E "^\| sageLLM|floor|Error"
done
[ "${2:-}" = kv ] && for kv in auto fp8; do
  echo "== throughput qwen3-0.6b --kv-cache-dtype $kv"
  timeout 150 python3 -m sagellm_core bench throughput --model-shape qwen3-0.6b "${common[@]}" --max-num-seqs 512 \
    --max-num-batched-tokens 16384 --kv-cache-dtype "$kv" --output-dir "$out/throughput-$kv" 2>&1 \
    | tee "$out/throughput-$kv.log" | grep -E "^\| sageLLM|Error"
done
