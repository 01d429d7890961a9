"""Sampling kernels compiled before the first request.

A backend's fused sampling kernels (Triton on CUDA) compile on first use: a first request with
top-k, logprobs or penalties would wait seconds for a compile its second request does not (on an
H100, a top-k + top-p batch ran at 0.77x the plain one when its kernels compiled inside the timed
run, 0.92x when they were compiled before). `warm_up_sampler` launches every sampling path once on
random logits at the batch sizes the kernels specialise on (1, a multiple of 16, neither), in trial
launches that leave no per-request state behind; `warm_up_bitmask` runs structured outputs' fused
token mask once.
"""

from __future__ import annotations

import time

import torch

from sagellm_core.backend import BitmaskOp
from sagellm_core.request import Request
from sagellm_core.sampling.sampler import Sampler
from sagellm_core.structured.bitmask import bitmask_words
from sagellm_core.sampling_params import SamplingParams

WARM_UP_PARAMS = (
    SamplingParams(temperature=0.7),
    SamplingParams(temperature=0.0),
    SamplingParams(temperature=0.7, top_k=50, top_p=0.95),
    SamplingParams(temperature=0.7, top_p=0.9),
    SamplingParams(temperature=0.7, min_p=0.05),
    SamplingParams(temperature=0.7, repetition_penalty=1.1, presence_penalty=0.5, frequency_penalty=0.5),
    SamplingParams(temperature=0.7, logprobs=5),
    SamplingParams(temperature=0.0, logprobs=5),
    SamplingParams(temperature=0.7, seed=1),
)
"""One of each path the sampler takes (greedy and random draws, the filters, penalties, logprobs,
seeded draws); `warm_up_sampler` also launches them all in one batch."""

BATCH_SIZES = (1, 3, 16)


def warm_up_sampler(sampler: Sampler, vocab_size: int, device: torch.device) -> float:
    """Launch each of `WARM_UP_PARAMS` alone and all together at every `BATCH_SIZES` row count on
    random ``[rows, vocab_size]`` logits, wait for the results, forget the requests; seconds taken."""
    start = time.perf_counter()
    generator = torch.Generator(device=device).manual_seed(0)
    batches = [[params] * rows for rows in BATCH_SIZES for params in WARM_UP_PARAMS]
    batches += [[WARM_UP_PARAMS[i % len(WARM_UP_PARAMS)] for i in range(rows)] for rows in BATCH_SIZES]
    for batch in batches:
        requests = [Request(f"sampler-warm-up-{i}", [0, 1, 2], params, max_tokens=1) for i, params in enumerate(batch)]
        logits = torch.randn((len(batch), vocab_size), generator=generator, device=device, dtype=torch.float32)
        try:
            sampler.collect(sampler.launch(logits, requests, commit=False))
        finally:
            for request in requests:
                sampler.forget(request.request_id)
    return time.perf_counter() - start


def warm_up_bitmask(op: BitmaskOp, vocab_size: int, device: torch.device) -> None:
    """Run a backend's fused token mask (`Backend.bitmask_op`) once on a [2, vocab_size] batch shaped
    as structured outputs' (every other token allowed) and wait for it."""
    logits = torch.zeros((2, vocab_size), dtype=torch.float32, device=device)
    words = torch.full((2, bitmask_words(vocab_size)), 0x55555555, dtype=torch.int32, device=device)
    op(logits, words).sum().item()
