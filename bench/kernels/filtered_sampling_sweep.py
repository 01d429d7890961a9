"""Per-step cost of the sampling kernels on one GPU, at the nano-vllm workload's decode shape
([256, 151936] float32 logits, temperature 0.6): the plain one-pass sampler, torch.topk's share of
top-k, the backend's entry point `sample_filtered` (top-k rows drawn from their candidates) against
the old way (torch.topk's floors, then the full-row kernel) for top-k 50 alone, with top-p 0.95 and
with min-p 0.05, the full-row kernel (top-p 0.95; top-k 50 + top-p 0.95; min-p 0.05) per launch
configuration, and the fused logprobs against torch's logsumexp + topk. Milliseconds per call, CUDA
events, median of 50 after 5 warm-up calls.

    PYTHONPATH=.:sagellm_cuda python3 bench/kernels/filtered_sampling_sweep.py
"""

from __future__ import annotations

import math
import statistics

import torch

from sagellm_core.sampling.filters import top_k_floors
from sagellm_cuda.filtered_sampling import filtered_sample, sample_filtered
from sagellm_cuda.logprobs import fused_logprobs
from sagellm_cuda.sampling import gumbel_argmax

ROWS, VOCAB = 256, 151_936
CONFIGS = [(2048, 8), (4096, 16), (4096, 32), (8192, 32), (1024, 4)]


def time_ms(fn) -> float:  # type: ignore[no-untyped-def]
    for _ in range(5):
        fn()
    times = []
    for _ in range(50):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    torch.manual_seed(0)
    logits = torch.randn(ROWS, VOCAB, device="cuda") * 2
    full = lambda value: torch.full((ROWS,), value, device="cuda")  # noqa: E731
    inverse = full(1 / 0.6)
    keys = torch.arange(ROWS, device="cuda", dtype=torch.int64) * 7919
    no_floor, no_min_p = full(-math.inf), full(-math.inf)
    read_ms = ROWS * VOCAB * 4 / 3.35e12 * 1e3
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}; one read of the logits at 3.35 TB/s: "
          f"{read_ms:.3f} ms")
    print(f"plain gumbel_argmax: {time_ms(lambda: gumbel_argmax(logits, inverse, keys)):.3f} ms")
    top_k = [50] * ROWS
    floors = top_k_floors(logits, top_k)
    print(f"top_k_floors (k=50, one k: unsorted topk + amin): {time_ms(lambda: top_k_floors(logits, top_k)):.3f} "
          f"ms; mixed k (sorted topk + gather): {time_ms(lambda: top_k_floors(logits, [50, 49] * (ROWS // 2))):.3f} ms")
    for name, (top_p, log_min_p) in {"top_k=50": (full(1.0), no_min_p), "top_k=50,top_p=0.95": (full(0.95), no_min_p),
                                     "top_k=50,min_p=0.05": (full(1.0), full(math.log(0.05)))}.items():
        candidates_ms = time_ms(lambda: sample_filtered(logits, inverse, keys, top_k, top_p, log_min_p))
        floors_ms = time_ms(lambda: filtered_sample(logits, inverse, keys, top_k_floors(logits, top_k), top_p,
                                                    log_min_p))
        print(f"{name}: sample_filtered (candidates) {candidates_ms:.3f} ms, top_k_floors + full kernel "
              f"{floors_ms:.3f} ms")
    cases = {"top_p=0.95": (no_floor, full(0.95), no_min_p), "top_k=50,top_p=0.95": (floors, full(0.95), no_min_p),
             "min_p=0.05": (no_floor, full(1.0), full(math.log(0.05)))}
    for block, warps in CONFIGS:
        row = []
        for name, (floor, top_p, log_min_p) in cases.items():
            ms = time_ms(lambda: filtered_sample(logits, inverse, keys, floor, top_p, log_min_p, block=block,
                                                 num_warps=warps))
            row.append(f"{name} {ms:.3f}")
        print(f"filtered BLOCK={block} num_warps={warps}: " + ", ".join(row) + " ms")
    print(f"logprobs n=5 fused: {time_ms(lambda: fused_logprobs(logits, 5)):.3f} ms, torch logsumexp+topk: "
          f"{time_ms(lambda: (logits.logsumexp(-1), logits.topk(5, dim=-1))):.3f} ms")


if __name__ == "__main__":
    main()
