#!/usr/bin/env bash
# One device-machine session for the fused kernels (sagellm_cuda/sagellm_cuda/fused.py): install (as
# bench/gpu_session.sh does), kernel timings, then the engine A/B (SAGELLM_FUSED=0 vs 1, same machine,
# same run) at batch 1 (Llama-3-8B shape) and batch 256 (Qwen3-0.6B shape), then the GPU tests.
#   bench/kernels/fused_session.sh OUT_DIR [no-tests]
set -uo pipefail
out=${1:?usage: $0 OUT_DIR [no-tests]}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
cd "$(dirname "$0")/../.."
wheels=(.whl/core/*.whl)
python3 -c 'import pytest' 2>/dev/null || wheels+=(.whl/attn/*.whl)
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${wheels[@]}"
export PYTHONPATH=/tmp/site
python3 -m pip install -q --no-deps --no-build-isolation --no-index -e . -e sagellm_cuda 2>&1 | tail -2
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
timeout 150 python3 bench/kernels/check_fused.py 2>&1 | tee "$out/check_fused.log" | grep -v Warning
for fused in 0 1; do
  echo "== SAGELLM_FUSED=$fused llama-3-8b batch 1"
  SAGELLM_FUSED=$fused timeout 180 python3 bench/profile_engine.py --shape llama-3-8b --requests 1 --input-len 128 \
    --output-len 128 --temperature 0 2>&1 | tee -a "$out/profile.log" | grep -A5 "out tok/s"
done
for fused in 0 1; do
  echo "== SAGELLM_FUSED=$fused qwen3-0.6b batch 256"
  SAGELLM_FUSED=$fused timeout 150 python3 bench/profile_engine.py --shape qwen3-0.6b --requests 256 --input-len 512 \
    --output-len 256 2>&1 | tee -a "$out/profile.log" | grep -A5 "out tok/s"
done
if [ "${2:-}" != no-tests ]; then
  timeout 240 python3 -m pytest tests/gpu -q -p no:cacheprovider -rfE 2>&1 | tee "$out/gpu_tests.log" | tail -25
fi
