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

`sample_filtered`, the backend's entry point, takes each row's k rather than its threshold and draws
most rows with a top-k from their candidates, without the passes over the full row. Their threshold
needs a ``torch.topk`` anyway: at [256, 151936] float32 on an H100, that topk (0.68 ms) followed by
the full-row kernel (0.61 ms) cost 1.29 ms a step. One ``topk(kmax + 1)`` over the rows with
``0 < k <= CANDIDATE_MAX_K`` (kmax: the largest of those k) gives each row its candidates, sorted; a
small kernel, one program per row, applies top-p and min-p to the first k by the definitions above
(top-p's mass above each candidate summed exactly over the candidates) and draws by Gumbel-max with
round 0's noise at the candidates' token ids: with top-k alone, the very token the full-row kernel
would draw. The candidates cannot decide a row whose (k+1)-th logit ties its k-th (top-k keeps ties:
more tokens than the k candidates are kept), a greedy row, or one with NaN among its candidates:
those go to the full-row kernel with the k-th candidate as their floor, as do the rows without a
top-k and those with a larger k (floors from `top_k_floors`); there the rows already drawn return
at once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from sagellm_core.sampling.draw import on_device
from sagellm_core.sampling.filters import top_k_floors
from sagellm_cuda.sampling import unit_stride, unit_stride_rows

BLOCK = 8192
NUM_WARPS = 32  # best of bench/kernels/filtered_sampling_sweep.py on an H100 (0.58 vs 0.69 ms at 2048 / 8)
MAX_ROUNDS = 64
CANDIDATE_MAX_K = 1023  # at most 1024 candidates a row: their top-p test is quadratic in k
CANDIDATE_CHUNK = 64  # candidates per step of the candidate kernel's loops ([64, 64] top-p tiles)


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


@triton.jit
def _sample_row(logits_ptr, row, row_stride, inv_temp_ptr, key_ptr, floor_ptr, top_p_ptr, log_min_p_ptr, out_ptr,
                vocab, MAX_ROUNDS: tl.constexpr, BLOCK: tl.constexpr):
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


@triton.jit(do_not_specialize=["vocab"])
def _filtered_sample_kernel(logits_ptr, row_stride, inv_temp_ptr, key_ptr, floor_ptr, top_p_ptr, log_min_p_ptr,
                            out_ptr, vocab, MAX_ROUNDS: tl.constexpr, BLOCK: tl.constexpr, PREDRAWN: tl.constexpr):
    row = tl.program_id(0)
    todo = True
    if PREDRAWN:  # rows with a token in out already (the candidate path's) are done
        todo = tl.load(out_ptr + row) < 0
    if todo:
        _sample_row(logits_ptr, row, row_stride, inv_temp_ptr, key_ptr, floor_ptr, top_p_ptr, log_min_p_ptr, out_ptr,
                    vocab, MAX_ROUNDS, BLOCK)


@triton.jit
def _candidate_total(values, k, top, inv_temp, CHUNK: tl.constexpr):
    """``sum exp((v - top) * inv_temp)`` over a row's first ``k`` candidates."""
    total = tl.full((), 0.0, tl.float32)
    for start in range(0, k, CHUNK):
        i = start + tl.arange(0, CHUNK)
        v = tl.load(values + i, mask=i < k, other=float("-inf")).to(tl.float32)
        total += tl.sum(tl.exp((v - top) * inv_temp), axis=0)
    return total


@triton.jit
def _candidate_mass_above(values, v, end, k, top, inv_temp, CHUNK: tl.constexpr):
    """For each of ``v`` (a chunk of candidates ending before ``end``), ``sum exp((x - top) * inv_temp)``
    over the candidates ``x > v``: those are sorted, so only the ones before ``end`` can be above."""
    above = tl.zeros((CHUNK,), tl.float32)
    for start in range(0, end, CHUNK):
        j = start + tl.arange(0, CHUNK)
        x = tl.load(values + j, mask=j < k, other=float("-inf")).to(tl.float32)
        weight = tl.exp((x - top) * inv_temp)
        above += tl.sum(tl.where(x[None, :] > v[:, None], weight[None, :], 0.0), axis=1)
    return above


@triton.jit
def _draw_candidate(values, tokens, k, top, inv_temp, key, floor, top_p, target, CHUNK: tl.constexpr):
    """Gumbel-max with round 0's noise among the first ``k`` candidates that min-p (``floor``) and
    top-p (mass above below ``target``) keep: the token id."""
    best = tl.full((), float("-inf"), tl.float32)
    best_index = tl.full((), 0, tl.int32)
    for start in range(0, k, CHUNK):
        i = start + tl.arange(0, CHUNK)
        inside = i < k
        v = tl.load(values + i, mask=inside, other=float("-inf")).to(tl.float32)
        kept = inside & (v >= floor)
        if top_p < 1.0:
            kept = kept & (_candidate_mass_above(values, v, start + CHUNK, k, top, inv_temp, CHUNK) < target)
        token = tl.load(tokens + i, mask=inside, other=0).to(tl.int32)
        score = tl.where(kept, _noisy(v, inv_temp, key, token, 0), float("-inf"))
        block_best = tl.max(score, axis=0)
        block_index = tl.argmax(score, axis=0, tie_break_left=True).to(tl.int32) + start
        best_index = tl.where(block_best > best, block_index, best_index)
        best = tl.maximum(best, block_best)
    return tl.load(tokens + best_index)


@triton.jit(do_not_specialize=["stride", "count"])
def _candidate_kernel(values_ptr, tokens_ptr, stride, plan_ptr, count, inv_temp_ptr, key_ptr, top_p_ptr,
                      log_min_p_ptr, floor_ptr, out_ptr, CHUNK: tl.constexpr):
    program = tl.program_id(0)
    row = tl.load(plan_ptr + program)
    k = tl.load(plan_ptr + count + program).to(tl.int32)
    values = values_ptr + program.to(tl.int64) * stride
    tokens = tokens_ptr + program.to(tl.int64) * stride
    kth = tl.load(values + k - 1).to(tl.float32)
    tl.store(floor_ptr + row, kth)
    inv_temp = tl.load(inv_temp_ptr + row)
    top = tl.load(values).to(tl.float32)
    # a tie at the boundary (top-k keeps it: more tokens than candidates), greedy, NaN or inf: the full kernel
    if (tl.load(values + k).to(tl.float32) < kth) & (inv_temp > 0) & (top < float("inf")):
        total = _candidate_total(values, k, top, inv_temp, CHUNK)
        if total == total:
            floor = top + tl.load(log_min_p_ptr + row) / inv_temp
            top_p = tl.load(top_p_ptr + row)
            token = _draw_candidate(values, tokens, k, top, inv_temp, tl.load(key_ptr + row), floor, top_p,
                                    top_p * total, CHUNK)
            tl.store(out_ptr + row, token.to(tl.int64))


def filtered_sample(logits: torch.Tensor, inv_temperatures: torch.Tensor, keys: torch.Tensor, floors: torch.Tensor,
                    top_p: torch.Tensor, log_min_p: torch.Tensor, *, drawn: torch.Tensor | None = None,
                    block: int = BLOCK, num_warps: int = NUM_WARPS) -> torch.Tensor:
    """One token per row of ``logits`` [rows, vocab] (float32), drawn from softmax(logits *
    inv_temperature) restricted by the row's filters: ``floors`` [rows] the top-k threshold (the k-th
    largest logit; -inf: no top-k), ``top_p`` [rows] (1.0: off), ``log_min_p`` [rows] (log of min-p;
    -inf: off), applied in that order as vLLM and transformers do. ``inv_temperatures`` 0: the argmax.
    ``keys`` [rows] int64 fix each row's random stream (as `gumbel_argmax`). ``drawn`` [rows] int64:
    tokens drawn already (the candidate path's), -1 where the row is still to draw; the kernel fills
    those rows in place and returns it. ``block`` and ``num_warps``: the kernel's launch
    configuration (`bench/kernels/filtered_sampling_sweep.py`)."""
    rows, vocab = logits.shape
    if drawn is None:
        logits, out = unit_stride_rows(logits)
    else:
        logits, out = unit_stride(logits), drawn
    if rows == 0:
        return out
    _filtered_sample_kernel[(rows,)](logits, logits.stride(0), inv_temperatures, keys, floors, top_p, log_min_p, out,
                                     vocab, MAX_ROUNDS=MAX_ROUNDS, BLOCK=block, PREDRAWN=drawn is not None,
                                     num_warps=num_warps)
    return out


def sample_filtered(logits: torch.Tensor, inv_temperatures: torch.Tensor, keys: torch.Tensor, top_k: list[int],
                    top_p: torch.Tensor, log_min_p: torch.Tensor) -> torch.Tensor:
    """`filtered_sample` with each row's top-k given as its k, ``top_k`` (a host list; 0 or >= vocab:
    off), instead of its threshold: the rows with ``k <= CANDIDATE_MAX_K`` are drawn from their
    candidates (one ``torch.topk`` over them, one small program per row); the others, and the rows
    their candidates cannot decide, by the full-row kernel. Tokens [rows] int64; nothing waits for
    the device. The backend's filtered sampler (`Backend.fused_filtered_sampler`)."""
    rows, vocab = logits.shape
    logits, drawn = unit_stride_rows(logits)
    if rows == 0:
        return drawn
    drawn.fill_(-1)
    floors = top_k_floors(logits, [k if k > CANDIDATE_MAX_K else 0 for k in top_k])
    few = [i for i, k in enumerate(top_k) if 0 < k <= CANDIDATE_MAX_K and k < vocab]
    if few:
        _draw_candidates(logits, few, [top_k[i] for i in few], inv_temperatures, keys, top_p, log_min_p, floors,
                         drawn)
    return filtered_sample(logits, inv_temperatures, keys, floors, top_p, log_min_p, drawn=drawn)


def _draw_candidates(logits: torch.Tensor, batch_rows: list[int], ks: list[int], inv_temperatures: torch.Tensor,
                     keys: torch.Tensor, top_p: torch.Tensor, log_min_p: torch.Tensor, floors: torch.Tensor,
                     drawn: torch.Tensor) -> None:
    """The candidate path for the rows ``batch_rows`` of ``logits`` (top-k ``ks``, each below the
    vocabulary size): their floors, and their tokens into ``drawn`` where the candidates decide them."""
    count = len(batch_rows)
    plan = on_device([batch_rows, ks], logits.device, torch.int64)  # [2, count]: each row's batch row and k
    subset = logits if count == logits.shape[0] else logits.index_select(0, plan[0])
    values, tokens = subset.topk(max(ks) + 1, dim=-1)
    _candidate_kernel[(count,)](values, tokens, values.stride(0), plan, count, inv_temperatures, keys, top_p,
                                log_min_p, floors, drawn, CHUNK=CANDIDATE_CHUNK)
