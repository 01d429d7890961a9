"""Greedy fp32 outputs must be token-identical to transformers' generate on the same weights."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from conftest import ARCHITECTURES, ReplayByRerun, engine_config, graph_engine, run_engine
from sagellm_core.engine import LLMEngine
from sagellm_core.sampling_params import SamplingParams

MAX_NEW = 10
PROMPT_LENGTHS = (1, 3, 9, 17, 30, 5, 2, 24)


def make_prompts(seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    prompts = [[rng.randrange(1, 256) for _ in range(n)] for n in PROMPT_LENGTHS]
    shared = prompts[4][:20]  # later prompts share a 20-token prefix (5 full blocks of 4) with prompt 4
    prompts += [shared + [rng.randrange(1, 256) for _ in range(k)] for k in (3, 11)]
    return prompts


def hf_greedy(model_dir: Path, prompts: list[list[int]]) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    outs = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=MAX_NEW,
                                 min_new_tokens=MAX_NEW, eos_token_id=None, pad_token_id=0)
            outs.append(gen[0, len(prompt):].tolist())
    return outs


@pytest.fixture(scope="module")
def oracle(tiny_models: dict[str, Path]) -> dict[str, list[list[int]]]:
    prompts = make_prompts()
    return {arch: hf_greedy(path, prompts) for arch, path in tiny_models.items()}


VARIANTS = {
    "default": {},
    "no_prefix_reuse": {"kv_cache": {"policy": "no_reuse"}},
    "small_chunks": {"scheduler": {"max_num_batched_tokens": 7}},
    "preemption": {"kv_cache": {"num_blocks": 14}, "scheduler": {"max_num_batched_tokens": 64}},
    "pd_strict": {"scheduler": {"name": "pd", "options": {"mode": "strict"}}},
    "pd_time_share": {"scheduler": {"name": "pd", "options": {"mode": "time_share", "max_decode_steps": 2}}},
    "pd_hybrid": {"scheduler": {"name": "pd", "options": {"mode": "hybrid"}, "max_num_batched_tokens": 12}},
    "priority": {"scheduler": {"name": "priority", "max_num_seqs": 3}},
}
ASYNC = {"async_scheduling": "on"}
VARIANTS |= {
    "async": {"scheduler": ASYNC},
    "async_small_chunks": {"scheduler": {**ASYNC, "max_num_batched_tokens": 7}},
    "async_preemption": {"kv_cache": {"num_blocks": 14}, "scheduler": {**ASYNC, "max_num_batched_tokens": 64}},
    "async_pd_strict": {"scheduler": {**ASYNC, "name": "pd", "options": {"mode": "strict"}}},
}


GRAPH_VARIANTS = {"async_graphs": {"scheduler": {**ASYNC, "max_num_batched_tokens": 12}}}


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("variant", list(VARIANTS) + list(GRAPH_VARIANTS))
def test_greedy_matches_transformers(arch: str, variant: str, tiny_models: dict[str, Path],
                                     oracle: dict[str, list[list[int]]]) -> None:
    if variant in GRAPH_VARIANTS:  # decode graphs replayed, prefill eager and never launched behind them
        engine = graph_engine(tiny_models[arch], **GRAPH_VARIANTS[variant])
    else:
        engine = LLMEngine(engine_config(tiny_models[arch], **VARIANTS[variant]))
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    prompts = make_prompts()
    # Two waves: the second reuses prefixes cached by the first (when the policy allows).
    first = run_engine(engine, prompts[:5], params)
    second = run_engine(engine, prompts[5:], params)
    got = [o.outputs[0].token_ids for o in first + second]
    assert got == oracle[arch]
    stats = engine.get_stats()
    for pool in engine.kv_pools:
        assert pool.stats().used_blocks == 0
    if variant.endswith("preemption"):
        assert stats["num_preemptions"] > 0
    if variant == "default":
        assert stats["kv_pools"][0].prefix_hit_tokens > 0
    if variant == "no_prefix_reuse":
        assert stats["kv_pools"][0].prefix_hit_tokens == 0
    if variant.endswith("pd_strict"):
        assert stats["scheduler"]["transferred_blocks"] > 0 and stats["scheduler"]["mixed_steps"] == 0
    if variant == "pd_time_share":
        assert stats["scheduler"]["mixed_steps"] == 0 and stats["scheduler"]["decode_steps"] > 0
    if variant == "pd_hybrid":
        assert stats["scheduler"]["mixed_steps"] > 0
    if variant in GRAPH_VARIANTS:
        assert engine.runner.graphs is not None and engine.runner.graphs.num_replays > 0


def test_prefix_hit_computes_only_the_suffix(tiny_models: dict[str, Path]) -> None:
    engine = LLMEngine(engine_config(tiny_models["llama"], kv_cache={"block_size": 16}))
    params = SamplingParams(temperature=0.0, max_tokens=1, ignore_eos=True)
    rng = random.Random(1)
    first = [rng.randrange(1, 256) for _ in range(40)]
    second = first[:32] + [rng.randrange(1, 256) for _ in range(10)]
    run_engine(engine, [first], params)
    before = engine.runner.num_forward_tokens
    run_engine(engine, [second], params)
    assert engine.runner.num_forward_tokens - before == 10  # two full blocks (32 tokens) came from the cache
    kv = engine.get_stats()["kv_pools"][0]
    assert kv.prefix_hit_tokens == 32
    assert kv.hit_rate == pytest.approx(32 / (40 + 42))


def test_reset_prefix_cache_makes_the_next_run_prefill_everything(tiny_models: dict[str, Path]) -> None:
    engine = LLMEngine(engine_config(tiny_models["llama"], kv_cache={"block_size": 16}))
    params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
    prompt = [random.Random(2).randrange(1, 256) for _ in range(40)]
    expected = run_engine(engine, [prompt], params)[0].outputs[0].token_ids
    assert engine.reset_prefix_cache() == 2  # the prompt's two full blocks
    before = engine.runner.num_forward_tokens
    assert run_engine(engine, [prompt], params)[0].outputs[0].token_ids == expected
    assert engine.runner.num_forward_tokens - before == 40 + 1  # the whole prompt, then one decode


def test_strict_pd_really_copies_blocks_between_pools(tiny_models: dict[str, Path]) -> None:
    options = {"mode": "strict", "decode_pool_fraction": 0.25}
    engine = LLMEngine(engine_config(tiny_models["qwen3"], scheduler={"name": "pd", "options": options}))
    assert len(engine.runner.kv_caches) == 2
    assert [p.num_blocks for p in engine.kv_pools] == [192, 64]  # 256 blocks split 3:1
    prompt = list(range(1, 14))
    engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=3, ignore_eos=True), request_id="r")
    engine.step()  # prefill on pool 0
    request = engine.scheduler.running[0]
    src_blocks = engine.kv_pools[0].block_ids("r")
    src = engine.runner.kv_caches[0][:, :, src_blocks].clone()
    engine.step()  # transfer, then decode on pool 1
    assert request.pool == 1 and engine.kv_pools[0].block_ids("r") == []
    dst_blocks = engine.kv_pools[1].block_ids("r")
    copied = engine.runner.kv_caches[1][:, :, dst_blocks[: len(src_blocks)]]
    full = len(prompt) // 4 * 4
    flat = lambda t: t.flatten(2, 3)[:, :, :full]  # noqa: E731
    assert torch.equal(flat(copied), flat(src)) and src.abs().sum() > 0


def test_decode_graph_runner_padding_and_static_buffers(tiny_models: dict[str, Path],
                                                        oracle: dict[str, list[list[int]]]) -> None:
    capture = ReplayByRerun()
    engine = graph_engine(tiny_models["llama"], capture, backend={"max_graph_batch_size": 6})
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    prompts = make_prompts()
    got = [o.outputs[0].token_ids for o in run_engine(engine, prompts[:5], params) + run_engine(engine, prompts[5:], params)]
    assert got == oracle["llama"]
    assert engine.runner.graphs.num_replays > 0 and capture.captured >= 1
