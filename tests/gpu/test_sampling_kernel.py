"""The CUDA one-pass sampler (`sagellm_cuda.sampling.gumbel_argmax`) against torch, and seeded
sampling through it in the engine."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import assert_seeded_request_ignores_its_batch, engine_config
from sagellm_core.engine import LLMEngine
from sagellm_core.sampling_params import SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module")
def gumbel_argmax():  # type: ignore[no-untyped-def]
    pytest.importorskip("triton")
    from sagellm_cuda.sampling import gumbel_argmax

    return gumbel_argmax


@pytest.mark.parametrize("rows,vocab", [(1, 128256), (64, 151936), (7, 1000)])
def test_greedy_rows_equal_torch_argmax(gumbel_argmax, rows: int, vocab: int) -> None:  # type: ignore[no-untyped-def]
    logits = torch.randn(rows, vocab, device="cuda")
    logits[0, 5] = logits[0, vocab - 3] = 100.0  # tie: first index, as torch
    zeros = torch.zeros(rows, device="cuda")
    keys = torch.arange(rows, device="cuda", dtype=torch.int64)
    assert torch.equal(gumbel_argmax(logits, zeros, keys), logits.argmax(dim=-1))


def test_draws_follow_the_tempered_softmax(gumbel_argmax) -> None:  # type: ignore[no-untyped-def]
    base = torch.randn(40, device="cuda") * 2
    draws = 200_000
    logits = base.repeat(draws, 1)
    tokens = gumbel_argmax(logits, torch.full((draws,), 1 / 0.7, device="cuda"),
                           torch.arange(draws, device="cuda", dtype=torch.int64))
    frequencies = torch.bincount(tokens, minlength=40).double() / draws
    expected = (base / 0.7).softmax(-1).double()
    assert (frequencies - expected).abs().max() < 0.005
    again = gumbel_argmax(logits[:100], torch.full((100,), 1 / 0.7, device="cuda"),
                          torch.arange(100, device="cuda", dtype=torch.int64))
    assert torch.equal(again, tokens[:100])  # same key, same logits: same token


def test_seeded_requests_through_the_fused_sampler_are_batch_independent(tiny_models: dict[str, Path]) -> None:
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=12, ignore_eos=True)
    config = engine_config(tiny_models["qwen2"], backend={"name": "cuda"}, kv_cache={"block_size": 16, "num_blocks": 64})
    alone = LLMEngine(config)
    assert alone.sampler.fused is not None
    assert_seeded_request_ignores_its_batch(alone, LLMEngine(config), seeded)
