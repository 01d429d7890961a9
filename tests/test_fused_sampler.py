"""The backend's one-pass sampler hook: when the sampler routes to it, the keys it hands over, and
(where Triton is installed) the CUDA kernel run through Triton's CPU interpreter."""

from __future__ import annotations

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


def test_cuda_sampling_kernel_in_the_triton_interpreter() -> None:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", KERNEL_CHECK], env=env, capture_output=True, text=True,
                            cwd=root / "sagellm_cuda", timeout=300)
    assert result.returncode == 0 and "kernel ok" in result.stdout, result.stderr[-3000:]
