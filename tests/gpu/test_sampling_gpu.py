"""The batched sampler on CUDA: sort-free filters equal the CPU's, the fused kernel draws from the
filtered distribution, keyed noise is the same function on both devices, steps with penalties and
logprobs stay in the async pipeline (tokens equal the synchronous engine's), and decode graphs are
captured at start-up."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import engine_config, run_engine
from sagellm_core.engine import LLMEngine
from sagellm_core.models.graphs import bucket_sizes
from sagellm_core.plan import PENDING_TOKEN
from sagellm_core.request import Request
from sagellm_core.sampling import Sampler
from sagellm_core.sampling.filters import filter_logits, reference_filter
from sagellm_core.sampling.seeds import keyed_exponential
from sagellm_core.sampling_params import SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]


def test_filters_on_cuda_equal_the_reference() -> None:
    logits = torch.randn(6, 151936, generator=torch.Generator().manual_seed(0)) * 4
    k, p, m = [50, 0, 0, 20, 0, 0], [0.95, 0.9, 1.0, 1.0, 0.5, 1.0], [0.0, 0.0, 0.05, 0.0, 0.0, 0.0]
    kept = ~torch.isinf(filter_logits(logits.cuda(), k, p, m).cpu())
    expected = ~torch.isinf(reference_filter(logits, k, p, m))
    assert (kept | ~expected).all()  # every token the reference keeps
    for row in range(6):  # and beyond it only ties within the top-p histogram's resolution
        extra = logits[row][kept[row] & ~expected[row]]
        assert extra.numel() == 0 or float(logits[row][expected[row]].min() - extra.max()) < 1e-5


def test_keyed_noise_is_the_same_function_on_cuda() -> None:
    keys = torch.tensor([3, 2**62 + 1], dtype=torch.int64)
    torch.testing.assert_close(keyed_exponential(keys.cuda(), 4096).cpu(), keyed_exponential(keys, 4096))


def test_fused_draws_follow_the_filtered_distribution() -> None:
    pytest.importorskip("triton")
    from sagellm_cuda.sampling import gumbel_argmax

    vocab, draws = 40, 100_000
    base = torch.linspace(2.0, -2.0, vocab)
    params = SamplingParams(temperature=0.8, top_p=0.9, top_k=12)
    requests = [Request(f"r{i}", [1], params, 4) for i in range(draws)]
    tokens = Sampler(fused=gumbel_argmax).sample(base.repeat(draws, 1).cuda(), requests).token_ids
    frequencies = torch.bincount(torch.tensor(tokens), minlength=vocab).double() / draws
    expected = reference_filter((base / 0.8).unsqueeze(0), [12], [0.9], [0.0]).softmax(-1)[0].double()
    assert frequencies[expected == 0].sum() == 0
    assert (frequencies - expected).abs().max() < 0.006


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=0.0, repetition_penalty=1.3, logprobs=3, max_tokens=10, ignore_eos=True),
    SamplingParams(temperature=0.9, seed=5, presence_penalty=0.5, frequency_penalty=0.5, top_p=0.9, top_k=30,
                   max_tokens=10, ignore_eos=True),
], ids=["repetition+logprobs", "seeded+penalties+filters"])
def test_penalties_and_logprobs_stay_asynchronous_on_cuda(tiny_models: dict[str, Path],
                                                          params: SamplingParams) -> None:
    def config(mode: str) -> object:
        return engine_config(tiny_models["qwen2"], backend={"name": "cuda"},
                             kv_cache={"block_size": 16, "num_blocks": 64}, scheduler={"async_scheduling": mode})

    prompts = [[5, 6, 7], [8, 9, 10, 11], [12]]
    expected = run_engine(LLMEngine(config("off")), prompts, params)  # type: ignore[arg-type]
    engine = LLMEngine(config("on"))  # type: ignore[arg-type]
    assert engine.async_scheduling
    for index, prompt in enumerate(prompts):
        engine.add_request(prompt, params, request_id=str(index))
    engine.step()
    assert engine._inflight is not None
    assert all(r.output_token_ids == [PENDING_TOKEN] for r in engine.scheduler.running)
    finals = {}
    while engine.has_unfinished():
        finals |= {o.request_id: o for o in engine.step() if o.finished}
    for index, reference in enumerate(expected):
        ours = finals[str(index)].outputs[0]
        assert ours.token_ids == reference.outputs[0].token_ids
        if params.logprobs is not None:
            assert ours.logprobs is not None and reference.outputs[0].logprobs is not None
            assert [[t[0] for t in lp.top] for lp in ours.logprobs] == \
                [[t[0] for t in lp.top] for lp in reference.outputs[0].logprobs]


def test_decode_graphs_are_captured_at_start_up_on_cuda(tiny_models: dict[str, Path]) -> None:
    config = engine_config(tiny_models["qwen2"], backend={"name": "cuda", "max_graph_batch_size": 24},
                           kv_cache={"block_size": 16, "num_blocks": 64})
    engine = LLMEngine(config)
    stats = engine.get_stats()["graph_capture"]
    assert stats["graphs"] == len(bucket_sizes(16)) and stats["seconds"] > 0  # max_num_seqs 16 in the test config


def test_sampling_kernels_are_warmed_up_at_start_up_without_state(tiny_models: dict[str, Path]) -> None:
    """The CUDA engine launches every sampling path at start-up (`sagellm_core.sampling.warm_up`) and
    keeps nothing of those trial requests."""
    engine = LLMEngine(engine_config(tiny_models["qwen2"], backend={"name": "cuda"},  # type: ignore[arg-type]
                                     kv_cache={"block_size": 16, "num_blocks": 64}))
    assert engine.sampler.compiles_kernels
    assert engine.sampler.penalties.slots == {} and engine.sampler.drawer._bases == {}
