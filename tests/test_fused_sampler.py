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

    def __call__(self, logits: torch.Tensor, inverse: torch.Tensor, keys: torch.Tensor, top_k: list[int],
                 top_p: torch.Tensor, log_min_p: torch.Tensor) -> torch.Tensor:
        self.calls.append({"inverse": inverse.tolist(), "keys": keys.tolist(), "top_k": list(top_k),
                           "top_p": top_p.tolist(), "log_min_p": log_min_p.tolist()})
        return logits.argmax(dim=-1)


def test_filtering_batches_go_to_the_filtered_sampler_with_each_rows_filters() -> None:
    """Rows of a filtering batch reach the backend's filtered sampler unmasked, with each row's k
    (a host list, 0 without a top-k), top-p and log(min-p) (-inf when off)."""
    fused, filtered = RecordingSampler(), RecordingFilteredSampler()
    sampler = Sampler(fused=fused, filtered=filtered)
    logits = torch.randn(3, 50)
    rows = [_request("k", SamplingParams(top_k=5, top_p=0.8, temperature=0.5)),
            _request("p", SamplingParams(min_p=0.1)), _request("g", SamplingParams(temperature=0.0))]
    result = sampler.sample(logits, rows)
    assert result.token_ids == logits.argmax(dim=-1).tolist() and not fused.calls
    call = filtered.calls[0]
    assert call["top_k"] == [5, 0, 0]
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


CANDIDATES_CHECK_SETUP = """
import math
import torch
from sagellm_cuda.filtered_sampling import CANDIDATE_MAX_K, _draw_candidates, filtered_sample, sample_filtered
from sagellm_core.sampling.filters import reference_filter, top_k_floors


def arguments(rows, temperatures, top_p, min_p, first_key=0):
    column = lambda values: torch.tensor(values, dtype=torch.float32)
    inverse = column([1 / t if t else 0.0 for t in temperatures])
    log_min_p = column([math.log(m) if m else -math.inf for m in min_p])
    return inverse, torch.arange(first_key, first_key + rows) * 7 + 3, column(top_p), log_min_p


def candidates_decide(logits, top_k, inverse, keys, top_p, log_min_p):
    \"\"\"Which rows the candidate kernel draws (the others go to the full kernel), and the floors.\"\"\"
    rows = logits.shape[0]
    drawn, floors = torch.full((rows,), -1), torch.full((rows,), -math.inf)
    _draw_candidates(logits, list(range(rows)), top_k, inverse, keys, top_p, log_min_p, floors, drawn)
    return drawn >= 0, floors
"""

CANDIDATES_DISTRIBUTION_CHECK = CANDIDATES_CHECK_SETUP + """
torch.manual_seed(0)
vocab, draws = 300, 300
base = torch.randn(vocab) * 1.5
groups = [(1.0, 10, 1.0, 0.0), (0.7, 12, 0.8, 0.0), (1.3, 20, 1.0, 0.2), (0.8, 30, 0.9, 0.05), (1.0, 3, 0.9, 0.0),
          (1.1, 40, 0.9, 0.0)]  # (temperature, top-k, top-p, min-p) of rows i, i + 6, i + 12, ...
rows = draws * len(groups)
temperatures, top_k, top_p, min_p = (list(values) * draws for values in zip(*groups))
args = arguments(rows, temperatures, top_p, min_p)
logits = base.repeat(rows, 1)
assert candidates_decide(logits[:len(groups)], top_k[:len(groups)], *(a[:len(groups)] for a in args))[0].all()
out = sample_filtered(logits, args[0], args[1], top_k, args[2], args[3])
for group, (temperature, k, p, m) in enumerate(groups):
    expected = reference_filter((base / temperature).unsqueeze(0), [k], [p], [m])[0].softmax(-1)
    frequencies = torch.bincount(out[group::len(groups)], minlength=vocab) / draws
    assert frequencies[expected == 0].sum() == 0, (k, frequencies)
    assert (frequencies[expected * draws >= 10] > 0).all(), (k, frequencies, expected)
    deviation = (frequencies - expected).abs() / ((expected * (1 - expected) / draws).sqrt() + 1 / draws)
    assert (deviation <= 4).all(), (k, frequencies, expected)
print("kernel ok")
"""


CANDIDATES_ROWS_CHECK = CANDIDATES_CHECK_SETUP + """
torch.manual_seed(1)
vocab = 300

# ties at the k-th value: the full kernel keeps every tied token (the candidates cannot hold them all)
tied, top = [10, 20, 30, 40], [5, 77, 150]
base = torch.randn(vocab) * 0.5 - 1.0
base[top] = torch.tensor([2.9, 2.8, 2.7])
base[tied] = 2.5
for k, decided in [(4, False), (5, False), (7, True)]:
    rows = 120
    args = arguments(rows, [1.0] * rows, [1.0] * rows, [0.0] * rows)
    logits = base.repeat(rows, 1)
    done, floors = candidates_decide(logits, [k] * rows, *args)
    assert bool(done.all()) == decided and bool(done.any()) == decided and (floors == 2.5).all(), (k, done, floors)
    assert set(sample_filtered(logits, args[0], args[1], [k] * rows, args[2], args[3]).tolist()) == set(tied + top)

# every row the candidates leave (no top-k, k > CANDIDATE_MAX_K, k >= vocab, ties, greedy, NaN) is the
# full kernel's, with the same floors; with top-k alone the candidates draw what the full kernel draws
vocab = 1500
logits = torch.randn(10, vocab) * 2
logits[2, [7, 9, 11]] = logits[2].max() + 1  # a tie at k = 2
logits[3, [13, 4]] = logits[3].max() + 1  # greedy: the first index wins
logits[7, 5] = math.nan
top_k = [0, 0, 2, 6, CANDIDATE_MAX_K + 1, 30, 2000, 8, 40, 40]
temperatures = [1.0, 0.8, 1.0, 0.0, 1.0, 1.0, 0.7, 1.0, 1.2, 0.9]
top_p, min_p = [0.7, 1.0, 1.0, 0.9, 0.8, 1.0, 0.9, 1.0, 1.0, 0.85], [0.0, 0.1, 0.0, 0.0, 0.0, 0.0, 0.05, 0.0, 0.0, 0.1]
args = arguments(10, temperatures, top_p, min_p)
out = sample_filtered(logits, args[0], args[1], top_k, args[2], args[3])
full = filtered_sample(logits, args[0], args[1], top_k_floors(logits, top_k), args[2], args[3])
assert torch.equal(out[:9], full[:9]), (out, full)
no_floor = torch.full((2,), -math.inf)
assert torch.equal(out[:2], filtered_sample(logits[:2], args[0][:2], args[1][:2], no_floor, args[2][:2], args[3][:2]))
assert out[2] in (7, 9, 11) and out[3] == 4 and out[7] != 5
assert candidates_decide(logits[[5, 8, 9]], [30, 40, 40], *(a[[5, 8, 9]] for a in args))[0].all()

# a row's token does not depend on the other rows of its batch (their k, filters, temperatures; kmax)
probes = [0, 3, 4, 5, 8, 9]
alone = [int(sample_filtered(logits[i:i + 1], args[0][i:i + 1], args[1][i:i + 1], [top_k[i]], args[2][i:i + 1],
                             args[3][i:i + 1])) for i in probes]
assert alone == out[probes].tolist(), (alone, out)
order = torch.tensor([9, 4, 1, 8, 0, 2, 5, 3])
batch = torch.cat([logits[order], torch.randn(3, vocab)])
extra = arguments(3, [1.0, 0.5, 1.0], [0.5, 1.0, 1.0], [0.0, 0.0, 0.3], first_key=100)
mixed = sample_filtered(batch, *(torch.cat([a[order], e]) for a, e in zip(args[:2], extra[:2])),
                        [top_k[i] for i in order.tolist()] + [1000, 3, 900],
                        *(torch.cat([a[order], e]) for a, e in zip(args[2:], extra[2:])))
assert mixed[:8].tolist() == out[order].tolist(), (mixed, out[order])
print("kernel ok")
"""


@pytest.mark.parametrize("check", [KERNEL_CHECK, FILTERED_KERNEL_CHECK, CANDIDATES_DISTRIBUTION_CHECK,
                                   CANDIDATES_ROWS_CHECK],
                         ids=["one-pass", "filtered", "candidates-distribution", "candidates-rows"])
def test_cuda_sampling_kernels_in_the_triton_interpreter(check: str) -> None:
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-c", check], env=env, capture_output=True, text=True,
                            cwd=root / "sagellm_cuda", timeout=600)
    assert result.returncode == 0 and "kernel ok" in result.stdout, result.stderr[-3000:]
