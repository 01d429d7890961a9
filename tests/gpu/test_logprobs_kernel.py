"""The CUDA one-pass logprobs kernel (`sagellm_cuda.logprobs`) against torch's ``logsumexp`` and
``topk``, its speed against that torch path at nano-vllm's batch, and logprobs through it in the
engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from conftest import engine_config, run_engine
from logprobs_cases import check_against_torch, run_cases
from sagellm_core.engine import LLMEngine
from sagellm_core.sampling_params import SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


@pytest.fixture(scope="module")
def kernel() -> Any:
    pytest.importorskip("triton")
    import sagellm_cuda.logprobs

    return sagellm_cuda.logprobs


def test_cases_equal_torch(kernel: Any) -> None:
    run_cases(kernel.top_logprobs, "cuda", big_rows=64)


@pytest.mark.parametrize("rows", [1, 7, 256])
@pytest.mark.parametrize("n", [0, 1, 5, 16, 20, 32])
def test_qwen3_vocabulary_equals_torch(kernel: Any, rows: int, n: int) -> None:
    torch.manual_seed(rows * 100 + n)
    logits = torch.randn(rows, 151936, device="cuda") * 3
    logits[:, 1000:3000] = float("-inf")  # banned tokens
    check_against_torch(kernel.top_logprobs, logits, n)


def test_fused_logprobs_declines_what_it_does_not_take(kernel: Any) -> None:
    logits = torch.randn(3, 500, device="cuda")
    assert kernel.fused_logprobs(logits.half(), 5) is None and kernel.fused_logprobs(logits, 33) is None
    assert kernel.fused_logprobs(logits, 20) is not None


def _gpu_ms(fn: Any, repeats: int = 50) -> float:
    for _ in range(5):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / repeats


def test_engine_logprobs_through_the_kernel_equal_the_torch_path(tiny_models: dict[str, Path],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    config = engine_config(tiny_models["qwen2"], backend={"name": "cuda"},
                           kv_cache={"block_size": 16, "num_blocks": 64})
    params = SamplingParams(max_tokens=8, logprobs=5, temperature=0.0, ignore_eos=True)
    fused = LLMEngine(config)
    assert fused.sampler.fused_logprobs is not None
    monkeypatch.setenv("SAGELLM_FUSED_LOGPROBS", "0")
    plain = LLMEngine(config)
    assert plain.sampler.fused_logprobs is None
    prompts = [[1, 5, 9, 2], [3, 3, 8, 1, 1]]
    for a, b in zip(run_engine(fused, prompts, params), run_engine(plain, prompts, params)):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        for x, y in zip(a.outputs[0].logprobs, b.outputs[0].logprobs):
            assert x.logprob == pytest.approx(y.logprob, abs=1e-4)
            assert [lp for _, _, lp in x.top] == pytest.approx([lp for _, _, lp in y.top], abs=1e-4)
