"""Where a step's time goes on a device: engine phase totals and a torch profile of decode steps.

    python bench/profile_engine.py --shape qwen3-0.6b --requests 256 --output-len 256
    python bench/profile_engine.py --shape llama-3-8b --requests 1 --output-len 128 --torch-profile
"""

from __future__ import annotations

import argparse
import random
import time

import torch

import tempfile

from sagellm_core.bench.shapes import write_shape
from sagellm_core.llm import LLM
from sagellm_core.sampling_params import SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="qwen3-0.6b")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--max-num-seqs", type=int, default=512)
    parser.add_argument("--torch-profile", action="store_true")
    args = parser.parse_args()
    model_dir = write_shape(args.shape, tempfile.mkdtemp() + "/" + args.shape)
    llm = LLM(config={"model": {"path": str(model_dir), "load_format": "dummy", "dtype": "bfloat16",
                                "max_model_len": 4096},
                      "scheduler": {"max_num_seqs": args.max_num_seqs, "max_num_batched_tokens": 16384}})
    rng = random.Random(0)
    vocab = llm.engine.vocab_size
    prompts = [[rng.randrange(vocab) for _ in range(args.input_len)] for _ in range(args.requests)]
    params = SamplingParams(max_tokens=args.output_len, ignore_eos=True, temperature=args.temperature)
    llm.generate(prompts[:2], SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)  # warm-up
    llm.generate([[1] * 4] * min(args.requests, 256), [SamplingParams(max_tokens=n + 1, ignore_eos=True)
                                                       for n in range(min(args.requests, 256))], use_tqdm=False)
    before = dict(llm.get_stats()["phase_seconds"])
    steps_before = llm.get_stats()["steps"]
    start = time.perf_counter()
    if args.torch_profile:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            llm.generate(prompts, params, use_tqdm=False)
    else:
        llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    stats = llm.get_stats()
    steps = stats["steps"] - steps_before
    phases = {k: v - before[k] for k, v in stats["phase_seconds"].items()}
    tokens = args.requests * args.output_len
    print(f"{args.shape}: {args.requests} x ({args.input_len} in, {args.output_len} out) in {elapsed:.2f} s, "
          f"{tokens / elapsed:.0f} out tok/s, {steps} steps, {1000 * elapsed / steps:.2f} ms/step")
    for name, seconds in phases.items():
        print(f"  {name:9s} {1000 * seconds / steps:8.3f} ms/step  ({100 * seconds / elapsed:5.1f}%)")
    print(f"  other     {1000 * (elapsed - sum(phases.values())) / steps:8.3f} ms/step")
    if args.torch_profile:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25))
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12))
    llm.shutdown()


if __name__ == "__main__":
    main()
