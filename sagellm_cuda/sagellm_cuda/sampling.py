"""One-pass sampling on the GPU: temperature, Gumbel-max draw and argmax in a single Triton kernel.

Drawing token i with probability softmax(logits / T)_i is the same as taking
argmax_i(logits_i / T - log(E_i)) with E_i ~ Exp(1) independent (the exponential race the generic
sampler uses, ``argmax p_i / E_i``, taken in log space; the softmax's normaliser does not change the
argmax). The kernel reads each row of logits once, draws E_i = -log(U_i) from Philox (``tl.rand``)
and keeps a running maximum; greedy rows (T = 0) take the plain argmax, first index on ties like
``torch.argmax``. The generic path reads and writes the [batch, vocab] float32 tensor about ten
times (scale, softmax, noise, log, divide, argmax); at batch 256 and a 151,936-token vocabulary that
is about 2 GB per step.

Each row has its own 64-bit Philox key, chosen by the caller: seeded requests derive it from their
seed and the position of the token being drawn, so their draws do not depend on the batch.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 2048
SPLIT = 8192  # vocabulary entries per program: a batch of one still spreads over many SMs


@triton.jit(do_not_specialize=["vocab"])
def _gumbel_argmax_split_kernel(logits_ptr, row_stride, inv_temp_ptr, key_ptr, best_ptr, index_ptr, vocab,
                                num_splits, SPLIT: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    split = tl.program_id(1)
    inv_temp = tl.load(inv_temp_ptr + row)
    key = tl.load(key_ptr + row)
    base = logits_ptr + row.to(tl.int64) * row_stride
    best = tl.full((), float("-inf"), tl.float32)
    best_index = tl.full((), 0, tl.int32)
    remaining = vocab - split * SPLIT
    for offset in range(0, SPLIT, BLOCK):
        if offset < remaining:  # the last split of a row is partial
            cols = split * SPLIT + offset + tl.arange(0, BLOCK)
            inside = cols < vocab
            x = tl.load(base + cols, mask=inside, other=float("-inf")).to(tl.float32)
            if inv_temp > 0:
                x = x * inv_temp - tl.log(-tl.log(tl.rand(key, cols)))
            x = tl.where(inside & (x == x), x, float("-inf"))  # NaN never wins
            block_best = tl.max(x, axis=0)
            block_index = tl.argmax(x, axis=0, tie_break_left=True).to(tl.int32) + split * SPLIT + offset
            better = block_best > best
            best_index = tl.where(better, block_index, best_index)
            best = tl.where(better, block_best, best)
    tl.store(best_ptr + row * num_splits + split, best)
    tl.store(index_ptr + row * num_splits + split, best_index)


@triton.jit
def _pick_split_kernel(best_ptr, index_ptr, out_ptr, num_splits, SPLITS: tl.constexpr):
    row = tl.program_id(0)
    splits = tl.arange(0, SPLITS)
    inside = splits < num_splits
    best = tl.load(best_ptr + row * num_splits + splits, mask=inside, other=float("-inf"))
    winner = tl.argmax(best, axis=0, tie_break_left=True)
    tl.store(out_ptr + row, tl.load(index_ptr + row * num_splits + winner).to(tl.int64))


def unit_stride(logits: torch.Tensor) -> torch.Tensor:
    """``logits`` with unit column stride (copied only if needed)."""
    return logits if logits.stride(1) == 1 else logits.contiguous()


def unit_stride_rows(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``logits`` with unit column stride (copied only if needed) and the [rows] int64 token output."""
    logits = unit_stride(logits)
    return logits, torch.empty(logits.shape[0], dtype=torch.int64, device=logits.device)


def gumbel_argmax(logits: torch.Tensor, inv_temperatures: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """One token per row of ``logits`` [rows, vocab]: argmax where ``inv_temperatures`` [rows] is 0,
    else a draw from softmax(logits * inv_temperature) keyed by ``keys`` [rows] (int64)."""
    rows, vocab = logits.shape
    logits, out = unit_stride_rows(logits)
    if rows == 0:
        return out
    num_splits = triton.cdiv(vocab, SPLIT)
    best = torch.empty((rows, num_splits), dtype=torch.float32, device=logits.device)
    index = torch.empty((rows, num_splits), dtype=torch.int32, device=logits.device)
    _gumbel_argmax_split_kernel[(rows, num_splits)](logits, logits.stride(0), inv_temperatures, keys, best, index,
                                                    vocab, num_splits, SPLIT=SPLIT, BLOCK=BLOCK, num_warps=8)
    _pick_split_kernel[(rows,)](best, index, out, num_splits, SPLITS=triton.next_power_of_2(num_splits))
    return out
