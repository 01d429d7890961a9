"""Where a batch-64 decode step of the default model goes on the CPU.

The 64 prompts of `sagellm bench throughput --num-requests 64 --min-input-len 64 --max-input-len 256`
(random token ids, seed 0) are prefilled (timed), then five decode steps run under the torch
profiler, run in this thread (`LLMEngine.step`) so the profiler sees the engine's ops.

    python bench/cpu_batch_profile.py [--dense]

``--dense`` adds the CPU backend option ``quantized_dense_rows=16`` (de-quantized float32 copies for
steps of 16 rows or more).
"""

from __future__ import annotations

import argparse
import random
import time

from torch.profiler import ProfilerActivity, profile

from sagellm_core.engine.core import LLMEngine
from sagellm_core.llm import build_config
from sagellm_core.sampling_params import SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dense", action="store_true")
    args = parser.parse_args()
    options = {"quantized_dense_rows": 16} if args.dense else {}
    engine = LLMEngine(build_config(None, None, backend={"name": "cpu", "options": options}))
    rng = random.Random(0)
    for _ in range(64):
        prompt = [rng.randrange(engine.vocab_size) for _ in range(rng.randrange(64, 257))]
        engine.add_request(prompt, SamplingParams(max_tokens=40, ignore_eos=True, temperature=0.6))
    tick = time.perf_counter()
    steps = 0
    running = engine.scheduler.running
    while engine.scheduler.waiting or any(r.num_computed_tokens < r.num_prompt_tokens for r in running):
        engine.step()
        steps += 1
    print(f"prefill: {steps} steps, {time.perf_counter() - tick:.2f} s")
    for _ in range(3):
        engine.step()
    tick = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(5):
            engine.step()
    print(f"decode at batch 64 under the profiler: {(time.perf_counter() - tick) / 5 * 1000:.1f} ms a step")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))
    engine.release()


if __name__ == "__main__":
    main()
