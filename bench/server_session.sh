#!/usr/bin/env bash
# One H200 session for issue 11 (the server at engine speed). Every run measures the offline engine
# first (`LLM` in-process on the same requests and arrival times, then released), then launches
# `sagellm serve` with the same engine options (the engine core in its own process, the default) and
# prints server / offline: output tok/s, and TTFT / TPOT ratios for finite rates.
#   bench/server_session.sh OUT_DIR [qwen] [llama] [frontends] [inprocess]
# qwen: Qwen3-0.6B shape, 256 requests, lengths 100..1024, rates inf and 16 req/s (one launch);
# llama: Llama-3-8B shape at rate inf; frontends: Qwen3 at rate inf with --api-server-count 2;
# inprocess: Qwen3 at rate inf with --no-engine-process (the one-process server, for the A/B).
# No names: qwen llama frontends inprocess (about 8 min on an H200: split it over two device calls,
# `qwen llama` then `frontends inprocess`). pyzmq must be importable or its wheel be in .whl/core.
set -uo pipefail
out=${1:?usage: $0 OUT_DIR [qwen] [llama] [frontends] [inprocess]}
shift
runs=("$@")
[ ${#runs[@]} -eq 0 ] && runs=(qwen llama frontends inprocess)
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
cd "$(dirname "$0")/.."
source bench/device_install.sh
mkdir -p "$out"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
python3 -c "import torch, transformers, zmq; print('torch', torch.__version__, 'transformers', transformers.__version__, 'pyzmq', zmq.__version__, torch.cuda.get_device_name())" | tee "$out/versions.txt"
engine=(--backend cuda --dtype bfloat16 --max-num-seqs 512 --max-num-batched-tokens 16384)
workload=(--num-requests 256 --min-input-len 100 --max-input-len 1024 --min-output-len 100 --max-output-len 1024)

serve() {  # serve NAME SHAPE ARGS...
  local name=$1 shape=$2
  shift 2
  echo "== $name" | tee "$out/$name.log"
  timeout 420 python3 -m sagellm_core bench serve --launch --compare offline --model-shape "$shape" "${engine[@]}" \
    "${workload[@]}" "$@" --output-dir "$out/$name" 2>&1 | tee -a "$out/$name.log" \
    | grep -E "server / offline|^\| (inf|16)|Error|error" | grep -v "^\s*$"
}

for run in "${runs[@]}"; do
  case $run in
    qwen) serve qwen-inf-16 qwen3-0.6b --request-rate inf 16 ;;
    llama) serve llama-inf llama-3-8b --request-rate inf ;;
    frontends) serve qwen-inf-2frontends qwen3-0.6b --request-rate inf --api-server-count 2 ;;
    inprocess) serve qwen-inf-inprocess qwen3-0.6b --request-rate inf --no-engine-process ;;
    *) echo "unknown run $run" >&2 ;;
  esac
done
