#!/usr/bin/env bash
# KV tiers on a device machine (issue 14): install sageLLM + sagellm-cuda + the bench plugin from this
# checkout (offline, as bench/gpu_session.sh), then `sagellm bench multiturn` with the KV tiers off and
# on in one invocation for the Qwen3-0.6B and Llama-3-8B shapes (random weights), the working set 5x
# the device KV pool, the host tier twice the pool, the disk tier on local disk.
#   bench/tiers_session.sh OUT_DIR
# Targets: mean TTFT >= 3x lower and output tok/s >= 1.5x higher with tiers than device-only prefix
# caching, combined hit rate >= 80%, host load rate >= 70% of the measured pinned-copy bandwidth.
set -uo pipefail
out=${1:?usage: $0 OUT_DIR}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
cd "$(dirname "$0")/.."
source bench/device_install.sh
mkdir -p "$out"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
python3 -m pytest tests/test_kv_tiers.py -q -x -p no:cacheprovider -k "not randomized" 2>&1 | tail -3 | tee "$out/tier_tests.log"
for shape in qwen3-0.6b llama-3-8b; do
  disk=$(mktemp -d /tmp/sagellm-kv-disk.XXXXXX)
  sagellm bench multiturn --model-shape "$shape" --num-conversations 32 --num-turns 4 --system-len 1024 \
    --user-len 256 --output-len 32 --working-set-factor 5 --disk-tier-path "$disk" \
    --output-dir "$out/multiturn-$shape" 2>&1 | tee "$out/multiturn-$shape.log" | grep -v "^\[" | tail -40
  rm -rf "$disk"
done
