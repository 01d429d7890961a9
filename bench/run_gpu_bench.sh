#!/usr/bin/env bash
# The GPU benchmark set of the issue "sagellm-cuda speed", in one call:
#
#   bench/run_gpu_bench.sh OUTPUT_DIR [throughput] [latency] [prefix]
#
#   throughput  Qwen3-0.6B shape (random weights), bf16, nano-vllm's workload (256 requests, prompt and
#               output lengths 100..1024, seed 0) and nano-vllm's engine budgets (512 seqs, 16384
#               batched tokens); peers: transformers generate (static batches of 128) and transformers
#               continuous batching, same weights, same run.
#   latency     Llama-3-8B shape (random weights), bf16, batch 1, 128 prompt + 256 output tokens;
#               peer: transformers generate batch 1; weight-read floor from measured bandwidth.
#   prefix      Qwen3-0.6B shape, bf16, 8 shared 512-token system prompts x 8 requests, prefix_lru vs no_reuse.
#
# With no bench names, all three run. Each writes <name>.json / .md / _*.png under OUTPUT_DIR/<bench>/
# and its console output to OUTPUT_DIR/<bench>.log. Needs a CUDA build of torch, sagellm-cuda and the
# bench plugin (plugins/sagellm-bench, which adds `sagellm bench`) installed (the backend is forced to
# `cuda`, so a missing plugin fails loudly instead of running on CPU).
# Environment overrides: PYTHON (interpreter), MAX_NUM_SEQS, MAX_NUM_BATCHED_TOKENS, NO_PEERS=1 (sageLLM only),
# HF_CONTINUOUS=on|off|auto (transformers' continuous batching as a second throughput peer).
set -uo pipefail

if [[ $# -lt 1 ]]; then
    echo "usage: $0 OUTPUT_DIR [throughput] [latency] [prefix]" >&2
    exit 2
fi
out=$1
shift
benches=("$@")
[[ ${#benches[@]} -eq 0 ]] && benches=(throughput latency prefix)

root="$(cd "$(dirname "$0")/.." && pwd)"
default_python=python3
[[ -x "$root/.venv/bin/python" ]] && default_python="$root/.venv/bin/python"
python=${PYTHON:-$default_python}
common=(--backend cuda --dtype bfloat16)
peers=(--compare hf)
[[ ${NO_PEERS:-0} == 1 ]] && peers=()
continuous=(--hf-continuous "${HF_CONTINUOUS:-auto}")
[[ ${NO_PEERS:-0} == 1 ]] && continuous=()
budgets=(--max-num-seqs "${MAX_NUM_SEQS:-512}" --max-num-batched-tokens "${MAX_NUM_BATCHED_TOKENS:-16384}")

mkdir -p "$out"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1 || true

run_bench() {
    local name=$1
    shift
    echo "== $name: sagellm $*" | tee "$out/$name.log"
    (cd "$root" && "$python" -m sagellm_core "$@" --output-dir "$out/$name") 2>&1 | tee -a "$out/$name.log"
    return "${PIPESTATUS[0]}"
}

failed=()
for bench in "${benches[@]}"; do
    case $bench in
        throughput)
            run_bench throughput bench throughput --model-shape qwen3-0.6b "${common[@]}" "${budgets[@]}" \
                "${peers[@]}" "${continuous[@]}" --hf-batch-size 128 || failed+=(throughput) ;;
        latency)
            run_bench latency bench latency --model-shape llama-3-8b "${common[@]}" \
                --input-len 128 --output-len 256 "${peers[@]}" || failed+=(latency) ;;
        prefix)
            run_bench prefix bench prefix --model-shape qwen3-0.6b "${common[@]}" "${budgets[@]}" \
                --num-groups 8 --requests-per-group 8 --prefix-len 512 --suffix-len 32 --output-len 32 \
                || failed+=(prefix) ;;
        *)
            echo "unknown bench: $bench (throughput, latency, prefix)" >&2
            failed+=("$bench") ;;
    esac
done

if [[ ${#failed[@]} -gt 0 ]]; then
    echo "failed: ${failed[*]}" >&2
    exit 1
fi
echo "all outputs under $out"
