"""Each row's k-th largest value by radix select in one Triton program per row: a candidate
replacement for the `torch.topk` that gives the filtered sampler its top-k threshold
(`sagellm_core.sampling.filters.top_k_floors`), measured against it by
`bench/kernels/filtered_sampling_sweep.py` before it is wired in.

A float32 maps to a 32-bit key with the same order (negative values flip their magnitude bits).
Three passes over the row histogram 11, 11 and 10 bits of the key among the entries that share the
digits found so far (`tl.histogram`); each picks the bin holding the k-th largest and what is left
of k below it. The key found is that of the k-th largest entry exactly (ties count as entries, as
in ``topk``); no sort, no index output, no scratch memory.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096
NUM_WARPS = 16


@triton.jit
def _order_key(x):
    """float32 -> uint32-ordered key held in an int64 (0 .. 2**32 - 1), same order as the floats."""
    bits = x.to(tl.int32, bitcast=True)
    flipped = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # negatives: larger magnitude sorts lower
    return flipped.to(tl.int64) + 2147483648


@triton.jit
def _select_bin(histogram, k, BINS: tl.constexpr):
    """The highest bin whose entries together with those of every higher bin number >= k, and k
    minus the entries of the higher bins."""
    at_or_above = tl.sum(histogram, axis=0) - tl.cumsum(histogram, axis=0) + histogram
    chosen = tl.sum((at_or_above >= k).to(tl.int32), axis=0) - 1
    bins = tl.arange(0, BINS)
    above = tl.sum(tl.where(bins > chosen, histogram, 0), axis=0)
    return chosen, k - above


@triton.jit
def _digit_pass(base, vocab, prefix, prefix_shift, digit_shift, k, BINS: tl.constexpr, BLOCK: tl.constexpr):
    """Histogram of the key digit at ``digit_shift`` over the entries whose key >> prefix_shift equals
    ``prefix``; the bin holding the k-th largest of them and the rank left inside it."""
    histogram = tl.zeros((BINS,), dtype=tl.int32)
    for offset in range(0, vocab, BLOCK):
        cols = offset + tl.arange(0, BLOCK)
        inside = cols < vocab
        key = _order_key(tl.load(base + cols, mask=inside, other=float("-inf")).to(tl.float32))
        digit = ((key >> digit_shift) & (BINS - 1)).to(tl.int32)
        histogram += tl.histogram(digit, BINS, mask=inside & ((key >> prefix_shift) == prefix))
    return _select_bin(histogram, k, BINS)


@triton.jit(do_not_specialize=["vocab"])
def _kth_largest_kernel(logits_ptr, row_stride, k_ptr, out_ptr, vocab, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * row_stride
    k = tl.load(k_ptr + row)
    if k > 0:
        first, k = _digit_pass(base, vocab, 0, 32, 21, k, 2048, BLOCK)
        second, k = _digit_pass(base, vocab, first.to(tl.int64), 21, 10, k, 2048, BLOCK)
        prefix = first.to(tl.int64) * 2048 + second.to(tl.int64)
        third, k = _digit_pass(base, vocab, prefix, 10, 0, k, 1024, BLOCK)
        key = prefix * 1024 + third.to(tl.int64) - 2147483648
        bits = key.to(tl.int32)
        bits = bits ^ ((bits >> 31) & 0x7FFFFFFF)
        tl.store(out_ptr + row, bits.to(tl.float32, bitcast=True))
    else:
        tl.store(out_ptr + row, float("-inf"))


def kth_largest(logits: torch.Tensor, ks: torch.Tensor, *, block: int = BLOCK, num_warps: int = NUM_WARPS
                ) -> torch.Tensor:
    """``[rows]`` float32: row r's ``ks[r]``-th largest value of ``logits`` [rows, vocab] (float32;
    ``ks`` int32, 1 <= k <= vocab), -inf where ``ks[r]`` is 0."""
    rows, vocab = logits.shape
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    out = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows:
        _kth_largest_kernel[(rows,)](logits, logits.stride(0), ks, out, vocab, BLOCK=block, num_warps=num_warps)
    return out
