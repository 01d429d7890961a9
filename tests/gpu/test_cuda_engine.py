"""The engine on a CUDA GPU: fp32 greedy parity with transformers (eager and CUDA graphs), and bf16
agreement at least at the level transformers has with itself across batch sizes."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from conftest import ARCHITECTURES, engine_config, run_engine, unvalidated
from hf_oracle import agreement, hf_greedy
from sagellm_core.engine import LLMEngine
from sagellm_core.sampling_params import SamplingParams

pytestmark = pytest.mark.gpu
MAX_NEW = 12


def _prompts(seed: int = 0, count: int = 10) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, 256) for _ in range(rng.choice([1, 2, 7, 16, 33, 70]))] for _ in range(count)]



@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("graphs", [False, True])
@pytest.mark.parametrize("schedule", ["sync", "async", "async_preemption"])
def test_fp32_greedy_matches_transformers_on_gpu(arch: str, graphs: bool, schedule: str,
                                                 tiny_models: dict[str, Path]) -> None:
    prompts = _prompts()
    expected = hf_greedy(tiny_models[arch], prompts, torch.float32, MAX_NEW)
    config = engine_config(tiny_models[arch], backend={"name": "cuda", "cuda_graphs": graphs},
                           kv_cache={"block_size": 16, "num_blocks": 12 if schedule == "async_preemption" else 128},
                           scheduler={"async_scheduling": "off" if schedule == "sync" else "auto"})
    engine = LLMEngine(config)
    assert engine.async_scheduling == (schedule != "sync")  # auto: on for CUDA
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    got = [o.outputs[0].token_ids for o in run_engine(engine, prompts[:6], params) + run_engine(engine, prompts[6:], params)]
    assert got == expected
    if graphs:
        assert engine.runner.graphs is not None and engine.runner.graphs.num_replays > 0
    if schedule == "async_preemption":
        assert engine.get_stats()["num_preemptions"] > 0



def test_bf16_agreement_is_at_transformers_self_agreement_level(tiny_models: dict[str, Path]) -> None:
    prompts = _prompts(seed=1, count=16)
    hf_single = hf_greedy(tiny_models["qwen3"], prompts, torch.bfloat16, MAX_NEW, batch=1)
    hf_batched = hf_greedy(tiny_models["qwen3"], prompts, torch.bfloat16, MAX_NEW, batch=8)
    baseline = agreement(hf_single, hf_batched)
    engine = LLMEngine(engine_config(tiny_models["qwen3"], model={"dtype": "bfloat16"}, backend={"name": "cuda"},
                                     kv_cache={"block_size": 16, "num_blocks": 128}))
    ours = [o.outputs[0].token_ids for o in run_engine(engine, prompts, SamplingParams(
        temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True))]
    score = agreement(hf_single, ours)
    print(f"bf16 agreement: transformers batch1 vs batch8 {baseline:.3f}; sageLLM vs transformers {score:.3f}")
    assert score >= baseline - 0.1


@pytest.mark.parametrize("top_p", [1.0, 0.9], ids=["fused", "filtered"])
def test_huge_seeds_and_tiny_temperatures_on_gpu(top_p: float, tiny_models: dict[str, Path]) -> None:
    """A seed of 2**70 must not overflow torch.Generator.manual_seed (top-p: torch's generator path;
    1.0: the fused sampler's keys); a temperature of 1e-40 samples greedily."""
    engine = LLMEngine(engine_config(tiny_models["llama"], backend={"name": "cuda"},
                                     kv_cache={"block_size": 16, "num_blocks": 64}))
    greedy = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    expected = run_engine(engine, [[5, 6, 7]], greedy)[0].outputs[0].token_ids
    assert run_engine(engine, [[5, 6, 7]], greedy.replace(temperature=1e-40))[0].outputs[0].token_ids == expected
    seeded = unvalidated(greedy.replace(temperature=1.0, top_p=top_p), seed=2**70)  # the front end refuses it
    first = run_engine(engine, [[5, 6, 7]], seeded)[0].outputs[0].token_ids
    assert run_engine(engine, [[5, 6, 7]], seeded)[0].outputs[0].token_ids == first and len(first) == MAX_NEW


def test_a_poison_request_fails_alone_on_gpu(tiny_models: dict[str, Path]) -> None:
    engine = LLMEngine(engine_config(tiny_models["llama"], backend={"name": "cuda"},
                                     kv_cache={"block_size": 16, "num_blocks": 64}))
    params = SamplingParams(temperature=1.0, max_tokens=MAX_NEW, ignore_eos=True)
    good = engine.add_request([1, 2, 3], params.replace(seed=1))
    bad = engine.add_request([4, 5, 6], unvalidated(params, seed="x"))
    finals = {}
    while engine.has_unfinished():
        finals |= {o.request_id: o for o in engine.step() if o.finished}
    assert finals[bad].outputs[0].finish_reason == "error"
    assert len(finals[good].outputs[0].token_ids) == MAX_NEW
    assert engine.kv_pools[0].stats().used_blocks == 0
