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
