#!/usr/bin/env bash
# A/B of two sageLLM checkouts on one device machine, alternated in one call: REF (another checkout,
# e.g. the commit before a refactor exported with `git archive`) and this one, each installed in turn
# and measured with its own bench/run_gpu_bench.sh, peers off.
#   bench/ab_checkouts.sh OUT_DIR REF_DIR [throughput] [latency] [prefix]
# ROUNDS (default 2) alternations of ref, new. Each side's logs land under OUT_DIR/<side>-<round>/.
set -uo pipefail
out=${1:?usage: $0 OUT_DIR REF_DIR [bench...]}
ref=${2:?usage: $0 OUT_DIR REF_DIR [bench...]}
shift 2
benches=("$@")
[[ ${#benches[@]} -eq 0 ]] && benches=(throughput latency)
new=$(cd "$(dirname "$0")/.." && pwd)
ref=$(cd "$ref" && pwd)
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false NO_PEERS=1 PYTHON=python3

install() {
    local dir=$1 args=(-e "$1" -e "$1/sagellm_cuda")
    [[ -d "$dir/plugins/sagellm-bench" ]] && args+=(-e "$dir/plugins/sagellm-bench")
    python3 -m pip install -q --no-deps --no-build-isolation --no-index "${args[@]}" 2>&1 | tail -2
}

mkdir -p "$out"
for round in $(seq 1 "${ROUNDS:-2}"); do
    for side in ref new; do
        dir=$([[ $side == ref ]] && echo "$ref" || echo "$new")
        echo "=== round $round: $side ($dir)"
        install "$dir"
        (cd "$dir" && bash bench/run_gpu_bench.sh "$out/$side-$round" "${benches[@]}") 2>&1 \
            | grep -E "^\| sageLLM|^==|Error|error" | head -40
    done
done
install "$new"
