"""An fp8 (E4M3, scale 1.0) KV cache on the CPU: the reference op and the CPU op against an fp32
cache, pool sizing with the smaller blocks, and an engine that runs with it.

Bound: attention over an fp8 cache stays within 8% (relative Frobenius norm) of the fp32-cache
output for unit-variance K/V (E4M3 rounds to 2^-4 relative; the softmax average shrinks it)."""

from __future__ import annotations

import math
import random
from pathlib import Path

import pytest
import torch

from sagellm_core.attention.cpu import CPUPagedAttention
from sagellm_core.attention.metadata import AttentionMetadata
from sagellm_core.attention.reference import reference_paged_attention
from sagellm_core.quant import kv_cache_dtype

FP8 = torch.float8_e4m3fn


def _case(decode_ctx: list[int], prefills: list[tuple[int, int]], hq: int, hkv: int, d: int, block_size: int,
          seed: int) -> tuple:
    gen = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    q_lens = [1] * len(decode_ctx) + [n for _, n in prefills]
    seq_lens = [c + 1 for c in decode_ctx] + [c + n for c, n in prefills]
    per_seq = [math.ceil(s / block_size) for s in seq_lens]
    num_blocks = sum(per_seq) + 3
    ids = list(range(num_blocks))
    rng.shuffle(ids)
    table = torch.zeros((len(seq_lens), max(per_seq)), dtype=torch.int32)
    cursor = 0
    for i, nb in enumerate(per_seq):
        table[i, :nb] = torch.tensor(ids[cursor:cursor + nb], dtype=torch.int32)
        cursor += nb
    slots = [int(table[i, p // block_size]) * block_size + p % block_size
             for i, (s, q) in enumerate(zip(seq_lens, q_lens)) for p in range(s - q, s)]
    t = sum(q_lens)
    kv = torch.randn((2, num_blocks, block_size, hkv, d), generator=gen)
    query, key, value = (torch.randn((t, h, d), generator=gen) for h in (hq, hkv, hkv))
    starts = [0]
    for q in q_lens:
        starts.append(starts[-1] + q)

    def meta() -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.int64), query_start_loc=torch.tensor(starts, dtype=torch.int32),
            seq_lens=torch.tensor(seq_lens, dtype=torch.int32), block_tables=table, query_lens_host=q_lens,
            seq_lens_host=seq_lens, num_decodes=len(decode_ctx), block_size=block_size)

    return query, key, value, kv, meta


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("op_name", ["reference", "cpu"])
@pytest.mark.parametrize("decode_ctx,prefills,hq,hkv", [
    ([5, 40, 130], [], 4, 2),
    ([], [(0, 20), (33, 7)], 6, 3),
    ([17, 64], [(16, 9)], 8, 8),
])
def test_fp8_cache_is_close_to_fp32(op_name: str, decode_ctx: list[int], prefills: list[tuple[int, int]],
                                    hq: int, hkv: int) -> None:
    query, key, value, kv, meta = _case(decode_ctx, prefills, hq, hkv, 32, 8, seed=hq + hkv)
    op = reference_paged_attention if op_name == "reference" else CPUPagedAttention()
    kv8 = kv.to(FP8)
    kv8[0, 0, 0, 0, 0] = 448.0
    key = key.clone()
    key[0, 0, 0] = 1e4  # saturates to 448 instead of becoming NaN
    out8 = op(query, key, value, kv8[0], kv8[1], meta(), 32 ** -0.5)
    kv32 = kv8.float()  # the same cached context, kept in fp32
    ref = reference_paged_attention(query, key.clamp(-448, 448), value, kv32[0], kv32[1], meta(), 32 ** -0.5)
    assert kv8.dtype == FP8 and not torch.isnan(kv8.float()).any()
    assert _rel(out8, ref) <= 0.08
    slot = int(meta().slot_mapping[0])
    bs = kv8.shape[2]
    assert float(kv8[0, slot // bs, slot % bs, 0, 0].float()) == 448.0


def test_fp8_cache_matches_writing_in_fp32_then_rounding() -> None:
    """The new K/V written to an fp8 cache are exactly the fp32 values rounded to E4M3."""
    query, key, value, kv, meta = _case([9], [(0, 5)], 4, 2, 16, 4, seed=1)
    kv8 = kv.to(FP8)
    kv32 = kv8.float()
    reference_paged_attention(query, key, value, kv8[0], kv8[1], meta(), 0.25)
    reference_paged_attention(query, key, value, kv32[0], kv32[1], meta(), 0.25)
    assert torch.equal(kv8.float(), kv32.to(FP8).float())


def test_kv_dtype_setting_and_pool_sizing(tiny_engine_dir: Path) -> None:
    from sagellm_core.engine import LLMEngine
    from sagellm_core.models.runner import kv_bytes_per_block
    from tests.conftest import engine_config

    assert kv_cache_dtype("fp8", torch.bfloat16) == FP8 and kv_cache_dtype("auto", torch.float16) == torch.float16
    sized = {}
    for dtype in ("auto", "fp8"):
        config = engine_config(tiny_engine_dir, model={"dtype": "bfloat16"},
                               kv_cache={"dtype": dtype, "num_blocks": None, "cpu_memory_bytes": 1 << 22})
        engine = LLMEngine(config)
        sized[dtype] = (engine.kv_pools[0].num_blocks, engine.runner.kv_caches[0].dtype)
        if dtype == "fp8":
            assert kv_bytes_per_block(engine.model, 4, FP8) * 2 == kv_bytes_per_block(engine.model, 4, torch.bfloat16)
    assert sized["fp8"][1] == FP8 and sized["auto"][1] == torch.bfloat16
    assert sized["fp8"][0] == 2 * sized["auto"][0]  # half the bytes per block: twice the blocks


def test_engine_generates_with_fp8_cache(tiny_engine_dir: Path) -> None:
    """Greedy decoding on a tiny fp32 model with an fp8 cache: the first tokens follow the fp32 cache."""
    from sagellm_core import SamplingParams
    from sagellm_core.engine import LLMEngine
    from tests.conftest import engine_config, run_engine

    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    prompts = [[1, 5, 9, 13, 17, 21, 25], [2, 4, 6]]
    outs = {}
    for dtype in ("auto", "fp8"):
        engine = LLMEngine(engine_config(tiny_engine_dir, kv_cache={"dtype": dtype}))
        outs[dtype] = [o.outputs[0].token_ids for o in run_engine(engine, prompts, params)]
    assert all(len(t) == 6 for t in outs["fp8"])
    assert [t[0] for t in outs["fp8"]] == [t[0] for t in outs["auto"]]
