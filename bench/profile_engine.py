"""Where a step's time goes on a device: engine phase totals, the host's Python hot spots (cProfile of
the step loop), optionally a torch profile. Drives `LLMEngine` directly on the calling thread.

    python bench/profile_engine.py --shape qwen3-0.6b --requests 256 --output-len 256 --cprofile
    python bench/profile_engine.py --shape llama-3-8b --requests 1 --output-len 128 --temperature 0
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import pstats
import random
import tempfile
import time

from sagellm_core.bench.shapes import write_shape
from sagellm_core.config import EngineConfig
from sagellm_core.engine import LLMEngine
from sagellm_core.sampling_params import SamplingParams


def run(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams) -> None:
    for prompt in prompts:
        engine.add_request(prompt, params, stream=False)
    while engine.has_unfinished():
        engine.step()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="qwen3-0.6b")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--max-num-seqs", type=int, default=512)
    parser.add_argument("--cprofile", action="store_true")
    parser.add_argument("--gc-freeze", action="store_true")
    args = parser.parse_args()
    model_dir = write_shape(args.shape, tempfile.mkdtemp() + "/" + args.shape)
    engine = LLMEngine(EngineConfig.from_dict({
        "model": {"path": str(model_dir), "load_format": "dummy", "dtype": "bfloat16", "max_model_len": 4096},
        "scheduler": {"max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": 16384}}))
    rng = random.Random(0)
    vocab = engine.vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(args.input_len)] for _ in range(args.requests)]
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True, temperature=args.temperature)
    warm = min(args.requests, 256)
    run(engine, [[1] * 4], SamplingParams(max_tokens=8, ignore_eos=True))
    for n in range(warm):  # visit every graph bucket
        engine.add_request([1] * 4, SamplingParams(max_tokens=n + 1, ignore_eos=True), stream=False)
    run(engine, [], params)
    if args.gc_freeze:
        gc.collect()
        gc.freeze()
    before = dict(engine.phase_seconds)
    steps_before = engine.step_counter
    profiler = cProfile.Profile() if args.cprofile else None
    start = time.perf_counter()
    if profiler:
        profiler.enable()
    run(engine, prompts, params)
    if profiler:
        profiler.disable()
    elapsed = time.perf_counter() - start
    steps = engine.step_counter - steps_before
    phases = {k: v - before[k] for k, v in engine.phase_seconds.items()}
    tokens = args.requests * args.output_len
    print(f"{args.shape}: {args.requests} x ({args.input_len} in, {args.output_len} out) in {elapsed:.2f} s, "
          f"{tokens / elapsed:.0f} out tok/s, {steps} steps, {1000 * elapsed / steps:.2f} ms/step"
          f"{' (cProfile on)' if profiler else ''}{' (gc frozen)' if args.gc_freeze else ''}")
    for name, seconds in phases.items():
        print(f"  {name:9s} {1000 * seconds / steps:8.3f} ms/step  ({100 * seconds / elapsed:5.1f}%)")
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
