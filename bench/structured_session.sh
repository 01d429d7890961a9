#!/usr/bin/env bash
# One device call: structured-output throughput (issue 13) on a GPU, Qwen3-0.6B shape, random
# weights, bf16: bench/structured_bench.py, unconstrained vs a JSON-schema constraint on every
# request, same requests and token counts, rounds alternating, at 32 and 256 requests.
#   bench/structured_session.sh OUT_DIR
# Before the call, on the development machine (both land in .whl/, which the call carries):
#   pip download llguidance==1.9.1 --only-binary :all: --no-deps --python-version 3.12 \
#       --platform manylinux_2_28_x86_64 -d .whl/core          # abi3 wheel, no other dependencies
#   mkdir -p .whl/tokenizer && cp ~/.cache/sagellm/models/SmolLM2-135M-Instruct/tokenizer* \
#       ~/.cache/sagellm/models/SmolLM2-135M-Instruct/chat_template.jinja .whl/tokenizer/
# The grammar needs a real tokenizer; the shapes have none, so the default model's (49,152 tokens)
# is used: the shape's other 102,784 ids are masked in constrained rows and decode to nothing.
set -uo pipefail
out=${1:?usage: $0 OUT_DIR}
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
cd "$(dirname "$0")/.."
source bench/device_install.sh
mkdir -p "$out"
nvidia-smi > "$out/nvidia-smi.txt" 2>&1
tokenizer=${TOKENIZER_DIR:-.whl/tokenizer}
python3 -c "import llguidance" || { echo "llguidance is not installed: put its wheel in .whl/core (see the header)"; exit 2; }
[ -f "$tokenizer/tokenizer.json" ] || { echo "no $tokenizer/tokenizer.json (see the header)"; exit 2; }
for requests in 32 256; do
  echo "== $requests requests x 256 tokens"
  timeout 240 python3 bench/structured_bench.py --model-shape qwen3-0.6b --tokenizer "$tokenizer" --backend cuda \
    --dtype bfloat16 --requests "$requests" --max-tokens 256 --max-num-seqs 512 --rounds 3 \
    2>&1 | tee "$out/structured-$requests.log" | grep -vE "^(Loading|Writing)"
done
