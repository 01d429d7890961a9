"""The backend's one-pass sampler hook: when the sampler routes to it, the keys it hands over, and
(where Triton is installed) the CUDA kernel run through Triton's CPU interpreter."""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sagellm_core.request import Request
from sagellm_core.sampler import Sampler
from sagellm_core.sampling_params import SamplingParams


class RecordingSampler:
    """Stands in for a backend's fused sampler: Gumbel-max with torch noise seeded by each key."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[float], list[int]]] = []
        self.logits: list[torch.Tensor] = []

    def __call__(self, logits: torch.Tensor, inverse: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
        self.calls.append((inverse.tolist(), keys.tolist()))
        self.logits.append(logits.clone())
        out = []
        for row, scale, key in zip(logits, inverse.tolist(), keys.tolist()):
            if scale == 0:
                out.append(int(row.argmax()))
                continue
            noise = torch.rand(row.shape, generator=torch.Generator().manual_seed(key))
            out.append(int((row * scale - (-noise.log()).log()).argmax()))
        return torch.tensor(out)


def _request(rid: str, params: SamplingParams, outputs: int = 0) -> Request:
    request = Request(rid, [1, 2, 3], params, max_tokens=100)
    request.output_token_ids = [7] * outputs
    return request


def test_every_batch_goes_through_the_fused_sampler() -> None:
    """It gets the logits and inverse temperatures; with top-k / top-p / min-p the removed tokens
    are -inf in the logits it gets."""
    fused = RecordingSampler()
    sampler = Sampler(fused=fused)
    logits = torch.randn(2, 50)
    plain = [_request("a", SamplingParams(temperature=0.5)), _request("b", SamplingParams(temperature=0.0))]
    sampler.sample(logits, plain)
    assert len(fused.calls) == 1 and fused.calls[0][0] == [2.0, 0.0]
    greedy = sampler.sample(logits, [_request("c", SamplingParams(temperature=0.0))] * 2)
    assert len(fused.calls) == 2 and greedy.token_ids == logits.argmax(dim=-1).tolist()
    for params in (SamplingParams(top_k=5, temperature=0.5), SamplingParams(top_p=0.9), SamplingParams(min_p=0.1)):
        sampler.sample(logits, [_request("d", params), plain[0]])
        assert fused.calls[-1][0] == [1.0 / params.temperature, 2.0]
        assert torch.isinf(fused.logits[-1][0]).any() and not torch.isinf(fused.logits[-1][1]).any()
    assert len(fused.calls) == 5
    torch.testing.assert_close(fused.logits[2][1], logits[1])
    assert int((~torch.isinf(fused.logits[2][0])).sum()) == 5


def test_seeded_keys_depend_on_seed_and_position_not_on_the_batch() -> None:
    fused = RecordingSampler()
    seeded = SamplingParams(temperature=1.0, seed=11)
    logits = torch.randn(3, 50)
    Sampler(seed=1, fused=fused).sample(logits[:1], [_request("s", seeded, outputs=4)])
    Sampler(seed=2, fused=fused).sample(logits, [_request("x", SamplingParams()), _request("y", SamplingParams()),
                                                 _request("s", seeded, outputs=4)])
    Sampler(seed=1, fused=fused).sample(logits[:1], [_request("s", seeded, outputs=5)])
    alone, batched, later = (call[1] for call in fused.calls)
    assert alone[0] == batched[2] and later[0] != alone[0]
    assert len(set(batched)) == 3 and all(0 <= k < 2**63 for k in batched)


KERNEL_CHECK = """
import torch
from sagellm_cuda.sampling import gumbel_argmax
torch.manual_seed(0)
logits = torch.randn(3, 20000)
logits[0, 17] = logits[0, 19000] = 50.0  # a tie: the first index wins, as in torch.argmax
logits[2] = logits[1]  # same logits, same key: same draw
out = gumbel_argmax(logits, torch.tensor([0.0, 1.0, 1.0]), torch.tensor([5, 9, 9]))
assert out[0] == 17 and out[1] == out[2], out
small = torch.tensor([[0.0, 1.0, 2.0, -1.0, 0.5]]).repeat(800, 1)  # one row per key
draws = gumbel_argmax(small, torch.full((800,), 0.5), torch.arange(800))
frequencies = torch.bincount(draws, minlength=5) / 800
assert (frequencies - (small[0] * 0.5).softmax(-1)).abs().max() < 0.05, frequencies
print("kernel ok")
"""


class RecordingFilteredSampler:
    """Stands in for a backend's filtered sampler: records its arguments, returns each row's argmax."""

    def __init__(self) -> None:
        self.calls: list[dict[str, list]] = []

    def __call__(self, logits: torch.Tensor, inverse: torch.Tensor, keys: torch.Tensor, floors: torch.Tensor,
                 top_p: torch.Tensor, log_min_p: torch.Tensor) -> torch.Tensor:
        self.calls.append({"inverse": inverse.tolist(), "keys": keys.tolist(), "floors": floors.tolist(),
                           "top_p": top_p.tolist(), "log_min_p": log_min_p.tolist()})
        return logits.argmax(dim=-1)


def test_filtering_batches_go_to_the_filtered_sampler_with_each_rows_thresholds() -> None:
    """Rows of a filtering batch reach the backend's filtered sampler unmasked, with top-k's k-th
    largest logit as the floor (-inf without a top-k), top-p and log(min-p) (-inf when off)."""
    fused, filtered = RecordingSampler(), RecordingFilteredSampler()
    sampler = Sampler(fused=fused, filtered=filtered)
    logits = torch.randn(3, 50)
    rows = [_request("k", SamplingParams(top_k=5, top_p=0.8, temperature=0.5)),
            _request("p", SamplingParams(min_p=0.1)), _request("g", SamplingParams(temperature=0.0))]
    result = sampler.sample(logits, rows)
    assert result.token_ids == logits.argmax(dim=-1).tolist() and not fused.calls
    call = filtered.calls[0]
    assert call["floors"][0] == pytest.approx(float(logits[0].topk(5).values[-1]))
    assert call["floors"][1:] == [float("-inf")] * 2
    assert call["top_p"] == pytest.approx([0.8, 1.0, 1.0])
    assert call["log_min_p"][0] == float("-inf") and call["log_min_p"][1] == pytest.approx(math.log(0.1))
    assert call["inverse"] == [2.0, 1.0, 0.0]
    sampler.sample(logits, [_request("plain", SamplingParams())])
    assert len(fused.calls) == 1 and len(filtered.calls) == 1


FILTERED_KERNEL_CHECK = """
import math
import torch
from sagellm_cuda.filtered_sampling import filtered_sample
from sagellm_core.sampling.filters import reference_filter, top_k_floors
torch.manual_seed(0)
base = torch.randn(30) * 2
draws = 1500
for temperature, top_k, top_p, min_p in [(0.7, 0, 0.6, 0.0), (1.0, 8, 0.8, 0.05)]:
    logits = base.repeat(draws, 1)
    full = lambda value: torch.full((draws,), value)
    out = filtered_sample(logits, full(1 / temperature), torch.arange(draws), top_k_floors(logits, [top_k] * draws),
                          full(top_p), full(math.log(min_p) if min_p else -math.inf))
    expected = reference_filter((base / temperature).unsqueeze(0), [top_k], [top_p], [min_p])[0].softmax(-1)
    frequencies = torch.bincount(out, minlength=30) / draws
    assert frequencies[expected == 0].sum() == 0, frequencies
    assert (frequencies - expected).abs().max() < 0.06, (frequencies, expected)
print("kernel ok")
"""


@pytest.mark.parametrize("check", [KERNEL_CHECK, FILTERED_KERNEL_CHECK], ids=["one-pass", "filtered"])
def test_cuda_sampling_kernels_in_the_triton_interpreter(check: str) -> None:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True,
                            cwd=root / "sagellm_cuda", timeout=600)
    assert result.returncode == 0 and "kernel ok" in result.stdout, result.stderr[-3000:]
