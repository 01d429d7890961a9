"""Paged attention for the CPU backend: the reference's semantics, laid out for the host's caches.

On the CPU a decode step's attention is memory traffic: every layer reads each sequence's K and V
once. The reference gathers all context slots of the batch into one padded tensor per layer (tens of
MB: page faults on every fresh allocation, then a second pass for SDPA). Here, once per step, the
decodes are sorted by context length and cut into chunks of similar length (padding only to the
chunk's longest context). Per layer and chunk, on the GQA-folded layout (batch c * Hkv, G query heads
per KV head), the K rows are gathered by fbgemm's `embedding_bag` kernel (one-row bags: faster than
`index_select`), `baddbmm` fuses scale and additive mask into the scores, and softmax(scores) @ V
never materialises V: each query head's output is an `embedding_bag` of its value rows weighted by
its probabilities. Scratch buffers are reused across layers and steps, and the plan (sort, chunks,
row indices, masks) is built once per step and cached in ``meta.extras`` under ``meta.generation``.
Prefill chunks without a cached prefix attend over their fresh K/V with causal SDPA (no gather);
chunks that extend a cached prefix gather their context rows.

Logit soft-capping and attention sinks (see `sagellm_core.attention.reference`) are applied to the
scores before the softmax on both paths; prefill chunks then attend through the reference's
`explicit_attention` instead of SDPA.

Results match `reference_paged_attention` (the oracle) to float rounding.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
import torch.nn.functional as F

from sagellm_core.attention.features import ALL_FEATURES
from sagellm_core.attention.metadata import AttentionMetadata
from sagellm_core.attention.reference import FP8_DTYPES, explicit_attention, folded_sinks, reference_paged_attention

# Context tokens per decode chunk: the chunk's gathered K takes CHUNK_TOKENS * Hkv * D * 4 bytes in
# fp32 (6 MB for 3 KV heads of 64). Smaller chunks stay in faster caches but cost more calls; on a
# 2-core host 4096-16384 measured alike, 2048 and less ~25% slower.
CHUNK_TOKENS = 8192
# Decode scores up to this size are fresh tensors (a batch-1 decode's are a few KB), larger ones scratch.
_SMALL_SCORES_BYTES = 256 << 10
# Scratch buffers above this many bytes are not kept between calls.
_MAX_SCRATCH_BYTES = 64 << 20

_PLAN_KEY = "cpu_attention_plan"
_BAG_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


class _DecodeChunk:
    """Decode rows attended together, padded to the longest context among them."""

    __slots__ = ("size", "offset", "length", "q_rows", "k_rows", "k_offsets", "v_bags", "v_offsets", "bias")

    def __init__(self, size: int, offset: int, length: int, q_rows: torch.Tensor, k_rows: torch.Tensor,
                 v_bags: torch.Tensor, bias: torch.Tensor) -> None:
        self.size = size  # c sequences
        self.offset = offset  # first batch row of this chunk in the [sum(c * Hkv), G, D] query buffer
        self.length = length  # L keys per sequence (padded)
        self.q_rows = q_rows  # [c * Hkv] rows of the [n * Hkv, G, D] query / output views
        self.k_rows = k_rows  # [c * Hkv * L] rows of the layer's [slots * Hkv, D] K view
        self.k_offsets = torch.arange(k_rows.numel(), device=k_rows.device)  # one-row bags: a plain gather
        self.v_bags = v_bags  # [c * Hkv * G * L] rows of the V view: one bag of L rows per query head
        self.v_offsets = torch.arange(0, v_bags.numel(), length, device=v_bags.device)
        self.bias = bias  # [c * Hkv, 1, L]: 0 where a key is visible, -inf elsewhere


class _DecodePlan:
    __slots__ = ("chunks", "q_rows", "zero_rows", "in_order")

    def __init__(self, chunks: list[_DecodeChunk], q_rows: torch.Tensor, zero_rows: torch.Tensor | None) -> None:
        self.chunks = chunks
        self.q_rows = q_rows  # every chunk's q_rows, in order
        self.zero_rows = zero_rows  # decode rows without context (padding): their output is zero
        # q_rows is 0, 1, 2, ...: the chunks read the query groups where they are (batch-1 decode)
        self.in_order = bool(torch.equal(q_rows, torch.arange(q_rows.numel(), device=q_rows.device)))


class _PrefillSeq:
    __slots__ = ("begin", "end", "seq_len", "rows", "mask")

    def __init__(self, begin: int, end: int, seq_len: int, rows: torch.Tensor | None,
                 mask: torch.Tensor | None) -> None:
        self.begin, self.end, self.seq_len = begin, end, seq_len
        self.rows = rows  # K/V rows of positions 0..seq_len-1, or None: attend over the fresh K/V
        self.mask = mask  # [G * n, seq_len] bool (GQA-folded), or None: plain causal


class _StepPlan:
    """What every layer of one step reuses: write indices, decode chunks, prefill descriptors."""

    def __init__(self, meta: AttentionMetadata) -> None:
        self.generation = meta.generation
        slots = meta.slot_mapping
        self.write_keep: torch.Tensor | None = None  # token rows that have a slot (set if some are padding)
        if slots.numel() and int(slots.min()) < 0:
            self.write_keep = (slots >= 0).nonzero().squeeze(1)
            slots = slots[self.write_keep]
        self.write_slots = slots.long()
        self.decodes: dict[tuple[Any, ...], _DecodePlan] = {}
        self.prefills: dict[tuple[Any, ...], list[_PrefillSeq]] = {}


def _step_plan(meta: AttentionMetadata) -> _StepPlan:
    # NOTE: one entry, replaced when the generation changes: reused metadata (graph replays) never
    # sees a stale plan, and its extras do not grow with the number of replays.
    plan = meta.extras.get(_PLAN_KEY)
    if plan is None or plan.generation != meta.generation:
        plan = meta.extras[_PLAN_KEY] = _StepPlan(meta)
    return plan


def _kv_rows(slots: torch.Tensor, num_kv_heads: int, num_slots: int) -> torch.Tensor:
    """Rows of the [2 * num_slots * Hkv, D] view of a layer's K/V for cache slots [m, L]: ordered
    (K then V, KV head, sequence, position), i.e. head-major [2, Hkv * m, L, D] once gathered."""
    heads = torch.arange(num_kv_heads, device=slots.device)[:, None]
    k_rows = slots.reshape(1, -1) * num_kv_heads + heads
    return torch.cat([k_rows, k_rows + num_slots * num_kv_heads]).reshape(-1)


def _plan_decodes(meta: AttentionMetadata, sliding_window: int | None, num_kv_heads: int, group: int,
                  dtype: torch.dtype) -> _DecodePlan:
    """Decode rows sorted by context length and cut into chunks of at most ~CHUNK_TOKENS keys.

    Lengths come from the ``seq_lens`` tensor (graph replays refill it; the host list may be a bound).
    """
    n = meta.num_decodes
    bs = meta.block_size
    device = meta.block_tables.device
    tables = meta.block_tables[:n].long()
    width = tables.shape[1]
    lengths = meta.seq_lens[:n].tolist()
    firsts = [0 if sliding_window is None else max(0, length - sliding_window) for length in lengths]
    order = sorted((i for i in range(n) if lengths[i] > 0), key=lambda i: firsts[i] - lengths[i])
    heads = torch.arange(num_kv_heads, device=device)[:, None]
    chunks: list[_DecodeChunk] = []
    pos = offset = 0
    while pos < len(order):
        longest = lengths[order[pos]] - firsts[order[pos]]  # sorted: the chunk's first row is its longest
        size = max(1, min(len(order) - pos, CHUNK_TOKENS // longest))
        members = order[pos: pos + size]
        pos += size
        rows = torch.tensor(members, dtype=torch.int64, device=device)
        first = torch.tensor([firsts[i] for i in members], dtype=torch.int64, device=device)[:, None]
        length = torch.tensor([lengths[i] for i in members], dtype=torch.int64, device=device)[:, None]
        key_pos = first + torch.arange(longest, device=device)  # [c, L]
        visible = key_pos < length
        block = tables[rows[:, None], (key_pos // bs).clamp_(max=width - 1)]
        slots = torch.where(visible, block * bs + key_pos % bs, 0)
        # NOTE: batch order (sequence, KV head): a sequence's K/V rows of all heads share cache lines and
        # blocks, so gathering them back to back reads each block from memory once.
        kv_rows = slots[:, None, :] * num_kv_heads + heads[None]  # [c, Hkv, L]: rows of the [slots * Hkv, D] views
        batch = num_kv_heads * size
        v_bags = kv_rows.reshape(batch, 1, longest).expand(batch, group, longest).reshape(-1)
        bias = torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill_(~visible, float("-inf"))
        bias = bias[:, None, None, :].expand(size, num_kv_heads, 1, longest).reshape(batch, 1, longest)
        q_rows = (rows[:, None] * num_kv_heads + heads.view(1, -1)).reshape(-1)
        chunks.append(_DecodeChunk(size, offset, longest, q_rows, kv_rows.reshape(-1), v_bags, bias))
        offset += batch
    empty = [i for i in range(n) if lengths[i] <= 0]
    zero_rows = torch.tensor(empty, dtype=torch.int64, device=device) if empty else None
    q_rows = torch.cat([c.q_rows for c in chunks]) if chunks else torch.empty(0, dtype=torch.int64, device=device)
    return _DecodePlan(chunks, q_rows, zero_rows)


def _plan_prefills(meta: AttentionMetadata, sliding_window: int | None, group: int, num_kv_heads: int,
                   num_slots: int, fresh_ok: bool) -> list[_PrefillSeq]:
    starts = meta.query_start_loc.tolist()
    bs = meta.block_size
    device = meta.block_tables.device
    seqs = []
    for i in range(meta.num_decodes, meta.num_seqs):
        begin, end = starts[i], starts[i + 1]
        n, seq_len = end - begin, meta.seq_lens_host[i]
        rows = mask = None
        if not (fresh_ok and seq_len == n):
            positions = torch.arange(seq_len, device=device)
            slots = meta.block_tables[i, positions // bs].long() * bs + positions % bs
            rows = _kv_rows(slots[None], num_kv_heads, num_slots)
        if sliding_window is not None or seq_len != n:
            query_pos = torch.arange(seq_len - n, seq_len, device=device)[:, None]
            key_pos = torch.arange(seq_len, device=device)[None, :]
            mask = key_pos <= query_pos
            if sliding_window is not None:
                mask &= key_pos > query_pos - sliding_window
            if group > 1:  # rows of the folded query are (head in group, position)
                mask = mask[None].expand(group, n, seq_len).reshape(group * n, seq_len)
        seqs.append(_PrefillSeq(begin, end, seq_len, rows, mask))
    return seqs


def _kv_pair(k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor | None:
    """[2, num_blocks, block_size, Hkv, D] view of both caches when V directly follows K in memory
    (the layer's slice of the KV tensor), else None."""
    if (k_cache.shape != v_cache.shape or k_cache.dtype != v_cache.dtype or not k_cache.is_contiguous()
            or not v_cache.is_contiguous()
            or k_cache.untyped_storage().data_ptr() != v_cache.untyped_storage().data_ptr()
            or v_cache.data_ptr() - k_cache.data_ptr() != k_cache.numel() * k_cache.element_size()):
        return None
    return k_cache.as_strided((2, *k_cache.shape), (k_cache.numel(), *k_cache.stride()))


class CPUPagedAttention:
    """A `sagellm_core.backend.PagedAttentionOp` with its own scratch buffers (one per model runner)."""

    supported_features = ALL_FEATURES

    def __init__(self) -> None:
        self._scratch: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def _buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        # NOTE: grow-only and reused by every layer and step: fresh multi-MB tensors cost page faults.
        numel = 1
        for s in shape:
            numel *= s
        buf = self._scratch.get((name, dtype))
        if buf is None or buf.numel() < numel:
            buf = torch.empty(numel, dtype=dtype)
            if numel * buf.element_size() > _MAX_SCRATCH_BYTES:
                return buf.view(shape)
            self._scratch[(name, dtype)] = buf
        return buf[:numel].view(shape)

    def __call__(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
        sliding_window: int | None = None,
        *,
        sinks: torch.Tensor | None = None,
        softcap: float | None = None,
    ) -> torch.Tensor:
        """See `sagellm_core.backend.PagedAttentionOp`."""
        if k_cache.dtype in FP8_DTYPES:  # an fp8 KV cache (kv_cache.dtype: fp8) runs the reference op
            return reference_paged_attention(query, key, value, k_cache, v_cache, meta, scale, sliding_window)
        plan = _step_plan(meta)
        num_kv_heads, head_dim = k_cache.shape[-2:]
        if plan.write_slots.numel():
            k_new, v_new = key, value
            if plan.write_keep is not None:
                k_new, v_new = key[plan.write_keep], value[plan.write_keep]
            k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, plan.write_slots, k_new.to(k_cache.dtype))
            v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, plan.write_slots, v_new.to(v_cache.dtype))
        # Contiguous [T, Hq, D]: the model's reshape to [T, Hq * D] is then a view, not a copy. A step of
        # decodes only may get its output from `_decode` as computed (see there).
        decodes_only = 0 < meta.num_decodes == meta.num_seqs == query.shape[0]
        out = None if decodes_only else torch.empty(query.shape, dtype=query.dtype, device=query.device)
        if meta.num_decodes:
            out = self._decode(query, k_cache, v_cache, meta, plan, scale, sliding_window, out, softcap, sinks)
        assert out is not None
        if meta.num_decodes < meta.num_seqs:
            self._prefill(query, key, value, k_cache, v_cache, meta, plan, scale, sliding_window, out, softcap,
                          sinks)
        return out

    def _gather(self, k_cache: torch.Tensor, v_cache: torch.Tensor, rows: torch.Tensor, dtype: torch.dtype
                ) -> torch.Tensor:
        """K and V rows (see `_kv_rows`) copied into scratch: [2, Hkv * m * L, D] in ``dtype``."""
        head_dim = k_cache.shape[-1]
        buf = self._buffer("kv", (rows.numel(), head_dim), k_cache.dtype)
        pair = _kv_pair(k_cache, v_cache)
        if pair is not None:
            torch.index_select(pair.view(-1, head_dim), 0, rows, out=buf)
        else:
            half = rows.numel() // 2
            torch.index_select(k_cache.reshape(-1, head_dim), 0, rows[:half], out=buf[:half])
            v_rows = rows[half:] - k_cache.numel() // head_dim
            torch.index_select(v_cache.reshape(-1, head_dim), 0, v_rows, out=buf[half:])
        buf = buf.view(2, -1, head_dim)
        return buf if buf.dtype == dtype else buf.to(dtype)

    def _decode(self, query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                plan: _StepPlan, scale: float, sliding_window: int | None, out: torch.Tensor | None,
                softcap: float | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
        """Attention of the decode rows into ``out``; with ``out`` None (a step of decodes only) the
        result of a single chunk that reads the rows in order is returned as it is (no copy)."""
        n = meta.num_decodes
        num_heads, head_dim = query.shape[1:]
        num_kv_heads = k_cache.shape[2]
        group = num_heads // num_kv_heads
        key = (sliding_window, num_kv_heads, group, query.dtype)
        dplan = plan.decodes.get(key)
        if dplan is None:
            dplan = plan.decodes[key] = _plan_decodes(meta, sliding_window, num_kv_heads, group, query.dtype)
        # [n * Hkv, G, D] row views: query group (row, KV head) is row * Hkv + head
        q_groups = query[:n].reshape(n * num_kv_heads, group, head_dim)
        if not q_groups.is_contiguous():
            q_groups = q_groups.contiguous()
        # every chunk's query groups, chunk by chunk
        q_all = q_groups if dplan.in_order else q_groups.index_select(0, dplan.q_rows)
        whole = (out is None and dplan.in_order and dplan.zero_rows is None and len(dplan.chunks) == 1
                 and dplan.chunks[0].q_rows.numel() == n * num_kv_heads)
        if out is None and not whole:
            out = torch.empty(query.shape, dtype=query.dtype, device=query.device)
        out_groups = None if out is None else out[:n].view(n * num_kv_heads, group, head_dim)
        k_flat = k_cache.reshape(-1, head_dim)  # a view for the contiguous caches the backend allocates
        v_flat = v_cache.reshape(-1, head_dim)
        for chunk in dplan.chunks:
            batch, length = num_kv_heads * chunk.size, chunk.length
            if k_flat.dtype in _BAG_DTYPES:  # fbgemm's gather (prefetching) beats index_select by ~30%
                keys = torch.embedding_bag(k_flat, chunk.k_rows, chunk.k_offsets, False, 0, False, None)[0]
            else:
                keys = k_flat.index_select(0, chunk.k_rows)
            if keys.dtype != query.dtype:
                keys = keys.to(query.dtype)
            q_chunk = q_all[chunk.offset: chunk.offset + batch]
            keys_t = keys.view(batch, length, head_dim).transpose(1, 2)
            small = batch * group * length * query.element_size() <= _SMALL_SCORES_BYTES
            if softcap is None and sinks is None and small:  # fresh tensors cost less than the scratch look-ups
                probs = torch._softmax(torch.baddbmm(chunk.bias, q_chunk, keys_t, alpha=scale), -1, False)
            elif softcap is None and sinks is None:
                scores = self._buffer("scores", (batch, group, length), query.dtype)
                torch.baddbmm(chunk.bias, q_chunk, keys_t, alpha=scale, out=scores)
                probs = torch.ops.aten._softmax.out(scores, -1, False,
                                                    out=self._buffer("probs", (batch, group, length), query.dtype))
            else:
                scores = self._buffer("scores", (batch, group, length), query.dtype)
                probs = _modified_probs(torch.bmm(q_chunk, keys_t, out=scores).mul_(scale), chunk, softcap, sinks,
                                        num_kv_heads)
            if v_flat.dtype == query.dtype:
                # P @ V without materialising V: each query head's probability-weighted sum of its value rows
                attn = torch.embedding_bag(v_flat, chunk.v_bags, chunk.v_offsets, False, 0, False,
                                           probs.view(-1))[0].view(batch, group, head_dim)
            else:
                values = v_flat.index_select(0, chunk.k_rows).to(query.dtype)
                attn = torch.bmm(probs, values.view(batch, length, head_dim))
            if out_groups is None:
                return attn.view(query.shape)
            out_groups.index_copy_(0, chunk.q_rows, attn)
        assert out is not None
        if dplan.zero_rows is not None:
            out[:n].index_fill_(0, dplan.zero_rows, 0.0)
        return out

    def _prefill(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor, meta: AttentionMetadata, plan: _StepPlan, scale: float,
                 sliding_window: int | None, out: torch.Tensor, softcap: float | None = None,
                 sinks: torch.Tensor | None = None) -> None:
        num_heads, head_dim = query.shape[1:]
        num_kv_heads = k_cache.shape[2]
        group = num_heads // num_kv_heads
        num_slots = k_cache.shape[0] * k_cache.shape[1]
        # The fresh K/V equal what the cache now holds only when the cache stores the compute dtype.
        fresh_ok = k_cache.dtype == key.dtype == query.dtype and v_cache.dtype == value.dtype == query.dtype
        plan_key = (sliding_window, num_kv_heads, group, num_slots, fresh_ok)
        seqs = plan.prefills.get(plan_key)
        if seqs is None:
            seqs = plan.prefills[plan_key] = _plan_prefills(meta, sliding_window, group, num_kv_heads, num_slots,
                                                            fresh_ok)
        for seq in seqs:
            begin, end = seq.begin, seq.end
            n = end - begin
            if seq.rows is None:
                keys = key[begin:end].transpose(0, 1).unsqueeze(0)  # [1, Hkv, n, D]
                values = value[begin:end].transpose(0, 1).unsqueeze(0)
            else:
                kv = self._gather(k_cache, v_cache, seq.rows, query.dtype).view(2, 1, num_kv_heads, -1, head_dim)
                keys, values = kv[0], kv[1]
            q = query[begin:end].transpose(0, 1).unsqueeze(0)  # [1, Hq, n, D]
            if softcap is not None or sinks is not None:
                q = q.reshape(1, num_kv_heads, group * n, head_dim)
                mask = seq.mask if seq.mask is not None else _folded_causal_mask(n, group, query.device)
                row_sinks = None if sinks is None else folded_sinks(sinks, num_kv_heads, n)
                attn = explicit_attention(q, keys, values, mask, scale, softcap, row_sinks)
                attn = attn.view(1, num_heads, n, head_dim)
            elif seq.mask is None:
                attn = F.scaled_dot_product_attention(q, keys, values, is_causal=True, scale=scale,
                                                      enable_gqa=group > 1)
            else:  # fold each KV head's query group into the query axis (the mask was folded alike)
                q = q.reshape(1, num_kv_heads, group * n, head_dim)
                attn = F.scaled_dot_product_attention(q, keys, values, attn_mask=seq.mask, scale=scale)
                attn = attn.view(1, num_heads, n, head_dim)
            out[begin:end] = attn[0].transpose(0, 1)


def _modified_probs(scores: torch.Tensor, chunk: _DecodeChunk, softcap: float | None, sinks: torch.Tensor | None,
                    num_kv_heads: int) -> torch.Tensor:
    """Softmax of a decode chunk's scaled scores [c * Hkv, G, L] with soft-capping (before the
    -inf mask) and sinks (one extra logit per query head, dropped after the softmax)."""
    if softcap is not None:
        scores = torch.tanh(scores / softcap).mul_(softcap)
    scores = scores + chunk.bias
    if sinks is None:
        return scores.softmax(-1)
    batch, group = scores.shape[:2]
    sink = sinks.to(scores.dtype).view(1, num_kv_heads, group).expand(chunk.size, num_kv_heads, group)
    logits = torch.cat([scores, sink.reshape(batch, group, 1)], dim=-1)
    return logits.softmax(-1)[..., :-1].contiguous()


def _folded_causal_mask(n: int, group: int, device: torch.device) -> torch.Tensor:
    """Causal mask [G * n, n] for a GQA-folded query whose rows are (head in group, position)."""
    causal = torch.ones(n, n, dtype=torch.bool, device=device).tril_()
    return causal.repeat(group, 1)


_local = threading.local()


def cpu_paged_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    sliding_window: int | None = None,
    *,
    sinks: torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor:
    """See `sagellm_core.backend.PagedAttentionOp` (scratch buffers: one `CPUPagedAttention` per thread)."""
    op = getattr(_local, "op", None)
    if op is None:
        op = _local.op = CPUPagedAttention()
    return op(query, key, value, k_cache, v_cache, meta, scale, sliding_window, sinks=sinks, softcap=softcap)


cpu_paged_attention.supported_features = ALL_FEATURES  # type: ignore[attr-defined]
