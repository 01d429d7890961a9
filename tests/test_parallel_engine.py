"""The engine over two processes on the CPU (gloo): tensor parallelism and the prefill/decode split
give the tokens of one process."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest

from sagellm_core.engine import LLMEngine
from sagellm_core.errors import ConfigError
from sagellm_core.sampling_params import SamplingParams
from conftest import engine_config, run_engine

GREEDY = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)


def _prompts(n: int = 5) -> list[list[int]]:
    rng = random.Random(1)
    return [[rng.randrange(1, 256) for _ in range(rng.randint(3, 30))] for _ in range(n)]


def _tokens(model_dir: Path, **sections: Any) -> tuple[list[list[int]], LLMEngine]:
    engine = LLMEngine(engine_config(model_dir, **sections))
    try:
        outputs = run_engine(engine, _prompts(), GREEDY)
    except BaseException:
        engine.release()
        raise
    return [o.outputs[0].token_ids for o in outputs], engine


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_tensor_parallel_two_ranks_match_one(tiny_models: dict[str, Path], arch: str) -> None:
    expected, single = _tokens(tiny_models[arch])
    single.release()
    got, engine = _tokens(tiny_models[arch], parallel={"tensor_parallel_size": 2})
    try:
        assert engine.runner.kv_caches[0].shape[-2] == 1  # this rank holds one of the two key/value heads
    finally:
        engine.release()
    assert got == expected


def test_strict_pd_across_two_processes_sends_the_blocks(tiny_models: dict[str, Path]) -> None:
    strict = {"name": "pd", "options": {"mode": "strict"}}
    expected, single = _tokens(tiny_models["llama"], scheduler=strict)
    moved_blocks = single.scheduler.stats()["transferred_blocks"]
    single.release()
    got, engine = _tokens(tiny_models["llama"], scheduler=strict, parallel={"pd_split": True})
    try:
        block_bytes = engine.runner.kv_caches[0][:, :, :1].numel() * engine.runner.kv_caches[0].element_size()
        sent = engine.runner.bytes_sent
        assert engine.scheduler.stats()["transferred_blocks"] == moved_blocks > 0
        assert sent == moved_blocks * block_bytes
        assert engine.runner.kv_caches[1].shape[2] == 0  # the decode pool lives in the other process
    finally:
        engine.release()
    assert got == expected
    print(f"strict PD over two processes: {moved_blocks} blocks, {sent} bytes sent")


def test_pd_split_needs_a_separate_decode_pool(tiny_models: dict[str, Path]) -> None:
    with pytest.raises(ConfigError, match="parallel.pd_split"):
        LLMEngine(engine_config(tiny_models["llama"], parallel={"pd_split": True}))
