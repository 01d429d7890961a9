"""The Triton paged-attention kernels against `reference_paged_attention` (needs a CUDA GPU)."""

from __future__ import annotations

import importlib
import math
import random
import sys
from pathlib import Path

import pytest
import torch

from sagellm_core.attention.metadata import AttentionMetadata
from sagellm_core.attention.reference import reference_paged_attention

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def _attention_module():
    pytest.importorskip("triton")
    try:
        return importlib.import_module("sagellm_cuda.attention")
    except ImportError:  # running from a checkout without `pip install -e sagellm_cuda`
        sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "sagellm_cuda"))
        return importlib.import_module("sagellm_cuda.attention")


def _case(decode_ctx, prefills, hq, hkv, d, block_size, dtype, seed):
    """Random step: decodes with ``decode_ctx`` cached tokens, prefills as (cached prefix, new tokens)."""
    device = torch.device("cuda")
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    q_lens = [1] * len(decode_ctx) + [n for _, n in prefills]
    seq_lens = [c + 1 for c in decode_ctx] + [c + n for c, n in prefills]
    per_seq = [math.ceil(s / block_size) for s in seq_lens]
    num_blocks = sum(per_seq) + 5
    ids = list(range(num_blocks))
    rng.shuffle(ids)
    table = torch.zeros((len(seq_lens), max(per_seq) + 1), dtype=torch.int32)
    cursor = 0
    for i, nb in enumerate(per_seq):
        table[i, :nb] = torch.tensor(ids[cursor:cursor + nb], dtype=torch.int32)
        cursor += nb
    slots = [int(table[i, p // block_size]) * block_size + p % block_size
             for i, (s, q) in enumerate(zip(seq_lens, q_lens)) for p in range(s - q, s)]
    t = sum(q_lens)
    kv = torch.randn((2, 2, num_blocks, block_size, hkv, d), generator=gen).to(dtype).to(device)
    query = torch.randn((t, hq, d), generator=gen).to(dtype).to(device)
    key = torch.randn((t, hkv, d), generator=gen).to(dtype).to(device)
    value = torch.randn((t, hkv, d), generator=gen).to(dtype).to(device)
    starts = [0]
    for q in q_lens:
        starts.append(starts[-1] + q)

    def meta():
        return AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
            query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
            block_tables=table.to(device),
            query_lens_host=q_lens,
            seq_lens_host=seq_lens,
            num_decodes=len(decode_ctx),
            block_size=block_size,
        )

    return query, key, value, kv[1, 0], kv[1, 1], meta


CASES = [
    # decode ctx, prefills (prefix, new), Hq, Hkv, D, block size, window
    pytest.param([7, 100, 1500], [], 8, 8, 64, 16, None, id="decodes-mha"),
    pytest.param([4095], [], 32, 8, 128, 16, None, id="decode-long-split"),
    pytest.param([], [(0, 77), (0, 300)], 16, 4, 128, 16, None, id="prefills"),
    pytest.param([], [(250, 64), (33, 1)], 32, 4, 128, 32, None, id="prefix-hits-bs32"),
    pytest.param([15, 16, 17, 640], [(0, 33), (120, 200)], 16, 2, 64, 16, None, id="mixed-gqa8"),
    pytest.param([900, 3], [(500, 129)], 8, 1, 128, 16, 128, id="mqa-window"),
    pytest.param([2000], [(1000, 100)], 12, 4, 96, 32, 300, id="d96-window"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("decode_ctx, prefills, hq, hkv, d, block_size, window", CASES)
def test_matches_reference(decode_ctx, prefills, hq, hkv, d, block_size, window, dtype):
    attention = _attention_module()
    query, key, value, k_cache, v_cache, make_meta = _case(decode_ctx, prefills, hq, hkv, d, block_size, dtype,
                                                           seed=len(decode_ctx) * 31 + hq + d)
    scale = d ** -0.5
    k_ref, v_ref = k_cache.float().clone(), v_cache.float().clone()
    ref = reference_paged_attention(query.float(), key.float(), value.float(), k_ref, v_ref, make_meta(), scale,
                                    window)
    meta = make_meta()
    out = attention.triton_paged_attention(query, key, value, k_cache, v_cache, meta, scale, window)
    again = attention.triton_paged_attention(query, key, value, k_cache, v_cache, meta, scale, window)
    torch.cuda.synchronize()
    assert torch.equal(k_cache.float(), k_ref) and torch.equal(v_cache.float(), v_ref)
    assert not torch.isnan(out).any()
    assert torch.equal(out, again)
    rel = float((out.double() - ref.double()).norm() / ref.double().norm())
    assert rel < (2e-5 if dtype == torch.float32 else 1.2e-2), rel


def test_decode_splits_agree():
    """Every split count gives the same answer (split boundaries come from seq_lens on the device)."""
    attention = _attention_module()
    query, key, value, k_cache, v_cache, make_meta = _case([0, 5, 63, 64, 65, 2222], [], 16, 4, 128, 16,
                                                           torch.float32, seed=5)
    meta = make_meta()
    attention.write_kv_cache(key, value, k_cache, v_cache, meta.slot_mapping)
    outs = []
    for splits in (1, 2, 7, 32):
        out = torch.full_like(query, float("nan"))
        attention.decode_attention(query, k_cache, v_cache, out, meta.seq_lens, meta.block_tables,
                                   meta.num_decodes, 0.1, num_splits=splits)
        outs.append(out)
    for out in outs[1:]:
        assert not torch.isnan(out).any()
        torch.testing.assert_close(out, outs[0], rtol=1e-5, atol=1e-5)


def test_padded_graph_slots_write_nothing():
    """slot -1 leaves the cache alone and seq_len 0 gives zeros (padding of a CUDA-graph batch)."""
    attention = _attention_module()
    query, key, value, k_cache, v_cache, make_meta = _case([10, 20], [], 8, 2, 64, 16, torch.bfloat16, seed=2)
    meta = make_meta()
    meta.slot_mapping[1] = -1
    meta.seq_lens[1] = 0
    before = k_cache.clone()
    out = attention.triton_paged_attention(query, key, value, k_cache, v_cache, meta, 0.125)
    changed = (k_cache != before).any(dim=(1, 2, 3)).nonzero().flatten().tolist()
    assert changed == [int(meta.block_tables[0, 0])]
    assert torch.count_nonzero(out[1]) == 0


def test_decode_cuda_graph_replay():
    """The decode path captured once replays correctly after lengths / block tables change in place."""
    attention = _attention_module()
    n, hq, hkv, d, bs = 4, 16, 4, 128, 16
    query, key, value, k_cache, v_cache, make_meta = _case([2000, 10, 700, 3000], [], hq, hkv, d, bs,
                                                           torch.bfloat16, seed=11)
    meta = make_meta()
    static = (meta.slot_mapping, meta.seq_lens)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        attention.triton_paged_attention(query, key, value, k_cache, v_cache, meta, d ** -0.5)  # warm-up
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = attention.triton_paged_attention(query, key, value, k_cache, v_cache, meta, d ** -0.5)
    new_lens = [1500, 3001, 1, 64]
    positions = torch.tensor(new_lens, device="cuda") - 1
    blocks = meta.block_tables.gather(1, (positions // bs)[:, None]).squeeze(1).long()
    static[0].copy_(blocks * bs + positions % bs)
    static[1].copy_(torch.tensor(new_lens, dtype=torch.int32))
    query.normal_()
    k_ref, v_ref = k_cache.float().clone(), v_cache.float().clone()
    ref_meta = AttentionMetadata(static[0].clone(), meta.query_start_loc, static[1].clone(), meta.block_tables,
                                 [1] * n, new_lens, n, bs)
    ref = reference_paged_attention(query.float(), key.float(), value.float(), k_ref, v_ref, ref_meta, d ** -0.5)
    graph.replay()
    torch.cuda.synchronize()
    rel = float((out.double() - ref.double()).norm() / ref.double().norm())
    assert rel < 1.2e-2, rel
