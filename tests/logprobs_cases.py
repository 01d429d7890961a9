"""Cases for a one-pass logprobs op (`sagellm_cuda.logprobs.top_logprobs`) against torch's
``logsumexp`` and ``topk``: shared by the GPU test and the Triton-interpreter run on the CPU
(``python -c "import logprobs_cases; logprobs_cases.main()"`` with ``TRITON_INTERPRET=1``, tests/ and
sagellm_cuda/ on the path). Only torch is needed."""

from __future__ import annotations

from typing import Callable

import torch

TopLogprobs = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]


def check_against_torch(op: TopLogprobs, logits: torch.Tensor, n: int) -> list[list[int]]:
    """Assert ``op(logits, n)`` matches torch: the log-sum-exp, the top-n values (as logprobs, best
    first), ids that hold those values, distinct, equal values lowest id first. Returns the ids."""
    normalizer, values, ids = op(logits, n)
    expected = logits.logsumexp(-1, keepdim=True)
    torch.testing.assert_close(normalizer, expected, equal_nan=True)
    assert values.shape == ids.shape == (logits.shape[0], n) and ids.dtype == torch.int64
    if n:
        torch.testing.assert_close(values, logits.topk(n, dim=-1).values - expected, equal_nan=True)
        torch.testing.assert_close(logits.gather(1, ids) - expected, values, equal_nan=True)
    found = ids.tolist()
    held = logits.gather(1, ids).tolist() if n else [[] for _ in found]
    for row, row_values in zip(found, held):
        assert len(set(row)) == n, row
        for a in range(n - 1):  # best first; equal values lowest id first
            assert row_values[a] > row_values[a + 1] or (row_values[a] == row_values[a + 1] and row[a] < row[a + 1])
    return found


def run_cases(op: TopLogprobs, device: str, big_rows: int = 2) -> None:
    """Random rows of several widths and every n bucket, ties, -inf, NaN, -0.0, +inf, large offsets,
    strided input and a Qwen3-sized vocabulary (151,936) with ``big_rows`` rows."""
    torch.manual_seed(0)
    for n in (0, 1, 2, 5, 8, 20, 32):
        check_against_torch(op, torch.randn(3, 1000, device=device) * 3, n)
    assert check_against_torch(op, torch.zeros(2, 5000, device=device), 5) == [[0, 1, 2, 3, 4]] * 2
    assert check_against_torch(op, torch.full((1, 4100), 1.5, device=device), 20) == [list(range(20))]
    x = torch.randn(4, 3000, device=device)
    x[0, ::2] = float("-inf")
    x[1] = float("-inf")  # no finite entry: -inf normaliser, NaN logprobs, ids 0.. as ranked
    x[2] = float("-inf")
    x[2, 2999], x[2, 7] = 0.5, 0.25  # fewer finite entries than n
    x[3, 1000:2500] = float("-inf")
    ids = check_against_torch(op, x, 5)
    assert ids[1] == [0, 1, 2, 3, 4] and ids[2] == [2999, 7, 0, 1, 2], ids
    ties = torch.randn(2, 9000, device=device)
    ties[:, [8999, 4096, 2047, 10]] = 9.0  # equal best values in different blocks and slices
    ties[1, 5] = float("nan")  # counts as -inf
    normalizer, _, tie_ids = op(ties, 4)
    assert tie_ids.tolist() == [[10, 2047, 4096, 8999]] * 2, tie_ids
    torch.testing.assert_close(normalizer[0], ties[0].logsumexp(-1, keepdim=True))
    signed_zero = torch.tensor([[-0.0, 0.0, -1.0, -0.0, 0.0]], device=device)
    assert check_against_torch(op, signed_zero, 3) == [[0, 1, 3]]
    check_against_torch(op, torch.randn(3, 2500, device=device) * 50 - 1000, 8)
    check_against_torch(op, torch.randn(3, 2500, device=device) * 50 + 1000, 8)
    infinite = torch.randn(1, 100, device=device)
    infinite[0, 3] = float("inf")
    normalizer, _, inf_ids = op(infinite, 2)
    assert normalizer.item() == float("inf") and inf_ids[0, 0].item() == 3
    wide = torch.randn(6, 3000, device=device)
    check_against_torch(op, wide[::2], 5)  # row stride 6000
    check_against_torch(op, wide[:, :2999], 3)  # odd row length
    qwen = torch.randn(big_rows, 151936, device=device) * 4
    for n in (0, 5, 20):
        check_against_torch(op, qwen, n)


def main() -> None:
    """Run `run_cases` on the CPU through Triton's interpreter (``TRITON_INTERPRET=1``)."""
    from sagellm_cuda.logprobs import fused_logprobs, top_logprobs

    run_cases(top_logprobs, "cpu")
    wide = torch.randn(2, 100)
    assert fused_logprobs(wide.double(), 5) is None and fused_logprobs(wide, 33) is None
    assert fused_logprobs(wide[:, :4], 5) is None and fused_logprobs(wide, 32) is not None
    print("kernel ok")
