"""The CUDA filtered sampler (`sagellm_cuda.filtered_sampling`: top-k / top-p / min-p by rejection,
no sort; top-k rows drawn from their candidates) against the sort-based reference filter, and
through the engine."""

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


@pytest.fixture(scope="module")
def sample_filtered():  # type: ignore[no-untyped-def]
    pytest.importorskip("triton")
    from sagellm_cuda.filtered_sampling import sample_filtered

    return sample_filtered


def _arguments(rows, temperature, top_p, min_p, first_key=0):  # type: ignore[no-untyped-def]
    """(inverse temperatures, keys, top_p, log_min_p) [rows] on the GPU, the same for every row."""
    full = lambda value: torch.full((rows,), value, device="cuda", dtype=torch.float32)  # noqa: E731
    keys = torch.arange(first_key, first_key + rows, device="cuda", dtype=torch.int64)
    return full(1 / temperature), keys, full(top_p), full(math.log(min_p) if min_p > 0 else NO_MIN_P)


def _draw(filtered_sample, logits, temperature, top_k, top_p, min_p, first_key=0):  # type: ignore[no-untyped-def]
    """The full kernel, with top-k's floors from torch.topk."""
    inverse, keys, top_p, log_min_p = _arguments(logits.shape[0], temperature, top_p, min_p, first_key)
    return filtered_sample(logits, inverse, keys, top_k_floors(logits, [top_k] * logits.shape[0]), top_p, log_min_p)


def _draw_by_k(sample_filtered, logits, temperature, top_k, top_p, min_p, first_key=0):  # type: ignore[no-untyped-def]
    """The backend's entry point: each row's k (rows with a small k drawn from their candidates)."""
    inverse, keys, top_p, log_min_p = _arguments(logits.shape[0], temperature, top_p, min_p, first_key)
    return sample_filtered(logits, inverse, keys, [top_k] * logits.shape[0], top_p, log_min_p)


@pytest.mark.parametrize("path", ["full", "candidates"])
@pytest.mark.parametrize("temperature,top_k,top_p,min_p", [
    (1.0, 0, 0.9, 0.0), (0.7, 0, 0.5, 0.0), (1.0, 10, 1.0, 0.0), (1.0, 10, 0.8, 0.0), (1.3, 0, 1.0, 0.1),
    (0.8, 20, 0.9, 0.05), (1.0, 0, 0.3, 0.2), (1.0, 0, 1.0, 0.0), (1.2, 40, 1.0, 0.1), (0.9, 3, 0.9, 0.0),
])
def test_draws_follow_the_reference_filter(filtered_sample, sample_filtered, path: str,  # type: ignore[no-untyped-def]
                                           temperature: float, top_k: int, top_p: float, min_p: float) -> None:
    torch.manual_seed(0)
    base = torch.randn(64, device="cuda") * 2
    draws = 200_000
    if path == "full":
        tokens = _draw(filtered_sample, base.repeat(draws, 1), temperature, top_k, top_p, min_p)
    else:
        tokens = _draw_by_k(sample_filtered, base.repeat(draws, 1), temperature, top_k, top_p, min_p)
    frequencies = torch.bincount(tokens, minlength=64).double().cpu() / draws
    expected = reference_filter((base / temperature).unsqueeze(0).cpu(), [top_k], [top_p], [min_p])[0]
    expected = expected.softmax(-1).double()
    assert frequencies[expected == 0].sum() == 0  # nothing outside the kept set
    assert (frequencies - expected).abs().max() < 0.005


def test_candidates_draw_what_the_full_kernel_draws_with_top_k_alone(filtered_sample,  # type: ignore[no-untyped-def]
                                                                     sample_filtered) -> None:
    """Same noise (round 0's, keyed by token id): with top-k alone the full kernel accepts its first
    draw, which is the candidates' draw. Rows with k above the candidates' limit or at the vocabulary
    size, and greedy rows, go to the full kernel."""
    from sagellm_cuda.filtered_sampling import CANDIDATE_MAX_K

    torch.manual_seed(2)
    rows = 256
    logits = torch.randn(rows, 151_936, device="cuda") * 2
    top_k = [[1, 50, 50, 200, CANDIDATE_MAX_K, CANDIDATE_MAX_K + 1, 5000, 151_936][i % 8] for i in range(rows)]
    inverse, keys, top_p, log_min_p = _arguments(rows, 0.8, 1.0, 0.0)
    inverse[::17] = 0.0
    by_k = sample_filtered(logits, inverse, keys, top_k, top_p, log_min_p)
    assert torch.equal(by_k, filtered_sample(logits, inverse, keys, top_k_floors(logits, top_k), top_p, log_min_p))
    assert torch.equal(by_k[::17], logits[::17].argmax(dim=-1))


def test_ties_at_the_k_th_logit_are_kept(sample_filtered) -> None:  # type: ignore[no-untyped-def]
    """Every token tied at the k-th logit can be drawn (the full kernel's rows), none below it: built
    ties, then bf16-rounded logits (where ties are common) with a k per row."""
    torch.manual_seed(3)
    base = torch.randn(151_936, device="cuda") * 0.5
    base[[11, 222, 3333, 44_444]] = 4.0
    base[[7, 70_000, 150_000]] = 4.5
    draws = 4096
    for k in (4, 5, 7):
        tokens = _draw_by_k(sample_filtered, base.repeat(draws, 1), 1.0, k, 1.0, 0.0)
        assert set(tokens.tolist()) == {7, 11, 222, 3333, 44_444, 70_000, 150_000}, k
    rounded = (torch.randn(64, 151_936, device="cuda") * 3).to(torch.bfloat16).float()
    ks = [1 + (7 * i) % 200 for i in range(64)]
    inverse, keys, top_p, log_min_p = _arguments(64, 1.0, 0.9, 0.0)
    tokens = sample_filtered(rounded, inverse, keys, ks, top_p, log_min_p)
    floors = top_k_floors(rounded, ks)
    assert (rounded.gather(1, tokens.unsqueeze(1)).squeeze(1) >= floors).all()


def test_a_flat_vocabulary_row_keeps_its_nucleus(filtered_sample) -> None:  # type: ignore[no-untyped-def]
    """Random-weight logits are nearly flat over 152k tokens: top-p 0.95 keeps most of them."""
    torch.manual_seed(1)
    base = torch.randn(151_936, device="cuda") * 0.5
    tokens = _draw(filtered_sample, base.repeat(256, 1), 1.0, 0, 0.95, 0.0)
    kept = reference_filter(base.unsqueeze(0).cpu(), [0], [0.95], [0.0])[0] > -math.inf
    assert kept[tokens.cpu()].all()
    assert len(set(tokens.tolist())) > 200


def test_greedy_rows_and_same_keys(filtered_sample, sample_filtered) -> None:  # type: ignore[no-untyped-def]
    logits = torch.randn(33, 50_000, device="cuda")
    rows = logits.shape[0]
    greedy = filtered_sample(logits, torch.zeros(rows, device="cuda"), torch.arange(rows, device="cuda"),
                             torch.full((rows,), -math.inf, device="cuda"), torch.full((rows,), 0.5, device="cuda"),
                             torch.full((rows,), NO_MIN_P, device="cuda"))
    assert torch.equal(greedy, logits.argmax(dim=-1))
    first = _draw(filtered_sample, logits, 1.0, 40, 0.9, 0.0, first_key=5)
    assert torch.equal(first, _draw(filtered_sample, logits, 1.0, 40, 0.9, 0.0, first_key=5))
    by_k = _draw_by_k(sample_filtered, logits, 1.0, 40, 0.9, 0.0, first_key=5)
    assert torch.equal(by_k, _draw_by_k(sample_filtered, logits, 1.0, 40, 0.9, 0.0, first_key=5))


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
