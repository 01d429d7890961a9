"""Triton paged attention for the CUDA backend.

`triton_paged_attention` computes exactly what `sagellm_core.attention.reference.reference_paged_attention`
computes (see `sagellm_core.backend.PagedAttentionOp`), in three kinds of launch:

1. ``_write_kv_kernel``: one program per new token scatters its K and V rows (all KV heads) into the
   paged cache at ``slot_mapping[t]``, casting to the cache dtype. A negative slot is skipped
   (padding tokens of a CUDA-graph batch).
2. ``_decode_kernel`` (+ ``_decode_reduce_kernel``): the first ``meta.num_decodes`` sequences, one
   query token each. One program per (sequence, KV head, split) loads the ``Hq / Hkv`` query heads
   that share the KV head (padded to 16 rows for ``tl.dot``), so each KV row is read from memory once.
   With few sequences the context is split into ``num_splits`` parts (flash-decoding): each program
   writes a normalised partial output and its log-sum-exp (fp32 scratch), and the reduce kernel
   merges the splits that saw keys. The split boundaries are computed *inside* both kernels from
   ``seq_lens`` (device), so any split count is correct for any context length. (Merging in the last
   program to finish, counted with an atomic, saved the second launch but measured 0.04 ms per
   Llama-3-8B step slower on an H200, so it was dropped.)
3. ``_prefill_kernel``: every other sequence (prefill or prefill chunk, possibly behind a cached
   prefix). One program per (tile of query tokens, sequence, KV head), heaviest tiles launched first;
   the tile's rows are (token, query head of the group) pairs, so again KV is read once per group. It
   walks the block table over keys ``[lo, ctx_len + last query of the tile]``: the keys before the
   tile's first query position without masks, the rest with the causal (and sliding-window) mask.

Softmax is online, in fp32 and base 2. Supported: fp32 / fp16 / bf16 queries (fp32 dots run in IEEE
precision, not tf32), any head dim (padded to a power of two with masks), any power-of-two
``block_size`` (16 and 32 are tested), GQA / MQA / MHA, optional sliding window (a query at position
p sees keys with ``p - window < pos <= p``). The cache may have another dtype than the query (it is
read in its own dtype and cast): an fp8 E4M3 cache (``kv_cache.dtype: fp8``, scale 1.0) is written
saturated to +-448 and read back cast to the query dtype; it halves the bytes the decode kernel reads.
Not implemented: attention sinks and logit soft-capping; the op says so in ``supported_features`` and
the loader refuses models that need them on this op.

Measured on one NVIDIA H200 (bench/kernels/check_attention.py; device copy 4.25 TB/s read+write): decode
256 seqs x 1024 ctx, Hq/Hkv/D 16/8/128 bf16, 254 us per layer = 4.2 TB/s of KV read (SDPA over a dense,
non-paged cache: 246 us); batch 1 x 32768 ctx, 32/8/128: 45 us (3.0 TB/s, 64 splits; dense SDPA 39 us);
prefill 8 x 512 tokens 16/8/128: 58 us (dense flash SDPA 35 us); 8 x 512 behind a 1536-token prefix,
32/8/128: 386 us (dense SDPA with mask 409 us). Host cost of one eager call of the op is ~65 us
(an empty Triton launch is ~11 us there): capture decode steps in a CUDA graph.

Tensor contract (what the kernels assume; checked by `_check_inputs`):
- ``query`` [T, Hq, D], ``key``/``value`` [T, Hkv, D]: any strides with a unit stride on D.
- ``k_cache``/``v_cache`` [num_blocks, block_size, Hkv, D] with a unit stride on D; other strides are
  passed to the kernels, so per-layer views into one ``[L, 2, ...]`` tensor are fine.
- ``meta.slot_mapping`` [T] int64, ``meta.query_start_loc`` [B+1] int32, ``meta.seq_lens`` [B] int32
  (context *including* this step's tokens), ``meta.block_tables`` [B, max_blocks] int32, all on the
  query's device. Sequences are ordered decodes first; decode ``i`` owns query row ``i``.

CUDA-graph contract (decode path, i.e. a step with ``num_decodes == num_seqs``):
- No host synchronisation, no ``.item()``/``.tolist()``, no data-dependent allocation: the output and
  the split scratch have shapes derived from tensor shapes and host ints only; the grid is
  ``(num_decodes, Hkv, num_splits)``. Context lengths and block ids are read by the kernel from
  ``meta.seq_lens`` / ``meta.block_tables`` each replay, and the kernel's loop bound is the
  sequence's own length, so replays with other lengths are correct as long as the tensors are
  updated in place and ``block_tables`` keeps its shape.
- ``num_splits`` is chosen from the number of decodes, Hkv, the SM count and the shape-derived
  context bound ``block_tables.shape[1] * block_size`` (the most any replay can see), so an eager
  warm-up on the graph's static buffers plans exactly what the capture plans. A runner may pin it with
  ``meta.extras["triton_num_splits"] = n``. The split count is a run-time kernel argument (not a
  constexpr) and the kernels don't specialise on it, so (for head dims that are multiples of 16) every
  split count shares one compiled kernel; a warm-up on the graph's buffers compiles everything the
  capture launches (don't let a kernel compile inside a capture).
- Prefill / mixed steps are eager only: their grid uses the host-side longest query chunk.
- Padded decode slots in a graph batch may use ``seq_len = 0`` and ``slot_mapping = -1``: they write
  nothing to the cache and produce zeros.
- Derived host state (the plan) and the split scratch are cached in ``meta.extras`` so the layers of
  one step share them; scratch reuse across layers is safe because launches are stream-ordered.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import triton
import triton.language as tl

from sagellm_core.attention.features import SLIDING_WINDOW

__all__ = ["triton_paged_attention", "write_kv_cache", "decode_attention", "prefill_attention"]

_LOG2E = 1.4426950408889634


# --------------------------------------------------------------------------------------------- kernels


@triton.jit
def _write_kv_kernel(
    key_ptr, value_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch,
    stride_vcb, stride_vcs, stride_vch,
    NUM_KV_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, H_PAD: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, SATURATE: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if slot < 0:
        return
    blk = slot // BLOCK_SIZE
    off = slot % BLOCK_SIZE
    offs_h = tl.arange(0, H_PAD)
    offs_d = tl.arange(0, D_PAD)
    mask = (offs_h[:, None] < NUM_KV_HEADS) & (offs_d[None, :] < HEAD_DIM)
    t64 = t.to(tl.int64)
    k = tl.load(key_ptr + t64 * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
    v = tl.load(value_ptr + t64 * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
    if SATURATE > 0:  # fp8 cache: clamp to its finite range (the cast itself does not saturate)
        k = tl.minimum(tl.maximum(k.to(tl.float32), -SATURATE), SATURATE)
        v = tl.minimum(tl.maximum(v.to(tl.float32), -SATURATE), SATURATE)
    kc = k_cache_ptr + blk * stride_kcb + off * stride_kcs + offs_h[:, None] * stride_kch + offs_d[None, :]
    vc = v_cache_ptr + blk * stride_vcb + off * stride_vcs + offs_h[:, None] * stride_vch + offs_d[None, :]
    tl.store(kc, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
    tl.store(vc, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _attend_tile(
    acc, m_i, l_i, q, q_pos, start_n, hi, window,
    k_cache_ptr, v_cache_ptr, bt_row, kv_off_k, kv_off_v,
    stride_kb, stride_ks, stride_vb, stride_vs, qk_scale,
    offs_n, offs_d,
    HEAD_DIM: tl.constexpr, BLOCK_SIZE: tl.constexpr,
    MASK_KEYS: tl.constexpr, CAUSAL: tl.constexpr, USE_WINDOW: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """One BLOCK_N tile of keys [start_n, start_n + BLOCK_N) folded into the online softmax state.

    ``q_pos`` [M] are the rows' absolute positions; keys at ``pos >= hi`` are dropped when MASK_KEYS.
    """
    pos = start_n + offs_n
    d_mask = offs_d[None, :] < HEAD_DIM
    if MASK_KEYS:
        key_valid = pos < hi
        blk = tl.load(bt_row + pos // BLOCK_SIZE, mask=key_valid, other=0).to(tl.int64)
        ld_mask = key_valid[:, None] & d_mask
    else:
        blk = tl.load(bt_row + pos // BLOCK_SIZE).to(tl.int64)
        ld_mask = d_mask
    in_blk = pos % BLOCK_SIZE
    k_ptrs = k_cache_ptr + kv_off_k + (blk * stride_kb + in_blk * stride_ks)[:, None] + offs_d[None, :]
    v_ptrs = v_cache_ptr + kv_off_v + (blk * stride_vb + in_blk * stride_vs)[:, None] + offs_d[None, :]
    k = tl.load(k_ptrs, mask=ld_mask, other=0.0).to(q.dtype)
    v = tl.load(v_ptrs, mask=ld_mask, other=0.0).to(q.dtype)

    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # [M, N], log2 units
    if MASK_KEYS:
        allowed = key_valid[None, :]
        if CAUSAL:
            allowed = allowed & (pos[None, :] <= q_pos[:, None])
        if USE_WINDOW:
            allowed = allowed & (pos[None, :] > q_pos[:, None] - window)
        qk = tl.where(allowed, qk, float("-inf"))

    m_new = tl.maximum(m_i, tl.max(qk, 1))
    if MASK_KEYS:
        # A row may see no key of this tile (causal / window): keep exp2 away from (-inf) - (-inf).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    else:
        m_safe = m_new
    p = tl.math.exp2(qk - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, m_new, l_i


@triton.jit
def _split_range(seq_len, window, num_splits, USE_WINDOW: tl.constexpr, BLOCK_N: tl.constexpr):
    """(lo, split_len): a sequence's keys [lo, seq_len) cut into ``num_splits`` parts of whole
    BLOCK_N tiles; split s covers [lo + s * split_len, lo + (s + 1) * split_len)."""
    if USE_WINDOW:
        lo = tl.maximum(seq_len - window, 0)
    else:
        lo = seq_len * 0
    return lo, tl.cdiv(tl.cdiv(seq_len - lo, num_splits), BLOCK_N) * BLOCK_N


# Ints that vary with the step or the split count are not specialised on (no %16 / ==1 variants): one
# compiled decode kernel serves every batch and split count (the partial-output strides are multiples of
# D, so their %16 specialisation does not depend on the split count when D % 16 == 0).
@triton.jit(do_not_specialize=["stride_bt", "window", "num_splits", "stride_ml_t", "stride_ml_h"])
def _decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr, mid_o_ptr, mid_lse_ptr,
    seq_lens_ptr, block_tables_ptr,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_bt,
    stride_mo_t, stride_mo_h, stride_mo_s, stride_ml_t, stride_ml_h,
    qk_scale, window, num_splits,
    GROUP: tl.constexpr, BLOCK_H: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, USE_WINDOW: tl.constexpr, DOT_PREC: tl.constexpr,
    KV_F16: tl.constexpr,
):
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + seq)
    # num_splits is a run-time value (one compiled kernel for every split count, so graph capture
    # never compiles).
    lo, split_len = _split_range(seq_len, window, num_splits, USE_WINDOW, BLOCK_N)
    start = lo + split * split_len
    end = tl.minimum(start + split_len, seq_len)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, D_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    heads = kvh * GROUP + offs_h
    row_mask = (offs_h[:, None] < GROUP) & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(q_ptr + seq.to(tl.int64) * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=row_mask, other=0.0)
    if KV_F16:  # fp8 codes widen to fp16 in one instruction per pair (to bf16 it takes three)
        q = q.to(tl.float16)
    q_pos = tl.zeros([BLOCK_H], dtype=tl.int32) + (seq_len - 1)

    m_i = tl.full([BLOCK_H], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, D_PAD], dtype=tl.float32)
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    for start_n in range(start, end, BLOCK_N):
        acc, m_i, l_i = _attend_tile(
            acc, m_i, l_i, q, q_pos, start_n, end, window,
            k_cache_ptr, v_cache_ptr, bt_row, kvh * stride_kh, kvh * stride_vh,
            stride_kb, stride_ks, stride_vb, stride_vs, qk_scale, offs_n, offs_d,
            HEAD_DIM, BLOCK_SIZE, True, False, False, DOT_PREC,
        )

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    if num_splits == 1:
        tl.store(out_ptr + seq.to(tl.int64) * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
                 o.to(out_ptr.dtype.element_ty), mask=row_mask)
    elif start < end:  # the merge reads only the splits that saw keys
        lse = m_i + tl.math.log2(l_i)
        mo = mid_o_ptr + seq * stride_mo_t + heads[:, None] * stride_mo_h + split * stride_mo_s + offs_d[None, :]
        tl.store(mo, o, mask=row_mask)
        tl.store(mid_lse_ptr + seq * stride_ml_t + heads * stride_ml_h + split, lse, mask=offs_h < GROUP)


@triton.jit(do_not_specialize=["window", "num_splits", "stride_ml_t", "stride_ml_h"])
def _decode_reduce_kernel(
    out_ptr, mid_o_ptr, mid_lse_ptr, seq_lens_ptr,
    stride_ot, stride_oh, stride_mo_t, stride_mo_h, stride_mo_s, stride_ml_t, stride_ml_h,
    window, num_splits, USE_WINDOW: tl.constexpr, BLOCK_N: tl.constexpr,
    S_CHUNK: tl.constexpr, HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr,
):
    """out[seq, head] = the log-sum-exp weighted mean of the splits that saw keys (their count
    follows from the sequence's length, so a graph sized for long contexts merges few partials for a
    short one; a sequence without keys gets zeros)."""
    seq = tl.program_id(0)
    head = tl.program_id(1)
    seq_len = tl.load(seq_lens_ptr + seq)
    lo, split_len = _split_range(seq_len, window, num_splits, USE_WINDOW, BLOCK_N)
    active = tl.cdiv(seq_len - lo, tl.maximum(split_len, 1))
    offs_s = tl.arange(0, S_CHUNK)
    offs_d = tl.arange(0, D_PAD)
    lse_row = mid_lse_ptr + seq * stride_ml_t + head * stride_ml_h
    o_row = mid_o_ptr + seq * stride_mo_t + head * stride_mo_h
    m = tl.max(tl.full([S_CHUNK], float("-inf"), dtype=tl.float32), 0)
    acc = tl.zeros([D_PAD], dtype=tl.float32)
    total = tl.sum(tl.zeros([S_CHUNK], dtype=tl.float32), 0)
    for s0 in range(0, active, S_CHUNK):
        s_mask = s0 + offs_s < active
        lse = tl.load(lse_row + s0 + offs_s, mask=s_mask, other=float("-inf"))
        m_new = tl.maximum(m, tl.max(lse, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        rescale = tl.math.exp2(m - m_safe)
        w = tl.math.exp2(lse - m_safe)
        mask = s_mask[:, None] & (offs_d[None, :] < HEAD_DIM)
        o = tl.load(o_row + (s0 + offs_s)[:, None] * stride_mo_s + offs_d[None, :], mask=mask, other=0.0)
        acc = acc * rescale + tl.sum(o * w[:, None], 0)
        total = total * rescale + tl.sum(w, 0)
        m = m_new
    total = tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + seq.to(tl.int64) * stride_ot + head * stride_oh + offs_d,
             (acc / total).to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM)


@triton.jit(do_not_specialize=["stride_bt", "window", "seq_offset"])
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, out_ptr,
    query_start_loc_ptr, seq_lens_ptr, block_tables_ptr,
    stride_qt, stride_qh, stride_ot, stride_oh,
    stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
    stride_bt,
    qk_scale, window, seq_offset,
    GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, BLOCK_Q: tl.constexpr,
    HEAD_DIM: tl.constexpr, D_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr,
    USE_WINDOW: tl.constexpr, DOT_PREC: tl.constexpr, KV_F16: tl.constexpr,
):
    BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_PAD
    # Query tiles of one sequence differ in work (causal): launch the last (heaviest) tiles first so
    # the light ones fill the tail of the wave.
    tile = tl.num_programs(0) - 1 - tl.program_id(0)
    seq = seq_offset + tl.program_id(1)
    kvh = tl.program_id(2)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    tile_start = tile * BLOCK_Q
    if tile_start >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    ctx_len = seq_len - q_len

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    offs_n = tl.arange(0, BLOCK_N)
    q_idx = tile_start + offs_m // GROUP_PAD
    hh = offs_m % GROUP_PAD
    row_valid = (q_idx < q_len) & (hh < GROUP)
    q_pos = ctx_len + q_idx
    rows = (q_start + q_idx).to(tl.int64)
    heads = kvh * GROUP + hh
    io_mask = row_valid[:, None] & (offs_d[None, :] < HEAD_DIM)
    q = tl.load(q_ptr + rows[:, None] * stride_qt + heads[:, None] * stride_qh + offs_d[None, :],
                mask=io_mask, other=0.0)
    if KV_F16:
        q = q.to(tl.float16)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], dtype=tl.float32)
    bt_row = block_tables_ptr + seq.to(tl.int64) * stride_bt
    first_pos = ctx_len + tile_start
    hi = ctx_len + tl.minimum(tile_start + BLOCK_Q, q_len)  # one past the tile's last query position
    if USE_WINDOW:
        lo = tl.maximum(first_pos - window + 1, 0) // BLOCK_N * BLOCK_N
        for start_n in range(lo, hi, BLOCK_N):
            acc, m_i, l_i = _attend_tile(
                acc, m_i, l_i, q, q_pos, start_n, hi, window,
                k_cache_ptr, v_cache_ptr, bt_row, kvh * stride_kh, kvh * stride_vh,
                stride_kb, stride_ks, stride_vb, stride_vs, qk_scale, offs_n, offs_d,
                HEAD_DIM, BLOCK_SIZE, True, True, True, DOT_PREC,
            )
    else:
        # Keys before the tile's first query position are visible to every row: no masks.
        full_hi = first_pos // BLOCK_N * BLOCK_N
        for start_n in range(0, full_hi, BLOCK_N):
            acc, m_i, l_i = _attend_tile(
                acc, m_i, l_i, q, q_pos, start_n, hi, window,
                k_cache_ptr, v_cache_ptr, bt_row, kvh * stride_kh, kvh * stride_vh,
                stride_kb, stride_ks, stride_vb, stride_vs, qk_scale, offs_n, offs_d,
                HEAD_DIM, BLOCK_SIZE, False, False, False, DOT_PREC,
            )
        for start_n in range(full_hi, hi, BLOCK_N):
            acc, m_i, l_i = _attend_tile(
                acc, m_i, l_i, q, q_pos, start_n, hi, window,
                k_cache_ptr, v_cache_ptr, bt_row, kvh * stride_kh, kvh * stride_vh,
                stride_kb, stride_ks, stride_vb, stride_vs, qk_scale, offs_n, offs_d,
                HEAD_DIM, BLOCK_SIZE, True, True, False, DOT_PREC,
            )

    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    o = acc / l_safe[:, None]
    tl.store(out_ptr + rows[:, None] * stride_ot + heads[:, None] * stride_oh + offs_d[None, :],
             o.to(out_ptr.dtype.element_ty), mask=io_mask)


# --------------------------------------------------------------------------------------------- host side

_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return 8  # Triton interpreter on the CPU: any small number
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def widen_to_f16(query: torch.Tensor, k_cache: torch.Tensor) -> bool:
    """Whether the kernels widen an fp8 cache to fp16 (and the bf16 query with it) for their dots: on
    Hopper E4M3 -> fp16 is one conversion per pair of codes, E4M3 -> bf16 goes through fp16 and fp32
    (H100, 256 x 1024 decode: 233 us a layer against 281 us; bf16 cache 351 us). Queries of any
    realistic magnitude fit fp16; the softmax and the accumulators stay fp32.
    ``SAGELLM_FP8_ATTN_F16=0`` in the environment keeps the codes in bf16 (A/B measurements)."""
    return (os.environ.get("SAGELLM_FP8_ATTN_F16") != "0" and query.dtype == torch.bfloat16
            and k_cache.dtype == torch.float8_e4m3fn)


def _check_inputs(query, k_cache, v_cache) -> None:
    if query.stride(-1) != 1 or k_cache.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise ValueError("triton paged attention needs a unit stride on the head dim of query and caches")
    if query.shape[1] % k_cache.shape[2]:
        raise ValueError(f"{query.shape[1]} query heads are not a multiple of {k_cache.shape[2]} KV heads")


def _saturation(cache_dtype: torch.dtype) -> float:
    """The largest finite value of an fp8 cache dtype (stores clamp to it), 0.0 for other dtypes."""
    return float(torch.finfo(cache_dtype).max) if cache_dtype == torch.float8_e4m3fn else 0.0


def write_kv_cache(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                   slot_mapping: torch.Tensor) -> None:
    """Scatter the step's new K/V [T, Hkv, D] into their cache slots (negative slots are skipped)."""
    num_tokens = key.shape[0]
    if num_tokens == 0:
        return
    if key.stride(-1) != 1:
        key = key.contiguous()
    if value.stride(-1) != 1:
        value = value.contiguous()
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    h_pad = triton.next_power_of_2(num_kv_heads)
    d_pad = max(16, triton.next_power_of_2(head_dim))
    _write_kv_kernel[(num_tokens,)](
        key, value, k_cache, v_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEAD_DIM=head_dim, H_PAD=h_pad, D_PAD=d_pad, BLOCK_SIZE=block_size,
        SATURATE=_saturation(k_cache.dtype), num_warps=4 if h_pad * d_pad >= 1024 else 1,
    )


PROGRAMS_PER_SM = 4
"""About how many decode programs an SM keeps resident; splitting aims at one full wave of them."""
MAX_SPLITS = 64


def _choose_splits(num_decodes: int, num_kv_heads: int, ctx_bound: int, block_n: int, device: torch.device) -> int:
    """Split count for (decodes x KV heads) programs: as many splits as still fit one wave of resident
    programs (rounding down: a second, partial wave costs more than it brings), each split at least two
    tiles long. Measured on an H200: 32 x 2048 tokens, Hkv 8 -> 2 splits (3 was 15% slower); 1 x 4096 -> 32;
    1 x 32768 -> 64; 64 x 4096 -> 1."""
    programs = max(num_decodes * num_kv_heads, 1)
    wave = PROGRAMS_PER_SM * _sm_count(device)
    return max(1, min(wave // programs, triton.cdiv(max(ctx_bound, 1), 2 * block_n), MAX_SPLITS))


def decode_attention(
    query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
    seq_lens: torch.Tensor, block_tables: torch.Tensor, num_decodes: int, scale: float,
    sliding_window: int | None = None, num_splits: int = 1, block_n: int | None = None,
    num_warps: int | None = None, num_stages: int | None = None,
    scratch: tuple[torch.Tensor, torch.Tensor] | None = None, kv_f16: bool | None = None,
) -> None:
    """Attention of query rows [0, num_decodes) (one token per sequence) into ``out`` rows.

    ``kv_f16`` (default: `widen_to_f16`) runs the dots in fp16 on a bf16 query over an fp8 cache."""
    if num_decodes == 0:
        return
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    num_heads = query.shape[1]
    group = num_heads // num_kv_heads
    block_h = max(16, triton.next_power_of_2(group))
    d_pad = max(16, triton.next_power_of_2(head_dim))
    # fp32 dots run on FMA units (IEEE): a smaller tile with more warps for D > 128 avoids spills.
    wide_fp32 = query.dtype == torch.float32 and d_pad > 128
    fp8 = k_cache.dtype == torch.float8_e4m3fn
    if block_n is None:
        block_n = 32 if wide_fp32 else 64
    if num_warps is None:  # fp8: two warps, 216 vs 236 us per layer with four (fp8_attention_sweep.py, H100)
        num_warps = 8 if wide_fp32 else 2 if fp8 else 4
    if num_stages is None:
        num_stages = 2 if query.dtype == torch.float32 else 3
    block_n = max(block_n, 16)
    if scratch is None:
        scratch = _alloc_scratch(num_decodes, num_heads, num_splits, head_dim, query.device)
    mid_o, mid_lse = scratch  # fp32 even when unused, so one compiled kernel serves every split count
    mo_strides = (mid_o.stride(0), mid_o.stride(1), mid_o.stride(2)) if num_splits > 1 else (0, 0, 0)
    ml_strides = (mid_lse.stride(0), mid_lse.stride(1)) if num_splits > 1 else (0, 0)
    window = int(sliding_window) if sliding_window is not None else 0
    _decode_kernel[(num_decodes, num_kv_heads, num_splits)](
        query, k_cache, v_cache, out, mid_o, mid_lse, seq_lens, block_tables,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), *mo_strides, *ml_strides,
        scale * _LOG2E, window, num_splits,
        GROUP=group, BLOCK_H=block_h, HEAD_DIM=head_dim, D_PAD=d_pad, BLOCK_SIZE=block_size,
        BLOCK_N=block_n, USE_WINDOW=sliding_window is not None,
        DOT_PREC=_dot_precision(query.dtype), num_warps=num_warps, num_stages=num_stages,
        KV_F16=widen_to_f16(query, k_cache) if kv_f16 is None else kv_f16,
    )
    if num_splits > 1:
        _decode_reduce_kernel[(num_decodes, num_heads)](
            out, mid_o, mid_lse, seq_lens, out.stride(0), out.stride(1), *mo_strides, *ml_strides,
            window, num_splits, USE_WINDOW=sliding_window is not None, BLOCK_N=block_n,
            S_CHUNK=16, HEAD_DIM=head_dim, D_PAD=d_pad, num_warps=4 if d_pad >= 128 else 2,
        )


def _alloc_scratch(num_decodes: int, num_heads: int, num_splits: int, head_dim: int,
                   device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    if num_splits == 1:  # unused by the kernel: two 1-element placeholders of the right dtype
        return torch.empty(1, dtype=torch.float32, device=device), torch.empty(1, dtype=torch.float32, device=device)
    mid_o = torch.empty((num_decodes, num_heads, num_splits, head_dim), dtype=torch.float32, device=device)
    mid_lse = torch.empty((num_decodes, num_heads, num_splits), dtype=torch.float32, device=device)
    return mid_o, mid_lse


def _prefill_config(dtype: torch.dtype, d_pad: int, group_pad: int, device: torch.device) -> tuple[int, int, int, int]:
    """(BLOCK_M rows, BLOCK_N keys, num_warps, num_stages)."""
    if device.type != "cuda":
        return max(16, group_pad), 16, 4, 1
    # Chosen so that ptxas (sm_90a) reports no spills for D = 64 / 128 / 256.
    if dtype == torch.float32:
        block_m, block_n, warps = 32, 16, 8
    elif d_pad > 128:
        block_m, block_n, warps = 64, 32, 8
    else:
        block_m, block_n, warps = 64, 64, 4  # best of 7 configs at 8 x 512 (+/- 1536 prefix) on an H200
    return max(block_m, group_pad), block_n, warps, 2


def prefill_attention(
    query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, out: torch.Tensor,
    query_start_loc: torch.Tensor, seq_lens: torch.Tensor, block_tables: torch.Tensor,
    first_seq: int, num_seqs: int, max_query_len: int, scale: float, sliding_window: int | None = None,
    config: tuple[int, int, int, int] | None = None,
) -> None:
    """Causal attention of the query chunks of sequences [first_seq, first_seq + num_seqs)."""
    if num_seqs == 0 or max_query_len == 0:
        return
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    num_heads = query.shape[1]
    group = num_heads // num_kv_heads
    group_pad = triton.next_power_of_2(group)
    d_pad = max(16, triton.next_power_of_2(head_dim))
    block_m, block_n, num_warps, num_stages = config or _prefill_config(query.dtype, d_pad, group_pad, query.device)
    block_q = max(1, block_m // group_pad)
    window = int(sliding_window) if sliding_window is not None else 0
    grid = (triton.cdiv(max_query_len, block_q), num_seqs, num_kv_heads)
    _prefill_kernel[grid](
        query, k_cache, v_cache, out, query_start_loc, seq_lens, block_tables,
        query.stride(0), query.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0), scale * _LOG2E, window, first_seq,
        GROUP=group, GROUP_PAD=group_pad, BLOCK_Q=block_q, HEAD_DIM=head_dim, D_PAD=d_pad,
        BLOCK_SIZE=block_size, BLOCK_N=block_n, USE_WINDOW=sliding_window is not None,
        DOT_PREC=_dot_precision(query.dtype), num_warps=num_warps, num_stages=num_stages,
        KV_F16=widen_to_f16(query, k_cache),
    )


def _plan(meta: Any, query: torch.Tensor, k_cache: torch.Tensor, sliding_window: int | None) -> dict[str, Any]:
    """Host-side plan of the step, shared by all layers through ``meta.extras``."""
    num_heads = query.shape[1]
    _, block_size, num_kv_heads, head_dim = k_cache.shape
    key = ("triton_plan", num_heads, num_kv_heads, head_dim, query.dtype, sliding_window)
    plan = meta.extras.get(key)
    if plan is not None:
        return plan
    n_dec = meta.num_decodes
    num_splits = 1
    if n_dec:
        num_splits = meta.extras.get("triton_num_splits")
        if num_splits is None:
            # A shape-derived bound, so a warm-up step and the graph captured on the same static
            # buffers choose the same plan.
            ctx_bound = meta.block_tables.shape[1] * block_size
            if sliding_window is not None:
                ctx_bound = min(ctx_bound, sliding_window)
            num_splits = _choose_splits(n_dec, num_kv_heads, ctx_bound, 64, query.device)
    scratch = None
    if n_dec:
        scratch_key = ("triton_scratch", n_dec, num_heads, num_splits, head_dim)
        scratch = meta.extras.get(scratch_key)
        if scratch is None:
            scratch = meta.extras[scratch_key] = _alloc_scratch(n_dec, num_heads, num_splits, head_dim, query.device)
    prefill_lens = meta.query_lens_host[n_dec:]
    plan = {
        "num_splits": num_splits,
        "scratch": scratch,
        "num_prefills": len(prefill_lens),
        "max_prefill_len": max(prefill_lens, default=0),
    }
    meta.extras[key] = plan
    return plan


def triton_paged_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: Any,
    scale: float,
    sliding_window: int | None = None,
) -> torch.Tensor:
    """See `sagellm_core.backend.PagedAttentionOp` and this module's docstring for the contract."""
    _check_inputs(query, k_cache, v_cache)
    write_kv_cache(key, value, k_cache, v_cache, meta.slot_mapping)
    out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
    plan = _plan(meta, query, k_cache, sliding_window)
    n_dec = meta.num_decodes
    if n_dec:
        decode_attention(query, k_cache, v_cache, out, meta.seq_lens, meta.block_tables, n_dec, scale,
                         sliding_window, num_splits=plan["num_splits"], scratch=plan["scratch"])
    if plan["num_prefills"]:
        prefill_attention(query, k_cache, v_cache, out, meta.query_start_loc, meta.seq_lens, meta.block_tables,
                          n_dec, plan["num_prefills"], plan["max_prefill_len"], scale, sliding_window)
    return out


# Attention sinks and logit soft-capping are not implemented in these kernels: the loader refuses
# models that need them on this op (`sagellm_core.models.support`) instead of running them wrong.
triton_paged_attention.supported_features = frozenset({SLIDING_WINDOW})  # type: ignore[attr-defined]
