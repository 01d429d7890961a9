"""Reference paged attention in plain torch: the CPU backend's op and the oracle for device kernels.

Besides causal (optionally sliding-window) attention it implements the two score modifiers
transformers' models ask for: logit soft-capping (Gemma 2: ``tanh(s / cap) * cap`` before masking)
and attention sinks (gpt-oss: one learned logit per query head that joins the softmax and takes
probability mass without contributing a value).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sagellm_core.attention.features import ALL_FEATURES
from sagellm_core.attention.metadata import AttentionMetadata


FP8_DTYPES = (torch.float8_e4m3fn,)


def _store(cache: torch.Tensor, slot_mapping: torch.Tensor, rows: torch.Tensor) -> None:
    """Copy rows into cache slots in the cache's dtype. An fp8 cache (scale 1.0) saturates at +-448
    and is written through a byte view (index_copy_ has no float8 kernel on the CPU)."""
    num_kv_heads, head_dim = cache.shape[-2:]
    flat = cache.view(-1, num_kv_heads, head_dim)
    if cache.dtype in FP8_DTYPES:
        limit = torch.finfo(cache.dtype).max
        rows = rows.float().clamp(-limit, limit).to(cache.dtype)
        flat.view(torch.uint8).index_copy_(0, slot_mapping, rows.view(torch.uint8))
        return
    flat.index_copy_(0, slot_mapping, rows.to(cache.dtype))


def write_kv(key: torch.Tensor, value: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """Scatter the step's new K/V into their cache slots (negative slots: padding, skipped)."""
    if slot_mapping.numel() and int(slot_mapping.min()) < 0:
        keep = slot_mapping >= 0
        key, value, slot_mapping = key[keep], value[keep], slot_mapping[keep]
    _store(k_cache, slot_mapping, key)
    _store(v_cache, slot_mapping, value)


def _decode_plan(meta: AttentionMetadata, sliding_window: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Padded context slots [n, Lmax] and a key mask [n, 1, 1, Lmax] for the decode sequences.

    Lengths come from the ``seq_lens`` tensor and the cache key includes ``meta.generation``, so a
    metadata object whose buffers were refilled (graph replay) is planned again.
    """
    key = ("decode_plan", sliding_window, meta.generation)
    if key not in meta.extras:
        n = meta.num_decodes
        lengths = meta.seq_lens[:n].long()
        max_len = max(int(lengths.max()), 1)
        positions = torch.arange(max_len, device=lengths.device)
        valid = positions[None, :] < lengths[:, None]
        if sliding_window is not None:
            valid &= positions[None, :] > (lengths[:, None] - 1 - sliding_window)
        block_idx = (positions // meta.block_size).clamp(max=meta.block_tables.shape[1] - 1)
        blocks = meta.block_tables[:n][:, block_idx].long()
        slots = torch.where(valid, blocks * meta.block_size + positions % meta.block_size, 0)
        meta.extras[key] = (slots, valid[:, None, None, :])
    return meta.extras[key]


def _prefill_mask(query_len: int, seq_len: int, sliding_window: int | None, device: torch.device) -> torch.Tensor:
    query_pos = torch.arange(seq_len - query_len, seq_len, device=device)[:, None]
    key_pos = torch.arange(seq_len, device=device)[None, :]
    mask = key_pos <= query_pos
    if sliding_window is not None:
        mask &= key_pos > query_pos - sliding_window
    return mask


def explicit_attention(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                       scale: float, softcap: float | None = None, sinks: torch.Tensor | None = None
                       ) -> torch.Tensor:
    """Softmax attention written out, for the score modifiers SDPA lacks.

    query [..., n, D], keys/values [..., L, D], ``mask`` bool broadcastable to [..., n, L] (True:
    visible). ``softcap`` caps the scaled scores as ``tanh(s / softcap) * softcap`` before masking;
    ``sinks`` (broadcastable to [..., n, 1]) is one extra logit per query row that joins the softmax
    and is then dropped. Rows with no visible key and no sink give zeros.
    """
    scores = torch.matmul(query, keys.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    if sinks is None:
        probs = scores.softmax(-1)
    else:
        sink = sinks.to(scores.dtype).expand(*scores.shape[:-1], 1)
        probs = torch.cat([scores, sink], dim=-1).softmax(-1)[..., :-1]
    return torch.matmul(probs.nan_to_num(0.0), values)


def folded_sinks(sinks: torch.Tensor, num_kv_heads: int, rows_per_head: int) -> torch.Tensor:
    """Per-query-head sink logits [Hq] laid out for a GQA-folded query [B, Hkv, G * n, D] whose rows
    are (head in group, position): [1, Hkv, G * n, 1]."""
    group = sinks.numel() // num_kv_heads
    return sinks.view(num_kv_heads, group, 1).expand(num_kv_heads, group, rows_per_head).reshape(
        1, num_kv_heads, group * rows_per_head, 1)


def _grouped_sdpa(query: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                  scale: float, softcap: float | None = None, sinks: torch.Tensor | None = None) -> torch.Tensor:
    """GQA without repeating K/V: fold each KV head's query-head group into the query-length axis.

    query [B, Hq, n, D], keys/values [B, Hkv, L, D], mask broadcastable to [B, 1, n, L], sinks [Hq].
    Returns [B, Hq, n, D]. (torch's ``enable_gqa`` with a mask takes a slow path on the CPU.)
    """
    batch, num_heads, n, dim = query.shape
    num_kv_heads = keys.shape[1]
    group = num_heads // num_kv_heads
    q = query.reshape(batch, num_kv_heads, group * n, dim)
    if group > 1:
        mask = mask.expand(batch, 1, n, mask.shape[-1]).repeat(1, 1, group, 1)
    if softcap is None and sinks is None:
        out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)
    else:
        row_sinks = None if sinks is None else folded_sinks(sinks, num_kv_heads, n)
        out = explicit_attention(q, keys, values, mask, scale, softcap, row_sinks)
    return out.reshape(batch, num_heads, n, dim)


def reference_paged_attention(
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
    write_kv(key, value, k_cache, v_cache, meta.slot_mapping)
    num_kv_heads, head_dim = k_cache.shape[-2:]
    flat_k = k_cache.view(-1, num_kv_heads, head_dim)
    flat_v = v_cache.view(-1, num_kv_heads, head_dim)
    out = torch.empty_like(query)
    n_dec = meta.num_decodes
    if n_dec:
        slots, mask = _decode_plan(meta, sliding_window)
        keys = flat_k[slots].transpose(1, 2).to(query.dtype)  # [n, Hkv, L, D]
        values = flat_v[slots].transpose(1, 2).to(query.dtype)
        q = query[:n_dec].unsqueeze(2)  # [n, Hq, 1, D]
        out[:n_dec] = _grouped_sdpa(q, keys, values, mask, scale, softcap, sinks).squeeze(2)
    if n_dec == meta.num_seqs:
        return out
    starts = meta.extras.get("starts")
    if starts is None:
        starts = meta.extras["starts"] = meta.query_start_loc.tolist()
    for i in range(n_dec, meta.num_seqs):
        begin, end = starts[i], starts[i + 1]
        context = meta.extras.get(("slots", i))
        if context is None:
            context = meta.extras[("slots", i)] = meta.context_slots(i)
        keys = flat_k[context].transpose(0, 1).unsqueeze(0).to(query.dtype)  # [1, Hkv, L, D]
        values = flat_v[context].transpose(0, 1).unsqueeze(0).to(query.dtype)
        q = query[begin:end].transpose(0, 1).unsqueeze(0)  # [1, Hq, n, D]
        mask_key = ("prefill_mask", i, sliding_window)
        if mask_key not in meta.extras:
            meta.extras[mask_key] = _prefill_mask(end - begin, meta.seq_lens_host[i], sliding_window, query.device)
        attn = _grouped_sdpa(q, keys, values, meta.extras[mask_key][None, None], scale, softcap, sinks)
        out[begin:end] = attn.squeeze(0).transpose(0, 1)
    return out


reference_paged_attention.supported_features = ALL_FEATURES  # type: ignore[attr-defined]
