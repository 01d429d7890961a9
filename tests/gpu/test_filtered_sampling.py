"""The CUDA filtered sampler (`sagellm_cuda.filtered_sampling.filtered_sample`: top-k / top-p /
min-p by rejection, no sort) against the sort-based reference filter, and through the engine."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from conftest import assert_seeded_request_ignores_its_batch, engine_config
from sagellm_core.engine import LLMEngine
from sagellm_core.sampling.filters import reference_filter, top_k_floors
from sagellm_core.sampling_params import SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
NO_MIN_P = -math.inf


@pytest.fixture(scope="module")
def filtered_sample():  # type: ignore[no-untyped-def]
    pytest.importorskip("triton")
    from sagellm_cuda.filtered_sampling import filtered_sample

    return filtered_sample


def _draw(filtered_sample, logits, temperature, top_k, top_p, min_p, first_key=0):  # type: ignore[no-untyped-def]
    rows = logits.shape[0]
    full = lambda value: torch.full((rows,), value, device="cuda", dtype=torch.float32)  # noqa: E731
    floors = top_k_floors(logits, [top_k] * rows)
    keys = torch.arange(first_key, first_key + rows, device="cuda", dtype=torch.int64)
    return filtered_sample(logits, full(1 / temperature), keys, floors, full(top_p),
                           full(math.log(min_p) if min_p > 0 else NO_MIN_P))


@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [
    (1.0, 0, 0.9, 0.0), (0.7, 0, 0.5, 0.0), (1.0, 10, 1.0, 0.0), (1.0, 10, 0.8, 0.0), (1.3, 0, 1.0, 0.1),
    (0.8, 20, 0.9, 0.05), (1.0, 0, 0.3, 0.2), (1.0, 0, 1.0, 0.0),
])
def test_draws_follow_the_reference_filter(filtered_sample, temperature: float, top_k: int, top_p: float,
                                           min_p: float) -> None:  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    base = torch.randn(64, device="cuda") * 2
    draws = 200_000
    tokens = _draw(filtered_sample, base.repeat(draws, 1), temperature, top_k, top_p, min_p)
    frequencies = torch.bincount(tokens, minlength=64).double().cpu() / draws
    expected = reference_filter((base / temperature).unsqueeze(0).cpu(), [top_k], [top_p], [min_p])[0]
    expected = expected.softmax(-1).double()
    assert frequencies[expected == 0].sum() == 0  # nothing outside the kept set
    assert (frequencies - expected).abs().max() < 0.005


def test_a_flat_vocabulary_row_keeps_its_nucleus(filtered_sample) -> None:  # type: ignore[no-untyped-def]
    """Random-weight logits are nearly flat over 152k tokens: top-p 0.95 keeps most of them."""
    torch.manual_seed(1)
    base = torch.randn(151_936, device="cuda") * 0.5
    tokens = _draw(filtered_sample, base.repeat(256, 1), 1.0, 0, 0.95, 0.0)
    kept = reference_filter(base.unsqueeze(0).cpu(), [0], [0.95], [0.0])[0] > -math.inf
    assert kept[tokens.cpu()].all()
    assert len(set(tokens.tolist())) > 200


def test_greedy_rows_and_same_keys(filtered_sample) -> None:  # type: ignore[no-untyped-def]
    logits = torch.randn(33, 50_000, device="cuda")
    rows = logits.shape[0]
    greedy = filtered_sample(logits, torch.zeros(rows, device="cuda"), torch.arange(rows, device="cuda"),
                             torch.full((rows,), -math.inf, device="cuda"), torch.full((rows,), 0.5, device="cuda"),
                             torch.full((rows,), NO_MIN_P, device="cuda"))
    assert torch.equal(greedy, logits.argmax(dim=-1))
    first = _draw(filtered_sample, logits, 1.0, 40, 0.9, 0.0, first_key=5)
    assert torch.equal(first, _draw(filtered_sample, logits, 1.0, 40, 0.9, 0.0, first_key=5))


def test_unfiltered_rows_draw_what_the_one_pass_sampler_draws(filtered_sample) -> None:  # type: ignore[no-untyped-def]
    from sagellm_cuda.sampling import gumbel_argmax

    logits = torch.randn(64, 151_936, device="cuda")
    inverse = torch.full((64,), 1 / 0.8, device="cuda")
    keys = torch.arange(64, device="cuda", dtype=torch.int64) * 977
    plain = filtered_sample(logits, inverse, keys, torch.full((64,), -math.inf, device="cuda"),
                            torch.ones(64, device="cuda"), torch.full((64,), NO_MIN_P, device="cuda"))
    assert torch.equal(plain, gumbel_argmax(logits, inverse, keys))


def test_seeded_filtered_requests_are_batch_independent(tiny_models: dict[str, Path]) -> None:
    seeded = SamplingParams(temperature=1.0, top_p=0.9, top_k=20, seed=99, max_tokens=12, ignore_eos=True)
    config = engine_config(tiny_models["qwen2"], backend={"name": "cuda"},
                           kv_cache={"block_size": 16, "num_blocks": 64})
    alone = LLMEngine(config)
    assert alone.sampler.drawer.filtered is not None
    assert_seeded_request_ignores_its_batch(alone, LLMEngine(config), seeded)
