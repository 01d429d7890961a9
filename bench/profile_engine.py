"""Where a step's time goes on a device: engine phase totals, the host's Python hot spots (cProfile of
the step loop), and with ``--kernels`` the device kernels of steady decode steps (torch profiler):
GPU-busy time per step against wall time per step, kernels per step, the top kernels.
Drives `LLMEngine` directly on the calling thread.

    python bench/profile_engine.py --shape qwen3-0.6b --requests 256 --output-len 256 --cprofile
    python bench/profile_engine.py --shape llama-3-8b --requests 1 --output-len 128 --temperature 0 --kernels
    python bench/profile_engine.py ... --variants sync,async,async+fused   # A/B on one engine
    python bench/profile_engine.py ... --sampling logprobs=5 --sampling top_k=50   # other sampling parameters
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import pstats
import random
import tempfile
import time

from sagellm_bench.shapes import write_shape  # the sagellm-bench plugin (scripts/setup.sh installs it)
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
    parser.add_argument("--sampling", action="append", default=[], metavar="KEY=VALUE",
                        help="a SamplingParams field for every request (repeatable; values parsed as numbers)")
    parser.add_argument("--kv-cache-dtype", default="auto", choices=["auto", "fp8"])
    parser.add_argument("--cprofile", action="store_true")
    parser.add_argument("--gc-freeze", action="store_true")
    parser.add_argument("--async-scheduling", default="auto", choices=["auto", "on", "off"])
    parser.add_argument("--kernels", action="store_true", help="torch-profile 20 steady decode steps")
    parser.add_argument("--variants", default="config",
                        help="comma-separated timed runs on one engine: config (as built), sync, async, "
                             "sync+fused, async+fused (+fused: the backend's one-pass sampler)")
    args = parser.parse_args()
    model_dir = write_shape(args.shape, tempfile.mkdtemp() + "/" + args.shape)
    engine = LLMEngine(EngineConfig.from_dict({
        "model": {"path": str(model_dir), "load_format": "dummy", "dtype": "bfloat16", "max_model_len": 4096},
        "scheduler": {"max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": 16384,
                      "async_scheduling": args.async_scheduling},
        "kv_cache": {"dtype": args.kv_cache_dtype}}))
    rng = random.Random(0)
    vocab = engine.vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(args.input_len)] for _ in range(args.requests)]
    extra = {key: float(value) if "." in value else int(value)
             for key, value in (item.split("=", 1) for item in args.sampling)}
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True, temperature=args.temperature, **extra)
    warm = min(args.requests, 256)
    run(engine, [[1] * 4], SamplingParams(max_tokens=8, ignore_eos=True))
    for n in range(warm):  # visit every graph bucket
        engine.add_request([1] * 4, SamplingParams(max_tokens=n + 1, ignore_eos=True), stream=False)
    run(engine, [], params)
    if args.gc_freeze:
        gc.collect()
        gc.freeze()
    fused = engine.sampler.fused
    for variant in args.variants.split(","):
        if variant != "config":  # same engine, same weights: flip the two switches between runs
            engine.async_scheduling = variant.startswith("async")
            engine.sampler.fused = fused if variant.endswith("+fused") else None
        timed_run(engine, prompts, params, args)
    if args.kernels:
        profile_kernels(engine, prompts, params)


def timed_run(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams, args: argparse.Namespace) -> None:
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
    tokens = len(prompts) * params.max_tokens
    print(f"async scheduling: {engine.async_scheduling}; fused sampler: {engine.sampler.fused is not None}; "
          f"sampling: {args.sampling or 'temperature only'}")
    print(f"{args.shape}: {len(prompts)} x ({args.input_len} in, {args.output_len} out) in {elapsed:.2f} s, "
          f"{tokens / elapsed:.0f} out tok/s, {steps} steps, {1000 * elapsed / steps:.2f} ms/step"
          f"{' (cProfile on)' if profiler else ''}{' (gc frozen)' if args.gc_freeze else ''}")
    for name, seconds in phases.items():
        print(f"  {name:9s} {1000 * seconds / steps:8.3f} ms/step  ({100 * seconds / elapsed:5.1f}%)")
    if profiler:
        pstats.Stats(profiler).sort_stats("tottime").print_stats(18)


def profile_kernels(engine: LLMEngine, prompts: list[list[int]], params: SamplingParams, steps: int = 20) -> None:
    """Torch-profile ``steps`` decode steps once every request is decoding."""
    from torch.profiler import ProfilerActivity, profile

    for prompt in prompts:
        engine.add_request(prompt, params.replace(max_tokens=max(params.max_tokens, steps + 10)), stream=False)
    while any(r.in_prefill for r in engine.scheduler.running) or engine.scheduler.waiting:
        engine.step()
    for _ in range(3):
        engine.step()
    engine.backend.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            engine.step()
        engine.backend.synchronize()
        wall = time.perf_counter() - start
    kernels = [e for e in prof.events() if e.device_type.name == "CUDA"]
    busy_us = sum(e.device_time for e in kernels)
    print(f"kernel profile, batch {len(engine.scheduler.running)}: wall {1000 * wall / steps:.3f} ms/step, "
          f"GPU busy {busy_us / 1000 / steps:.3f} ms/step, {len(kernels) / steps:.0f} kernels/step")
    print(prof.key_averages().table(sort_by="device_time_total", row_limit=25, max_name_column_width=70))
    engine.abort_all()


if __name__ == "__main__":
    main()
