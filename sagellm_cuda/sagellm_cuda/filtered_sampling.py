"""Top-k / top-p / min-p sampling on the GPU without a sort and without a masked copy of the logits:
rejection sampling with two pivots (the scheme of FlashInfer's sampling kernels), one Triton program
per row.

The kept set of every filter is an upper set of the row's logits: all tokens at or above a threshold.
The caller passes top-k's threshold (the k-th largest logit, ``floors``; ties kept); min-p's follows
from the row's largest logit ``m``: ``m + T log(min_p)``. Top-p keeps token ``s`` when the probability
mass strictly above it (within the top-k) is below ``top_p``, a test one pass over the row answers.

Each round draws a token by Gumbel-max from the tokens above a lower bound ``lo`` (known to lie
below the kept set) and tests it. A rejected draw raises ``lo``: tokens at or below a rejected token
are rejected too. Each test also tests a second pivot halfway between the draw and ``hi`` (a logit
known to be kept), so the interval where the threshold lies at least halves every round. An
accepted draw is a draw from the filtered distribution: rejection sampling from a superset.

Round 0 draws exactly what `sagellm_cuda.sampling.gumbel_argmax` draws with the same key (the same
noise), so rows without a filter cost one pass. Noise of round r is Philox at ``cols + r * vocab``
under the row's key: seeded rows stay batch-independent. Greedy rows take the argmax (kept by every
filter). A row that has not accepted after `MAX_ROUNDS` takes its argmax (not seen in practice: the
interval halves each round).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sagellm_cuda.sampling import unit_stride_rows

BLOCK = 8192
NUM_WARPS = 32  # best of bench/kernels/filtered_sampling_sweep.py on an H100 (0.58 vs 0.69 ms at 2048 / 8)
MAX_ROUNDS = 64


@triton.jit
def _noisy(x, inv_temp, key, cols, round_offset):
    if inv_temp > 0:
        x = x * inv_temp - tl.log(-tl.log(tl.rand(key, cols + round_offset)))
    return x


@triton.jit
def _first_draw(base, vocab, floor, inv_temp, key, BLOCK: tl.constexpr):
    """Round 0 over the tokens >= ``floor``: the drawn token, the row's largest logit and its index,
    and ``sum exp((x - max) * inv_temp)`` over the tokens >= ``floor`` (the top-k's normaliser)."""
    best = tl.full((), float("-inf"), tl.float32)
    best_index = tl.full((), 0, tl.int32)
    top = tl.full((), float("-inf"), tl.float32)
    top_index = tl.full((), 0, tl.int32)
    total = tl.full((), 0.0, tl.float32)
    for offset in range(0, vocab, BLOCK):
        cols = offset + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
        x = tl.where(x == x, x, float("-inf"))  # NaN is never drawn
        block_top = tl.max(x, axis=0)
        block_top_index = tl.argmax(x, axis=0, tie_break_left=True).to(tl.int32) + offset
        new_top = tl.maximum(top, block_top)
        if new_top > float("-inf"):
            kept = tl.where(x >= floor, tl.exp((x - new_top) * inv_temp), 0.0)
            total = total * tl.exp((top - new_top) * inv_temp) + tl.sum(kept, axis=0)
        top_index = tl.where(block_top > top, block_top_index, top_index)
        top = new_top
        score = tl.where(x >= floor, _noisy(x, inv_temp, key, cols, 0), float("-inf"))
        block_best = tl.max(score, axis=0)
        block_index = tl.argmax(score, axis=0, tie_break_left=True).to(tl.int32) + offset
        best_index = tl.where(block_best > best, block_index, best_index)
        best = tl.maximum(best, block_best)
    return best_index, best > float("-inf"), top, top_index, total


@triton.jit
def _draw_above(base, vocab, lo, floor, inv_temp, key, round_offset, BLOCK: tl.constexpr):
    """A Gumbel-max draw among the tokens with ``x > lo`` and ``x >= floor``: (token, found)."""
    best = tl.full((), float("-inf"), tl.float32)
    best_index = tl.full((), 0, tl.int32)
    for offset in range(0, vocab, BLOCK):
        cols = offset + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
        allowed = (x > lo) & (x >= floor)
        score = tl.where(allowed, _noisy(x, inv_temp, key, cols, round_offset), float("-inf"))
        block_best = tl.max(score, axis=0)
        block_index = tl.argmax(score, axis=0, tie_break_left=True).to(tl.int32) + offset
        best_index = tl.where(block_best > best, block_index, best_index)
        best = tl.maximum(best, block_best)
    return best_index, best > float("-inf")


@triton.jit
def _mass_above(base, vocab, first, second, top, inv_temp, BLOCK: tl.constexpr):
    """``sum exp((x - top) * inv_temp)`` over the tokens strictly above ``first`` and above ``second``."""
    above_first = tl.full((), 0.0, tl.float32)
    above_second = tl.full((), 0.0, tl.float32)
    for offset in range(0, vocab, BLOCK):
        cols = offset + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)
        weight = tl.where(x > first, tl.exp((x - top) * inv_temp), 0.0)
        above_first += tl.sum(weight, axis=0)
        above_second += tl.sum(tl.where(x > second, weight, 0.0), axis=0)
    return above_first, above_second


@triton.jit(do_not_specialize=["vocab"])
def _filtered_sample_kernel(logits_ptr, row_stride, inv_temp_ptr, key_ptr, floor_ptr, top_p_ptr, log_min_p_ptr,
                            out_ptr, vocab, MAX_ROUNDS: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    base = logits_ptr + row.to(tl.int64) * row_stride
    inv_temp = tl.load(inv_temp_ptr + row)
    key = tl.load(key_ptr + row)
    floor = tl.load(floor_ptr + row)
    top_p = tl.load(top_p_ptr + row)
    token, found, top, top_index, total = _first_draw(base, vocab, floor, inv_temp, key, BLOCK)
    drawn = tl.load(base + token).to(tl.float32)
    if inv_temp > 0:  # min-p's threshold: p >= min_p * max p  <=>  x >= max + T log(min_p)
        floor = tl.maximum(floor, top + tl.load(log_min_p_ptr + row) / inv_temp)
    target = top_p * total
    lo = tl.full((), float("-inf"), tl.float32)
    hi = top
    accepted = (inv_temp == 0) | (found & (drawn >= floor) & ((top_p >= 1.0) | (drawn >= hi)))
    rounds = 0
    while (accepted == 0) & (rounds < MAX_ROUNDS):
        if found & (drawn >= floor):  # a top-p test (below hi: tokens at or above hi are kept)
            pivot = drawn + (hi - drawn) * 0.5
            above_drawn, above_pivot = _mass_above(base, vocab, drawn, pivot, top, inv_temp, BLOCK)
            accepted = above_drawn < target
            if accepted == 0:
                if above_pivot < target:
                    hi = pivot
                    lo = drawn
                else:
                    lo = pivot
        if accepted == 0:
            rounds += 1
            token, found = _draw_above(base, vocab, lo, floor, inv_temp, key, rounds * vocab, BLOCK)
            drawn = tl.load(base + token).to(tl.float32)
            accepted = found & ((top_p >= 1.0) | (drawn >= hi))
    token = tl.where(accepted & found, token, top_index)
    tl.store(out_ptr + row, token.to(tl.int64))


def filtered_sample(logits: torch.Tensor, inv_temperatures: torch.Tensor, keys: torch.Tensor, floors: torch.Tensor,
                    top_p: torch.Tensor, log_min_p: torch.Tensor, *, block: int = BLOCK,
                    num_warps: int = NUM_WARPS) -> torch.Tensor:
    """One token per row of ``logits`` [rows, vocab] (float32), drawn from softmax(logits *
    inv_temperature) restricted by the row's filters: ``floors`` [rows] the top-k threshold (the k-th
    largest logit; -inf: no top-k), ``top_p`` [rows] (1.0: off), ``log_min_p`` [rows] (log of min-p;
    -inf: off), applied in that order as vLLM and transformers do. ``inv_temperatures`` 0: the argmax.
    ``keys`` [rows] int64 fix each row's random stream (as `gumbel_argmax`). ``block`` and
    ``num_warps``: the kernel's launch configuration (`bench/kernels/filtered_sampling_sweep.py`)."""
    rows, vocab = logits.shape
    logits, out = unit_stride_rows(logits)
    if rows == 0:
        return out
    _filtered_sample_kernel[(rows,)](logits, logits.stride(0), inv_temperatures, keys, floors, top_p, log_min_p, out,
                                     vocab, MAX_ROUNDS=MAX_ROUNDS, BLOCK=block, num_warps=num_warps)
    return out
