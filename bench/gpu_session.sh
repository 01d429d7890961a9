#!/usr/bin/env bash
# One device-machine session: install sageLLM + sagellm-cuda from this checkout (offline), record the
# card, run the GPU tests, then the benchmarks named as arguments (see bench/run_gpu_bench.sh).
#   bench/gpu_session.sh OUT_DIR [tests|smoke] [profile] [ab] [throughput] [latency] [prefix]
# smoke: the engine and sampler GPU tests only; profile: bench/profile_engine.py A/B runs (synchronous
# vs async scheduling, torch vs fused sampler) and kernel tables for both benchmark shapes; ab: batch-1
# Llama-3-8B step time under the kernel switches (SAGELLM_FUSED_RESIDUAL_GEMM, SAGELLM_FUSED).
set -uo pipefail
out=${1:?usage: $0 OUT_DIR [tests] [bench...]}
shift
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
cd "$(dirname "$0")/.."
source bench/device_install.sh
mkdir -p "$out"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
benches=()
for name in "$@"; do
  if [ "$name" = tests ]; then
    python3 -m pytest tests/gpu -q -x -p no:cacheprovider 2>&1 | tee "$out/gpu_tests.log" | tail -15
  elif [ "$name" = smoke ]; then
    python3 -m pytest tests/gpu/test_cuda_engine.py tests/gpu/test_sampling_kernel.py tests/gpu/test_triton_attention.py \
      -q -x -p no:cacheprovider \
      2>&1 | tee "$out/gpu_smoke.log" | tail -15
  elif [ "$name" = ab ]; then
    # Llama-3-8B batch 1 under each kernel switch (A/B against the default build, same machine).
    for switch in default SAGELLM_FUSED_RESIDUAL_GEMM=1 SAGELLM_FUSED=0; do
      echo "== $switch"
      env ${switch/default/} python3 bench/profile_engine.py --shape llama-3-8b --requests 1 --input-len 128 \
        --output-len 256 --temperature 0 --variants async+fused,async+fused $([ $switch = default ] && echo --kernels) \
        2>&1 | tee -a "$out/ab_llama.log" | grep "ms/step"
    done
  elif [ "$name" = profile ]; then
    python3 bench/profile_engine.py --shape qwen3-0.6b --requests 256 --input-len 512 --output-len 256 \
      --variants sync,async,async+fused --kernels 2>&1 | tee "$out/profile_qwen3.log" | grep -v "^ *aten::"
    python3 bench/profile_engine.py --shape llama-3-8b --requests 1 --input-len 128 --output-len 256 \
      --temperature 0 --variants sync,async,async+fused --kernels 2>&1 | tee "$out/profile_llama.log" | grep -v "^ *aten::"
  else
    benches+=("$name")
  fi
done
if [ ${#benches[@]} -gt 0 ]; then
  PYTHON=python3 bash bench/run_gpu_bench.sh "$out" "${benches[@]}"
fi
