"""The CPU backend's paged attention against the reference op (the oracle), on random caches."""

from __future__ import annotations

import random

import pytest
import torch

from sagellm_core.attention.metadata import AttentionMetadata
from sagellm_core.attention.reference import reference_paged_attention
from sagellm_core.attention import cpu as cpu_attention
from sagellm_core.attention.cpu import CPUPagedAttention, cpu_paged_attention
from sagellm_core.builtin.cpu_backend import CPUBackend

HEAD_DIM = 16


def make_step(seqs: list[tuple[int, int]], num_kv_heads: int, block_size: int, rng: random.Random,
              num_blocks: int | None = None, pad_decodes: int = 0) -> AttentionMetadata:
    """``seqs``: (seq_len, query_len) per sequence, decodes (query_len 1) first. Each sequence gets
    random distinct blocks; ``pad_decodes`` graph-style padding rows (length 0, slot -1) follow the decodes."""
    num_decodes = 0
    while num_decodes < len(seqs) and seqs[num_decodes][1] == 1:
        num_decodes += 1
    need = sum(-(-s // block_size) for s, _ in seqs)
    num_blocks = num_blocks or need + 3
    pool = list(range(num_blocks))
    rng.shuffle(pool)
    tables, slots, query_lens, seq_lens = [], [], [], []
    for index, (seq_len, query_len) in enumerate(seqs):
        if index == num_decodes:
            for _ in range(pad_decodes):
                tables.append([])
                slots.append(-1)
                query_lens.append(1)
                seq_lens.append(0)
        blocks = [pool.pop() for _ in range(-(-seq_len // block_size))]
        tables.append(blocks)
        for pos in range(seq_len - query_len, seq_len):
            slots.append(blocks[pos // block_size] * block_size + pos % block_size)
        query_lens.append(query_len)
        seq_lens.append(seq_len)
    if pad_decodes and num_decodes == len(seqs):
        tables += [[]] * pad_decodes
        slots += [-1] * pad_decodes
        query_lens += [1] * pad_decodes
        seq_lens += [0] * pad_decodes
    width = max(1, max(len(t) for t in tables))
    starts = [0]
    for q in query_lens:
        starts.append(starts[-1] + q)
    return AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        query_start_loc=torch.tensor(starts, dtype=torch.int32),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32),
        block_tables=torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32),
        query_lens_host=query_lens, seq_lens_host=seq_lens, num_decodes=num_decodes + pad_decodes,
        block_size=block_size,
    )


def make_tensors(meta: AttentionMetadata, num_heads: int, num_kv_heads: int, num_blocks: int,
                 seed: int, cache_dtype: torch.dtype = torch.float32, adjacent: bool = True
                 ) -> tuple[torch.Tensor, ...]:
    """Random (never zero) query/key/value in the hook's layout (transposed views) and caches."""
    g = torch.Generator().manual_seed(seed)
    tokens = sum(meta.query_lens_host)
    query = torch.randn(num_heads, tokens, HEAD_DIM, generator=g).transpose(0, 1)
    key = torch.randn(num_kv_heads, tokens, HEAD_DIM, generator=g).transpose(0, 1)
    value = torch.randn(num_kv_heads, tokens, HEAD_DIM, generator=g).transpose(0, 1)
    shape = (num_blocks, meta.block_size, num_kv_heads, HEAD_DIM)
    if adjacent:  # one layer of the runner's [layers, 2, blocks, block_size, Hkv, D] tensor
        layer = torch.randn(3, 2, *shape, generator=g).to(cache_dtype)[1]
        k_cache, v_cache = layer[0], layer[1]
    else:
        k_cache = torch.randn(*shape, generator=g).to(cache_dtype)
        v_cache = torch.randn(*shape, generator=g).to(cache_dtype)
    return query, key, value, k_cache, v_cache


def copy_meta(meta: AttentionMetadata) -> AttentionMetadata:
    return AttentionMetadata(meta.slot_mapping.clone(), meta.query_start_loc.clone(), meta.seq_lens.clone(),
                             meta.block_tables.clone(), list(meta.query_lens_host), list(meta.seq_lens_host),
                             meta.num_decodes, meta.block_size)


def check(meta: AttentionMetadata, num_heads: int, num_kv_heads: int, sliding_window: int | None = None,
          seed: int = 0, op=None, cache_dtype: torch.dtype = torch.float32, adjacent: bool = True,
          num_blocks: int | None = None) -> None:
    num_blocks = num_blocks or int(meta.block_tables.max()) + 3
    query, key, value, k_cache, v_cache = make_tensors(meta, num_heads, num_kv_heads, num_blocks, seed,
                                                       cache_dtype, adjacent)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    ref_meta = copy_meta(meta)
    scale = HEAD_DIM ** -0.5
    expected = reference_paged_attention(query, key, value, ref_k, ref_v, ref_meta, scale, sliding_window)
    op = op or CPUPagedAttention()
    got = op(query, key, value, k_cache, v_cache, meta, scale, sliding_window)
    assert got.shape == query.shape and got.dtype == query.dtype
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)  # same K/V written
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def random_seqs(rng: random.Random, decodes: int, prefills: int, cached: bool, max_len: int = 70
                ) -> list[tuple[int, int]]:
    seqs = [(rng.randint(1, max_len), 1) for _ in range(decodes)]
    for _ in range(prefills):
        query_len = rng.randint(2, 40)
        prefix = rng.randint(1, max_len) if cached and rng.random() < 0.7 else 0
        seqs.append((prefix + query_len, query_len))
    return seqs


@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (8, 2)])  # GQA ratios 1, 3, 4
@pytest.mark.parametrize("block_size", [1, 4, 16])
@pytest.mark.parametrize("window", [None, 5, 37])
def test_mixed_batches_match_the_reference(heads: tuple[int, int], block_size: int, window: int | None) -> None:
    num_heads, num_kv_heads = heads
    rng = random.Random(hash((heads, block_size, window)) % 1000)
    for trial, (decodes, prefills, cached) in enumerate([(7, 0, False), (0, 3, False), (0, 3, True),
                                                         (5, 2, True), (1, 1, False), (12, 4, True)]):
        meta = make_step(random_seqs(rng, decodes, prefills, cached), num_kv_heads, block_size, rng)
        check(meta, num_heads, num_kv_heads, window, seed=trial)


@pytest.mark.parametrize("chunk_tokens", [1, 40, 100_000])
def test_decode_chunking_matches_the_reference(monkeypatch: pytest.MonkeyPatch, chunk_tokens: int) -> None:
    monkeypatch.setattr(cpu_attention, "CHUNK_TOKENS", chunk_tokens)
    rng = random.Random(chunk_tokens)
    seqs = [(rng.randint(1, 200), 1) for _ in range(40)] + [(1, 1), (16, 1), (17, 1)]
    for window in (None, 9):
        check(make_step(seqs, 2, 16, rng), 6, 2, window, seed=3)


def test_one_token_prefill_and_long_prefix() -> None:
    rng = random.Random(5)
    # a one-token chunk that follows prefills is attended as a prefill; long cached prefix, block size 1
    meta = make_step([(9, 1), (300, 20), (33, 1), (1, 1)], 2, 1, rng)
    meta.num_decodes = 1
    check(meta, 4, 2)
    check(make_step([(300, 20), (50, 50), (2, 2)], 2, 4, rng), 8, 2, 64)


@pytest.mark.parametrize("all_decodes", [True, False])
def test_padded_decode_rows_write_nothing_and_attend_to_nothing(all_decodes: bool) -> None:
    rng = random.Random(11)
    seqs = [(rng.randint(1, 50), 1) for _ in range(5)] + ([] if all_decodes else [(30, 10)])
    meta = make_step(seqs, 2, 4, rng, pad_decodes=3)
    num_blocks = int(meta.block_tables.max()) + 3
    query, key, value, k_cache, v_cache = make_tensors(meta, 6, 2, num_blocks, seed=1)
    ref_k, ref_v = k_cache.clone(), v_cache.clone()
    expected = reference_paged_attention(query, key, value, ref_k, ref_v, copy_meta(meta), 0.25)
    got = CPUPagedAttention()(query, key, value, k_cache, v_cache, meta, 0.25)
    assert torch.equal(k_cache, ref_k) and torch.equal(v_cache, ref_v)
    pad = [i for i, s in enumerate(meta.seq_lens_host) if s == 0]
    assert len(pad) == 3
    assert torch.equal(got[pad], torch.zeros_like(got[pad]))
    keep = [i for i in range(got.shape[0]) if i not in pad]
    torch.testing.assert_close(got[keep], expected[keep], rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


def test_reused_metadata_with_a_bumped_generation_is_planned_again() -> None:
    """Graph-style reuse: the same metadata object, its tensors refilled in place, generation bumped."""
    rng = random.Random(2)
    op = CPUPagedAttention()
    width, bucket, block_size, num_blocks = 12, 8, 4, 120
    meta = AttentionMetadata(
        slot_mapping=torch.full((bucket,), -1, dtype=torch.int64),
        query_start_loc=torch.arange(bucket + 1, dtype=torch.int32),
        seq_lens=torch.zeros(bucket, dtype=torch.int32),
        block_tables=torch.zeros((bucket, width), dtype=torch.int32),
        query_lens_host=[1] * bucket, seq_lens_host=[width * block_size] * bucket, num_decodes=bucket,
        block_size=block_size,
    )
    for step in range(4):
        batch = rng.randint(1, bucket)
        fresh = make_step([(rng.randint(1, width * block_size), 1) for _ in range(batch)], 2, block_size, rng,
                          num_blocks=num_blocks, pad_decodes=bucket - batch)
        meta.slot_mapping.copy_(fresh.slot_mapping)
        meta.seq_lens.copy_(fresh.seq_lens)
        meta.block_tables.zero_()
        meta.block_tables[:, : fresh.block_tables.shape[1]] = fresh.block_tables
        if step:
            meta.generation += 1
        query, key, value, k_cache, v_cache = make_tensors(fresh, 6, 2, num_blocks, seed=step)
        ref_k, ref_v = k_cache.clone(), v_cache.clone()
        expected = reference_paged_attention(query, key, value, ref_k, ref_v, fresh, 0.3, 6 if step % 2 else None)
        for _ in range(2):  # several layers: the second call reuses the step's plan
            k_run, v_run = k_cache.clone(), v_cache.clone()
            got = op(query, key, value, k_run, v_run, meta, 0.3, 6 if step % 2 else None)
            assert torch.equal(k_run, ref_k) and torch.equal(v_run, ref_v)
            torch.testing.assert_close(got[:batch], expected[:batch], rtol=1e-5,
                                       atol=1e-5 * float(expected.abs().max()))
            assert torch.equal(got[batch:], torch.zeros_like(got[batch:]))
        assert sum(1 for k in meta.extras if "cpu" in str(k)) == 1  # one plan entry, not one per replay


def test_separate_caches_and_low_precision_caches() -> None:
    rng = random.Random(8)
    seqs = random_seqs(rng, 6, 3, cached=True)
    meta = make_step(seqs, 2, 4, rng)
    check(meta, 6, 2, adjacent=False)
    check(make_step(seqs, 2, 4, random.Random(8)), 6, 2, None, cache_dtype=torch.bfloat16)
    check(make_step(seqs, 2, 4, random.Random(8)), 6, 2, 7, cache_dtype=torch.bfloat16, adjacent=False)


def test_module_function_and_backend_op() -> None:
    rng = random.Random(4)
    seqs = random_seqs(rng, 4, 2, cached=True)
    check(make_step(seqs, 1, 4, rng), 3, 1, op=cpu_paged_attention)
    assert isinstance(CPUBackend().attention_op(), CPUPagedAttention)


def dense_oracle(query: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                 scale: float, window: int | None, softcap: float | None, sinks: torch.Tensor | None) -> torch.Tensor:
    """Transformers' eager attention (Gemma 2's soft cap, gpt-oss's sinks), one sequence at a time over
    its whole context read back from the cache."""
    num_heads = query.shape[1]
    num_kv_heads, head_dim = k_cache.shape[-2:]
    out = torch.zeros_like(query)
    starts = meta.query_start_loc.tolist()
    for i, seq_len in enumerate(meta.seq_lens_host):
        if seq_len == 0:
            continue
        slots = meta.context_slots(i)
        keys = k_cache.reshape(-1, num_kv_heads, head_dim)[slots].repeat_interleave(num_heads // num_kv_heads, 1)
        values = v_cache.reshape(-1, num_kv_heads, head_dim)[slots].repeat_interleave(num_heads // num_kv_heads, 1)
        q = query[starts[i]:starts[i + 1]]  # [n, Hq, D]
        scores = torch.einsum("nhd,lhd->hnl", q, keys) * scale
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        query_pos = torch.arange(seq_len - q.shape[0], seq_len)[:, None]
        key_pos = torch.arange(seq_len)[None, :]
        visible = key_pos <= query_pos
        if window is not None:
            visible &= key_pos > query_pos - window
        scores = scores.masked_fill(~visible, float("-inf"))
        if sinks is not None:
            scores = torch.cat([scores, sinks[:, None, None].expand(-1, q.shape[0], 1)], dim=-1)
        probs = scores.softmax(-1)[..., :seq_len]
        out[starts[i]:starts[i + 1]] = torch.einsum("hnl,lhd->nhd", probs, values)
    return out


@pytest.mark.parametrize("modifiers", [{"softcap": 0.8}, {"sinks": True}, {"softcap": 2.0, "sinks": True}],
                         ids=["softcap", "sinks", "both"])
@pytest.mark.parametrize("window", [None, 5])
@pytest.mark.parametrize("chunk_tokens", [40, 100_000])
def test_sinks_and_soft_cap_match_eager_attention(modifiers: dict, window: int | None, chunk_tokens: int,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_attention, "CHUNK_TOKENS", chunk_tokens)
    num_heads, num_kv_heads = 6, 2
    rng = random.Random(21)
    kwargs: dict = {"softcap": modifiers.get("softcap")}
    if modifiers.get("sinks"):
        kwargs["sinks"] = torch.randn(num_heads, generator=torch.Generator().manual_seed(3)) * 2
    for trial, (decodes, prefills, cached) in enumerate([(6, 0, False), (0, 3, False), (4, 3, True)]):
        meta = make_step(random_seqs(rng, decodes, prefills, cached), num_kv_heads, 4, rng, pad_decodes=trial % 2)
        num_blocks = int(meta.block_tables.max()) + 3
        query, key, value, k_cache, v_cache = make_tensors(meta, num_heads, num_kv_heads, num_blocks, seed=trial)
        ref_k, ref_v = k_cache.clone(), v_cache.clone()
        expected = reference_paged_attention(query, key, value, ref_k, ref_v, copy_meta(meta), 0.3, window, **kwargs)
        oracle = dense_oracle(query, ref_k, ref_v, meta, 0.3, window, kwargs["softcap"], kwargs.get("sinks"))
        got = CPUPagedAttention()(query, key, value, k_cache, v_cache, meta, 0.3, window, **kwargs)
        tol = {"rtol": 1e-5, "atol": 1e-5 * float(oracle.abs().max())}
        real = [i for i, s in enumerate(meta.seq_lens_host) if s]
        rows = torch.cat([torch.arange(meta.query_start_loc[i], meta.query_start_loc[i + 1]) for i in real])
        torch.testing.assert_close(expected[rows], oracle[rows], **tol)
        torch.testing.assert_close(got[rows], oracle[rows], **tol)
        plain = reference_paged_attention(query, key, value, ref_k.clone(), ref_v.clone(), copy_meta(meta), 0.3, window)
        assert not torch.allclose(plain[rows], oracle[rows], **tol)  # the modifiers do change the result


def test_ops_declare_their_features() -> None:
    from sagellm_core.attention.features import ALL_FEATURES, DEFAULT_FEATURES, op_features

    assert op_features(CPUBackend().attention_op()) == ALL_FEATURES
    assert op_features(reference_paged_attention) == op_features(cpu_paged_attention) == ALL_FEATURES
    assert op_features(lambda *args: None) == DEFAULT_FEATURES == {"sliding_window"}
    assert CPUBackend().attention_features() == ALL_FEATURES


@pytest.mark.parametrize("decodes", [1, 9])
def test_small_decode_scores_give_the_scratch_path_bits(monkeypatch: pytest.MonkeyPatch, decodes: int) -> None:
    """Fresh score tensors (small decodes, batch 1 included) and the scratch buffers run the same kernels."""
    rng = random.Random(decodes)
    meta = make_step([(rng.randint(1, 150), 1) for _ in range(decodes)], 3, 16, rng)
    num_blocks = int(meta.block_tables.max()) + 3
    outs = []
    for small_bytes in (1 << 30, 0):
        monkeypatch.setattr(cpu_attention, "_SMALL_SCORES_BYTES", small_bytes)
        query, key, value, k_cache, v_cache = make_tensors(meta, 9, 3, num_blocks, seed=5)
        outs.append(CPUPagedAttention()(query, key, value, k_cache, v_cache, copy_meta(meta), HEAD_DIM ** -0.5))
    assert torch.equal(outs[0], outs[1])
    check(copy_meta(meta), 9, 3, seed=5)  # a step of decodes only: batch 1 returns the chunk's result as is
