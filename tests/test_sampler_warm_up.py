"""The sampler's warm-up (`sagellm_core.sampling.warm_up`): every path launched, no state left behind."""

from __future__ import annotations

import torch

from sagellm_core.request import Request
from sagellm_core.sampling import Sampler
from sagellm_core.sampling.warm_up import WARM_UP_PARAMS, warm_up_sampler
from sagellm_core.sampling_params import SamplingParams


def _draws(sampler: Sampler) -> list[int]:
    logits = torch.randn((4, 257), generator=torch.Generator().manual_seed(3))
    params = [SamplingParams(temperature=0.8, seed=7), SamplingParams(temperature=0.8, top_k=20, seed=8),
              SamplingParams(temperature=0.8, repetition_penalty=1.3, seed=9), SamplingParams(temperature=0.0)]
    requests = [Request(f"r{i}", [1, 2, 3, 4], p, max_tokens=4) for i, p in enumerate(params)]
    return sampler.sample(logits, requests).token_ids


def test_warm_up_leaves_no_state_and_changes_no_draw() -> None:
    warmed = Sampler(seed=5)
    seconds = warm_up_sampler(warmed, 257, torch.device("cpu"))
    assert seconds >= 0.0
    assert warmed.penalties.slots == {}
    assert warmed.drawer._bases == {}
    assert _draws(warmed) == _draws(Sampler(seed=5))


def test_warm_up_covers_every_sampling_path() -> None:
    assert any(p.top_k and p.top_p < 1.0 for p in WARM_UP_PARAMS)
    assert any(p.min_p for p in WARM_UP_PARAMS)
    assert any(p.repetition_penalty != 1.0 and p.presence_penalty and p.frequency_penalty for p in WARM_UP_PARAMS)
    assert any(p.logprobs and p.temperature == 0.0 for p in WARM_UP_PARAMS)
    assert any(p.seed is not None for p in WARM_UP_PARAMS)


def test_only_backends_with_fused_kernels_warm_up() -> None:
    assert not Sampler().compiles_kernels
    assert Sampler(fused_logprobs=lambda *args: None).compiles_kernels  # type: ignore[arg-type]


def test_bitmask_warm_up_runs_the_op_on_a_structured_batch() -> None:
    from sagellm_core.structured.bitmask import mask_logits
    from sagellm_core.sampling.warm_up import warm_up_bitmask

    calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def op(logits: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        calls.append((logits, words))
        return mask_logits(logits, words)

    warm_up_bitmask(op, 100, torch.device("cpu"))
    (logits, words), = calls
    assert logits.shape == (2, 100) and words.shape == (2, 4) and words.dtype == torch.int32
    assert int(torch.isinf(mask_logits(logits, words)).sum()) == 2 * 50  # every other token allowed
