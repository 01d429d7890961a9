"""`ModelRunner.warm_up_prefill`: a synthetic prefill at start-up (CUDA engines run it before graph
capture) writes no KV and changes no later output."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import engine_config, run_engine
from sagellm_core.engine import LLMEngine
from sagellm_core.sampling_params import SamplingParams


@pytest.mark.parametrize("lean", [True, False], ids=["lean-forward", "transformers-forward"])
def test_prefill_warm_up_writes_no_kv_and_changes_no_output(tiny_models: dict[str, Path], lean: bool) -> None:
    def engine() -> LLMEngine:
        return LLMEngine(engine_config(tiny_models["qwen2"], backend={"name": "cpu", "options": {"lean_decoder": lean}},
                                       kv_cache={"block_size": 16, "num_blocks": 32}))

    params = SamplingParams(max_tokens=6, temperature=0.0, ignore_eos=True)
    prompts = [[3, 4, 5, 6, 7, 8, 9], [10, 11, 12]]
    expected = [o.outputs[0].token_ids for o in run_engine(engine(), prompts, params)]
    warmed = engine()
    pools = [pool.clone() for pool in warmed.runner.kv_caches]
    warmed.runner.warm_up_prefill(tokens=40)
    assert all(torch.equal(a, b) for a, b in zip(pools, warmed.runner.kv_caches, strict=True))
    assert warmed.runner.num_forward_tokens == 0
    assert [o.outputs[0].token_ids for o in run_engine(warmed, prompts, params)] == expected
