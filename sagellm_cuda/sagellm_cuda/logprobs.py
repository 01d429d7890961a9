"""Logprobs on the GPU in one pass over the logits: each row's log-sum-exp and its top-n entries.

The torch path (`sagellm_core.sampling.logprobs`) runs ``logsumexp`` (``amax``, a subtraction and an
``exp`` written to new [rows, vocab] tensors, a sum: four reads and two writes of the logits) and
``topk`` (a radix select that reads each row several times): about ten passes over the [rows, vocab]
float32 logits. Here each row is read once.

Split pass: each row is cut into ``num_splits`` slices (a batch of one still spreads over many SMs);
one program streams its slice in blocks of ``BLOCK`` columns and keeps

* an online softmax: the running maximum and the sum of ``exp(x - maximum)`` (rescaled when the
  maximum grows; a maximum of +-inf takes a shift of 0, as ``torch.logsumexp`` does);
* the slice's best ``K`` entries (``K``: the power of two at or above n, at most `MAX_TOP`) as int64
  keys ordered by (value, lower token id): ``key = ordered_bits(value) << 31 | (2**31 - 1 - id)``,
  so one integer maximum finds the highest value and, among equal values, the lowest id. A block
  whose maximum is below the worst kept value is skipped with no further work; otherwise its best
  keys replace the worst kept ones until none is better: with logits in no particular id order that
  is the first block and a few more per slice; at most K + 1 integer maxima per block in any case.

Merge pass: one program per row combines the slices' (maximum, sum) into the log-sum-exp and takes
the best n of the slices' keys, written as logprobs (value - log-sum-exp) and int64 ids, best first.

Ties: equal values come out lowest id first (torch.topk leaves their order unspecified). NaN logits
count as -inf (torch gives the row a NaN log-sum-exp and ranks NaN first). ``-0.0`` ranks as ``0.0``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 2048
MAX_TOP = 32  # the largest bucket: n in [0, 32]
TARGET_PROGRAMS = 1024  # split rows until the grid has about this many programs ...
MAX_SPLITS = 32  # ... but into at most this many slices

LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)
EMPTY: tl.constexpr = tl.constexpr(-(2**63))  # a removed candidate
UNFILLED: tl.constexpr = tl.constexpr(-(2**63) + 1)  # a free slot: below every real entry
LOW_MASK: tl.constexpr = tl.constexpr(2**31 - 1)
SIGN_FLIP: tl.constexpr = tl.constexpr(0x7FFFFFFF)


@triton.jit
def _entry_key(x, cols):
    """int64 keys whose integer order is (value, then lower id first); ``cols`` < 2**31."""
    bits = x.to(tl.int32, bitcast=True)
    bits = tl.where(x == 0.0, 0, bits)  # -0.0 ranks as 0.0
    ordered = tl.where(bits < 0, bits ^ SIGN_FLIP, bits)
    return (ordered.to(tl.int64) << 31) | (cols * -1 + LOW_MASK).to(tl.int64)


@triton.jit
def _key_value(key):
    """The float32 value of a key made by `_entry_key`."""
    ordered = (key >> 31).to(tl.int32)
    bits = tl.where(ordered < 0, ordered ^ SIGN_FLIP, ordered)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _key_id(key):
    """The token id of a key made by `_entry_key`."""
    return (key & LOW_MASK).to(tl.int32) * -1 + LOW_MASK


@triton.jit
def _add_block(x, block_max, running_max, total):
    """Online softmax: fold the block ``x`` into (running maximum, sum of exp(x - shift)), where the
    shift is the maximum, or 0 while the maximum is +-inf."""
    new_max = tl.maximum(running_max, block_max)
    old_shift = tl.where(tl.abs(running_max) == float("inf"), 0.0, running_max)
    shift = tl.where(tl.abs(new_max) == float("inf"), 0.0, new_max)
    rescale = tl.where(total == 0.0, 0.0, total * tl.exp2((old_shift - shift) * LOG2E))
    return new_max, rescale + tl.sum(tl.exp2((x - shift) * LOG2E), axis=0)


@triton.jit
def _keep_best(x, cols, inside, top, slots):
    """Replace the worst entries of ``top`` by the block's better ones; returns (top, worst kept value)."""
    candidates = tl.where(inside, _entry_key(x, cols), EMPTY)
    best = tl.max(candidates, axis=0)
    worst = tl.min(top, axis=0)
    while best > worst:
        slot = tl.argmin(top, axis=0)
        top = tl.where(slots == slot, best, top)
        candidates = tl.where(candidates == best, EMPTY, candidates)
        best = tl.max(candidates, axis=0)
        worst = tl.min(top, axis=0)
    floor = tl.where(worst == UNFILLED, float("-inf"), _key_value(worst))
    return top, floor


@triton.jit  # vocab stays specialized: divisible by 16 (most vocabularies) gives 16-byte loads
def _logprobs_split_kernel(logits_ptr, row_stride, vocab, split_len, num_splits, max_ptr, sum_ptr, key_ptr,
                           K: tl.constexpr, TOP: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    split = tl.program_id(1)
    base = logits_ptr + row.to(tl.int64) * row_stride
    start = split * split_len
    running_max = tl.full((), float("-inf"), tl.float32)
    total = tl.full((), 0.0, tl.float32)
    slots = tl.arange(0, K)
    top = tl.full((K,), UNFILLED, tl.int64)
    floor = tl.full((), float("-inf"), tl.float32)
    for offset in range(0, split_len, BLOCK):
        if start + offset < vocab:  # the last slice of a row is partial
            cols = start + offset + tl.arange(0, BLOCK)
            inside = cols < vocab
            x = tl.load(base + cols, mask=inside, other=float("-inf")).to(tl.float32)
            x = tl.where(x == x, x, float("-inf"))  # NaN counts as -inf
            block_max = tl.max(x, axis=0)
            running_max, total = _add_block(x, block_max, running_max, total)
            if TOP:
                if block_max >= floor:  # else no entry of the block can be kept
                    top, floor = _keep_best(x, cols, inside, top, slots)
    out = row * num_splits + split
    tl.store(max_ptr + out, running_max)
    tl.store(sum_ptr + out, total)
    if TOP:
        tl.store(key_ptr + out * K + slots, top)


@triton.jit
def _logprobs_merge_kernel(max_ptr, sum_ptr, key_ptr, norm_ptr, value_ptr, id_ptr, num_splits, width,
                           K: tl.constexpr, TOP: tl.constexpr, SPLITS: tl.constexpr):
    row = tl.program_id(0)
    splits = tl.arange(0, SPLITS)
    inside = splits < num_splits
    maxes = tl.load(max_ptr + row * num_splits + splits, mask=inside, other=float("-inf"))
    totals = tl.load(sum_ptr + row * num_splits + splits, mask=inside, other=0.0)
    shifts = tl.where(tl.abs(maxes) == float("inf"), 0.0, maxes)
    row_max = tl.max(maxes, axis=0)
    shift = tl.where(tl.abs(row_max) == float("inf"), 0.0, row_max)
    total = tl.sum(tl.where(totals == 0.0, 0.0, totals * tl.exp2((shifts - shift) * LOG2E)), axis=0)
    normalizer = shift + tl.log2(total) * LN2
    tl.store(norm_ptr + row, normalizer)
    if TOP:
        entries = tl.arange(0, SPLITS * K)
        keys = tl.load(key_ptr + row * num_splits * K + entries, mask=entries < num_splits * K, other=EMPTY)
        for j in range(0, width):
            best = tl.max(keys, axis=0)
            tl.store(value_ptr + row * width + j, _key_value(best) - normalizer)
            tl.store(id_ptr + row * width + j, _key_id(best).to(tl.int64))
            keys = tl.where(keys == best, EMPTY, keys)


def top_bucket(n: int) -> int:
    """The compile-time top size for ``n`` alternatives: the power of two at or above ``n`` (1 for 0)."""
    return triton.next_power_of_2(max(n, 1))


def split_plan(rows: int, vocab: int) -> tuple[int, int]:
    """(columns per slice, a multiple of `BLOCK`; number of slices) for a [rows, vocab] batch."""
    wanted = max(1, min(MAX_SPLITS, triton.cdiv(TARGET_PROGRAMS, rows), triton.cdiv(vocab, BLOCK)))
    split_len = triton.cdiv(triton.cdiv(vocab, wanted), BLOCK) * BLOCK
    return split_len, triton.cdiv(vocab, split_len)


def top_logprobs(logits: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pass over ``logits`` [rows, vocab] float32: (log-sum-exp [rows, 1], the top ``n`` logprobs
    [rows, n] float32 best first, their token ids [rows, n] int64), equal values lowest id first.
    Needs 0 <= n <= min(`MAX_TOP`, vocab) and rows, vocab >= 1; queued, nothing waits."""
    rows, vocab = logits.shape
    assert 0 <= n <= min(MAX_TOP, vocab) and rows > 0, (n, logits.shape)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    device = logits.device
    split_len, num_splits = split_plan(rows, vocab)
    top = top_bucket(n)
    maxes = torch.empty((rows, num_splits), dtype=torch.float32, device=device)
    sums = torch.empty((rows, num_splits), dtype=torch.float32, device=device)
    keys = torch.empty((rows, num_splits, top if n else 1), dtype=torch.int64, device=device)
    _logprobs_split_kernel[(rows, num_splits)](logits, logits.stride(0), vocab, split_len, num_splits, maxes, sums,
                                               keys, K=top, TOP=n > 0, BLOCK=BLOCK, num_warps=8)
    normalizer = torch.empty((rows, 1), dtype=torch.float32, device=device)
    values = torch.empty((rows, n), dtype=torch.float32, device=device)
    ids = torch.empty((rows, n), dtype=torch.int64, device=device)
    _logprobs_merge_kernel[(rows,)](maxes, sums, keys, normalizer, values, ids, num_splits, n, K=top, TOP=n > 0,
                                    SPLITS=triton.next_power_of_2(num_splits))
    return normalizer, values, ids


def fused_logprobs(logits: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """`top_logprobs` where it applies (float32 logits, n <= `MAX_TOP` and the vocabulary, a
    non-empty batch), else None: the caller's torch path then runs. See `Backend.fused_logprobs`."""
    rows, vocab = logits.shape
    if logits.dtype != torch.float32 or rows == 0 or not 0 <= n <= min(MAX_TOP, vocab) or vocab >= 2**31:
        return None
    return top_logprobs(logits, n)
