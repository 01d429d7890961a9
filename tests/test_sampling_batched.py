"""The batched sampler against its definitions: filters against the sort-based reference and
transformers' warpers, penalties against transformers' processor and the direct formula, draws
against the filtered distribution (chi-square), seeded rows independent of the batch, and device
state kept across steps (penalty counts) matching the host's tokens."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import (MinPLogitsWarper, RepetitionPenaltyLogitsProcessor,
                                                    TopKLogitsWarper, TopPLogitsWarper)

from sagellm_core.errors import InvalidRequestError
from sagellm_core.request import Request
from sagellm_core.sampling import Sampler
from sagellm_core.sampling.filters import filter_logits, reference_filter
from sagellm_core.sampling.seeds import keyed_exponential
from sagellm_core.sampling_params import SamplingParams

VOCAB = 64
CASES = [  # (top_k, top_p, min_p) per row
    [(5, 1.0, 0.0), (0, 0.9, 0.0), (0, 1.0, 0.1), (20, 0.8, 0.0), (0, 0.5, 0.05), (3, 0.95, 0.2), (0, 1.0, 0.0)],
    [(0, 0.3, 0.0)] * 4,
    [(1, 1.0, 0.0), (VOCAB, 0.99, 0.0), (63, 0.01, 0.0)],
]


def _request(rid: str, params: SamplingParams, prompt: list[int] | None = None,
             outputs: list[int] | None = None) -> Request:
    request = Request(rid, prompt or [1, 2, 3], params, params.max_tokens or 16)
    request.output_token_ids = list(outputs or [])
    return request


def _logits(rows: int, seed: int = 0, vocab: int = VOCAB) -> torch.Tensor:
    return torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3


@pytest.mark.parametrize("case", range(len(CASES)))
def test_filters_match_the_sort_based_reference(case: int) -> None:
    rows = CASES[case]
    for seed in range(5):
        logits = _logits(len(rows), seed)
        k, p, m = ([r[i] for r in rows] for i in range(3))
        ours = torch.isinf(filter_logits(logits, k, p, m))
        assert torch.equal(ours, torch.isinf(reference_filter(logits, k, p, m)))


@pytest.mark.parametrize("warper,kwargs", [
    (TopKLogitsWarper, {"top_k": 7}), (TopPLogitsWarper, {"top_p": 0.8}), (TopPLogitsWarper, {"top_p": 0.3}),
    (MinPLogitsWarper, {"min_p": 0.1}),
])
def test_filters_match_transformers_warpers(warper: type, kwargs: dict) -> None:
    logits = _logits(6, seed=3, vocab=500)
    expected = warper(**kwargs)(torch.zeros((6, 1), dtype=torch.long), logits.clone())
    k = [kwargs.get("top_k", 0)] * 6
    p = [kwargs.get("top_p", 1.0)] * 6
    m = [kwargs.get("min_p", 0.0)] * 6
    assert torch.equal(torch.isinf(filter_logits(logits, k, p, m)), torch.isinf(expected))


def test_repetition_penalty_matches_transformers() -> None:
    logits = _logits(2, seed=4)
    prompts, outputs = [[3, 4, 5, 3], [10, 11]], [[5, 6, 6], [40]]
    requests = [_request(f"r{i}", SamplingParams(repetition_penalty=1.3), prompts[i], outputs[i]) for i in range(2)]
    ours = Sampler().process(logits, requests)
    for i in range(2):
        ids = torch.tensor([prompts[i] + outputs[i]])
        expected = RepetitionPenaltyLogitsProcessor(1.3)(ids, logits[i: i + 1].clone())[0]
        torch.testing.assert_close(ours[i], expected)


def test_presence_and_frequency_count_the_output_only() -> None:
    logits = _logits(1, seed=5)
    params = SamplingParams(presence_penalty=0.7, frequency_penalty=0.4)
    request = _request("r", params, prompt=[1, 2, 9], outputs=[2, 2, 7])
    ours = Sampler().process(logits, [request])[0]
    counts = torch.bincount(torch.tensor([2, 2, 7]), minlength=VOCAB).float()
    torch.testing.assert_close(ours, logits[0] - 0.4 * counts - 0.7 * (counts > 0).float())


def test_penalty_counts_follow_the_sampled_tokens_on_the_device() -> None:
    """After each launch the device counts equal a fresh count from the host's tokens."""
    sampler = Sampler(seed=3)
    params = SamplingParams(temperature=1.0, repetition_penalty=1.2, frequency_penalty=0.3, max_tokens=20)
    requests = [_request(f"r{i}", params, prompt=[i, i + 1]) for i in range(3)]
    plain = _request("plain", SamplingParams(temperature=1.0))
    for step in range(8):
        logits = _logits(4, seed=step)
        batch = requests[: 1 + step % 3] + [plain]
        tokens = sampler.sample(logits, batch).token_ids
        for request, token in zip(batch, tokens):
            request.output_token_ids.append(token)
    fresh = Sampler()
    logits = _logits(3, seed=99)
    torch.testing.assert_close(sampler.process(logits, requests), fresh.process(logits, requests))
    sampler.forget("r0")
    assert "r0" not in sampler.penalties.slots and sampler.penalties.free


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int]:
    support = probs > 0
    assert counts[~support].sum() == 0, "a filtered-out token was drawn"
    expected = probs[support] * counts.sum()
    return float(((counts[support] - expected) ** 2 / expected).sum()), int(support.sum()) - 1


# chi-square critical values at p = 1e-4 for the degrees of freedom used below
CRITICAL = {1: 15.1, 2: 18.4, 3: 21.1, 4: 23.5, 5: 25.7, 6: 27.9, 7: 29.9, 8: 31.8, 9: 33.7, 10: 35.6, 11: 37.3}


@pytest.mark.parametrize("seeded", [False, True], ids=["shared-generator", "keyed"])
@pytest.mark.parametrize("params", [
    {"top_k": 5}, {"top_p": 0.8}, {"top_k": 8, "top_p": 0.9}, {"min_p": 0.1}, {"temperature": 0.7, "top_p": 0.85},
])
def test_draws_follow_the_filtered_distribution(params: dict, seeded: bool) -> None:
    vocab, draws = 12, 20000
    logits = torch.linspace(2.0, -2.0, vocab).unsqueeze(0)
    temperature = params.pop("temperature", 1.0)
    sampling = SamplingParams(temperature=temperature, **params)
    requests = [_request(f"r{i}", sampling.replace(seed=i if seeded else None)) for i in range(draws)]
    tokens = Sampler(seed=11).sample(logits.expand(draws, vocab).contiguous(), requests).token_ids
    counts = torch.bincount(torch.tensor(tokens), minlength=vocab).double()
    scaled = logits / temperature
    reference = reference_filter(scaled, [sampling.top_k], [sampling.top_p], [sampling.min_p])
    stat, dof = _chi_square(counts, reference.softmax(dim=-1)[0].double())
    assert stat < CRITICAL[dof], (stat, dof)


def test_keyed_noise_is_exponential_and_a_function_of_key_and_column() -> None:
    keys = torch.tensor([1, 2**62 + 5, 12345], dtype=torch.int64)
    noise = keyed_exponential(keys, 50000)
    assert torch.equal(noise[1], keyed_exponential(keys[1:2], 50000)[0])
    assert (noise > 0).all() and abs(float(noise.mean()) - 1.0) < 0.02 and abs(float(noise.var()) - 1.0) < 0.05
    assert not torch.equal(noise[0], noise[2])


def test_a_seeded_row_ignores_its_batch_in_every_path() -> None:
    params = SamplingParams(temperature=0.9, seed=42, top_p=0.9, top_k=30, repetition_penalty=1.2, logprobs=3)
    logits = _logits(5, seed=6)
    alone = Sampler(seed=1).sample(logits[2:3], [_request("s", params, outputs=[4, 5])])
    others = [_request(f"o{i}", SamplingParams(temperature=1.0, min_p=0.05 * i)) for i in range(4)]
    batch = others[:2] + [_request("s", params, outputs=[4, 5])] + others[2:]
    together = Sampler(seed=2).sample(logits, batch)
    assert together.token_ids[2] == alone.token_ids[0]
    (chosen, top, _), (chosen_alone, top_alone, _) = together.logprobs[2], alone.logprobs[0]  # type: ignore[misc]
    assert chosen == pytest.approx(chosen_alone) and top == top_alone


def test_logprobs_are_the_processed_distribution_with_top_alternatives() -> None:
    logits = _logits(3, seed=7)
    requests = [_request("a", SamplingParams(temperature=0.0, logprobs=4)), _request("b", SamplingParams()),
                _request("c", SamplingParams(temperature=0.0, logprobs=0, logit_bias={3: 5.0}))]
    result = Sampler().sample(logits, requests)
    assert result.logprobs[1] is None
    expected = torch.log_softmax(logits[0], dim=-1)
    chosen, top, _ = result.logprobs[0]  # type: ignore[misc]
    assert chosen == pytest.approx(float(expected.max()))
    assert top == expected.topk(4).indices.tolist()
    biased = logits[2].clone()
    biased[3] += 5.0
    assert result.logprobs[2] == (pytest.approx(float(torch.log_softmax(biased, -1)[result.token_ids[2]])), [], [])


def test_logit_bias_bans_and_forces_tokens() -> None:
    logits = torch.zeros(1, 8)
    forced = _request("f", SamplingParams(temperature=1.0, logit_bias={5: 100.0}))
    banned = _request("b", SamplingParams(temperature=0.0, logit_bias={0: -100.0}))
    assert Sampler().sample(logits, [forced]).token_ids == [5]
    assert Sampler().sample(logits, [banned]).token_ids != [0]


def test_bad_token_ids_and_min_tokens_are_masked_in_one_batch() -> None:
    logits = torch.tensor([[0.0, 5.0, 4.0, 1.0]] * 3)
    bad = Request("bad", [0], SamplingParams(temperature=0.0), 4, bad_token_ids=frozenset({1}))
    early = Request("early", [0], SamplingParams(temperature=0.0, min_tokens=1, stop_token_ids=[2]), 4,
                    eos_token_ids=frozenset({1}))
    free = Request("free", [0], SamplingParams(temperature=0.0), 4)
    assert Sampler().sample(logits, [bad, early, free]).token_ids == [2, 3, 1]


@pytest.mark.parametrize("bias", [{"x": 1.0}, {-1: 1.0}, {3: 101.0}, {3: math.nan}, [1, 2]])
def test_invalid_logit_bias_is_refused(bias: object) -> None:
    with pytest.raises(InvalidRequestError) as error:
        SamplingParams(logit_bias=bias)
    assert error.value.param == "logit_bias"


def test_logit_bias_keys_may_be_strings_as_openai_sends_them() -> None:
    assert SamplingParams(logit_bias={"50": -100}).logit_bias == {50: -100}
