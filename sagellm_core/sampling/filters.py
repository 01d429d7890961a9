"""Top-k, top-p and min-p without sorting the vocabulary: each filter finds a per-row threshold and
masks the logits below it to -inf (what transformers' warpers do, ties at the threshold kept).

* top-k: ``torch.topk`` with the batch's largest k; row r's threshold is its k-th value.
* top-p with a top-k: the kept tokens are among the top-k values already, so their cumulative
  probabilities give the threshold exactly.
* top-p alone: each token's distance below the row's largest logit, in steps of 2**-18 (up to
  64 logits; anything further is one last step), split into 4096 coarse buckets of 4096 fine ones.
  One scatter-add gives the probability mass per coarse bucket, its cumulative sum the bucket where
  the mass reaches ``top_p``; a second scatter-add over that bucket's tokens finds the fine step.
  Tokens up to that step are kept: the sorted reference's set, plus tokens within 2**-18 of the
  threshold's logit (ties, for any practical purpose).
* min-p: keep ``p >= min_p * max p``, i.e. ``logit >= max logit + T log(min_p)`` (no softmax).

Thresholds apply to the unscaled logits (temperature keeps their order), so no scaled copy of
the [N, V] logits is written; only top-p without top-k scales its rows for the histogram.

All are fixed sequences of torch operations (no host reads, no data-dependent shapes): they run on
every backend and inside captured graphs. `reference_filter` is the sort-based definition, for tests.
"""

from __future__ import annotations

import math

import torch

_BITS = 12
_FINE = 1 << _BITS  # buckets per histogram level
LEVELS_PER_LOGIT = float(1 << 18)
"""Top-p's resolution: tokens whose logits are within 2**-18 of the threshold are kept together."""
_NEG_INF = float("-inf")


def _column(values: list, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype).to(device, non_blocking=True).unsqueeze(1)


def _rows(indices: list[int], count: int) -> list[int] | None:
    """None when ``indices`` are all the rows (no gather needed)."""
    return None if len(indices) == count else indices


def filter_logits(logits: torch.Tensor, top_k: list[int], top_p: list[float], min_p: list[float],
                  temperatures: list[float] | None = None) -> torch.Tensor:
    """``logits`` [N, V] with the tokens that top-k (0: off), top-p (1.0: off) and min-p (0.0: off)
    remove set to -inf, applied in that order (as vLLM and transformers) to the distribution at each
    row's temperature (``temperatures``, default 1; the logits themselves stay unscaled: the draw
    divides them)."""
    rows, vocab = logits.shape
    device = logits.device
    temps = temperatures or [1.0] * rows
    with_k = [i for i in range(rows) if 0 < top_k[i] < vocab]
    p_only = [i for i in range(rows) if top_p[i] < 1.0 and not 0 < top_k[i] < vocab]
    if with_k:
        logits = _apply_rows(logits, with_k, lambda x: _top_k_top_p(
            x, [top_k[i] for i in with_k], [top_p[i] for i in with_k], [temps[i] for i in with_k]))
    if p_only:
        logits = _apply_rows(logits, p_only, lambda x: _top_p_histogram(
            x, [top_p[i] for i in p_only], [temps[i] for i in p_only]))
    if any(m > 0.0 for m in min_p):  # p >= min_p * max p  <=>  logit >= max logit + T log(min_p)
        floor = _column([t * math.log(m) if m > 0.0 else _NEG_INF for t, m in zip(temps, min_p)], device,
                        logits.dtype)
        logits = logits.masked_fill(logits < logits.amax(dim=-1, keepdim=True) + floor, _NEG_INF)
    return logits


def top_k_floors(logits: torch.Tensor, top_k: list[int]) -> torch.Tensor:
    """Each row's top-k threshold [N] (its k-th largest logit; -inf where top-k is off): the floor a
    threshold-based filtered sampler takes (the CUDA backend's full-row kernel, for the rows whose k
    its candidate path does not take). One ``topk`` over the rows that have a top-k, with the batch's
    largest k (cutting rows into chunks, topk of each, then of those, measured twice as slow on an
    H100: `bench/kernels/filtered_sampling_sweep.py`)."""
    rows, vocab = logits.shape
    floors = torch.full((rows,), _NEG_INF, dtype=logits.dtype, device=logits.device)
    with_k = [i for i in range(rows) if 0 < top_k[i] < vocab]
    if not with_k:
        return floors
    subset = _rows(with_k, rows)
    index = None if subset is None else _column(subset, logits.device, torch.int64).squeeze(1)
    x = logits if index is None else logits.index_select(0, index)
    ks = [top_k[i] for i in with_k]
    if len(set(ks)) == 1:  # one k: the smallest of the unsorted top k
        kth = x.topk(ks[0], dim=-1, sorted=False).values.amin(dim=-1)
    else:
        values = x.topk(max(ks), dim=-1).values
        kth = values.gather(1, _column([k - 1 for k in ks], logits.device, torch.int64)).squeeze(1)
    if index is None:
        return kth
    return floors.index_copy(0, index, kth)


def _apply_rows(x: torch.Tensor, indices: list[int], fn) -> torch.Tensor:  # type: ignore[no-untyped-def]
    subset = _rows(indices, x.shape[0])
    if subset is None:
        return fn(x)
    index = torch.tensor(subset, dtype=torch.int64).to(x.device, non_blocking=True)
    return x.index_copy(0, index, fn(x.index_select(0, index)))


def _top_k_top_p(x: torch.Tensor, ks: list[int], ps: list[float], temps: list[float]) -> torch.Tensor:
    """Rows with a top-k (and maybe a top-p): the threshold is read off the sorted top-k values."""
    device = x.device
    kmax = max(ks)
    values = x.topk(kmax, dim=-1).values  # [M, kmax], descending (temperature keeps the order)
    k = _column(ks, device, torch.int64)
    ranks = torch.arange(kmax, device=device).unsqueeze(0)
    values = values.masked_fill(ranks >= k, _NEG_INF)
    if any(p < 1.0 for p in ps):
        probs = (values / _column(temps, device, values.dtype)).softmax(dim=-1)
        before = probs.cumsum(dim=-1) - probs  # mass strictly above each candidate
        removed = (before >= _column(ps, device, probs.dtype)) & (ranks > 0)
        values = values.masked_fill(removed, _NEG_INF)
    kept = (values > _NEG_INF).sum(dim=-1, keepdim=True)
    threshold = values.gather(1, kept - 1)
    return x.masked_fill(x < threshold, _NEG_INF)


def _top_p_histogram(x: torch.Tensor, ps: list[float], temps: list[float]) -> torch.Tensor:
    """Rows with a top-p and no top-k: the threshold from a two-level histogram of the tokens'
    distance to the row's largest logit (no sort; two scatter-adds over the row)."""
    scaled = x / _column(temps, x.device, x.dtype)
    probs = scaled.softmax(dim=-1)
    target = _column(ps, x.device, probs.dtype)
    distance = (scaled.amax(dim=-1, keepdim=True) - scaled).mul_(LEVELS_PER_LOGIT)
    level = distance.clamp_(max=_FINE * _FINE - 1).to(torch.int64)  # -inf logits: the last level
    coarse = level >> _BITS
    coarse_hist = probs.new_zeros((x.shape[0], _FINE)).scatter_add_(1, coarse, probs)
    first = _crossing(coarse_hist, target, None)
    above = (coarse_hist.cumsum(dim=-1) - coarse_hist).gather(1, first)  # mass of the buckets before
    inside = torch.where(coarse == first, level & (_FINE - 1), _FINE)
    fine_hist = probs.new_zeros((x.shape[0], _FINE + 1)).scatter_add_(1, inside, probs)[:, :_FINE]
    last = first * _FINE + _crossing(fine_hist, target, above)
    return x.masked_fill(level > last, _NEG_INF)


def _crossing(hist: torch.Tensor, target: torch.Tensor, above: torch.Tensor | None) -> torch.Tensor:
    """Per row, the first bucket at which the cumulative mass (plus ``above``) reaches ``target``."""
    cumulative = hist.cumsum(dim=-1)
    if above is not None:
        cumulative = cumulative + above
    return (cumulative < target).sum(dim=-1, keepdim=True).clamp_(max=hist.shape[1] - 1)


def reference_filter(scaled: torch.Tensor, top_k: list[int], top_p: list[float], min_p: list[float]
                     ) -> torch.Tensor:
    """The sort-based definition (one full sort per row): what `filter_logits` must match."""
    out = scaled.clone()
    vocab = scaled.shape[1]
    for row in range(scaled.shape[0]):
        values, order = scaled[row].sort(descending=True)
        remove = torch.zeros(vocab, dtype=torch.bool)
        if 0 < top_k[row] < vocab:
            remove[top_k[row]:] = True
        probs = values.masked_fill(remove, _NEG_INF).softmax(dim=-1)
        if top_p[row] < 1.0:
            remove |= (probs.cumsum(dim=-1) - probs) >= top_p[row]
            remove[0] = False
        kept = values.masked_fill(remove, _NEG_INF)
        if min_p[row] > 0.0:
            kept = kept.masked_fill(kept < kept[0] + math.log(min_p[row]), _NEG_INF)
        out[row] = torch.empty_like(kept).scatter_(0, order, kept)
    return out
