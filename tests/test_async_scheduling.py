"""Async scheduling: step N+1 is queued before step N's tokens are read (run here on the CPU, where
the same bookkeeping runs synchronously). Token parity with transformers under async scheduling is
in test_engine_correctness; randomized aborts / preemption in test_kv_manager."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import engine_config, graph_engine, run_engine
from sagellm_core.engine import LLMEngine
from sagellm_core.models.inputs import build_host_batch
from sagellm_core.models.token_feed import TokenFeed, feed_pending
from sagellm_core.plan import PENDING_TOKEN, ChunkPlan, StepPlan
from sagellm_core.sampling_params import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


def async_engine(model_dir: Path, mode: str = "on") -> LLMEngine:
    return LLMEngine(engine_config(model_dir, scheduler={"async_scheduling": mode}))


def test_auto_is_off_on_the_cpu_and_on_is_honoured(tiny_engine_dir: Path) -> None:
    assert not async_engine(tiny_engine_dir, "auto").async_scheduling
    assert async_engine(tiny_engine_dir, "on").async_scheduling


def test_tokens_are_read_one_step_later_and_fed_from_the_device(tiny_engine_dir: Path) -> None:
    expected = run_engine(async_engine(tiny_engine_dir, "off"), [[5, 6, 7]], GREEDY)[0].outputs[0].token_ids
    engine = async_engine(tiny_engine_dir)
    engine.add_request([5, 6, 7], GREEDY, request_id="r")
    assert engine.step() == []  # prefill queued; nothing read yet
    request = engine.scheduler.running[0]
    assert request.output_token_ids == [PENDING_TOKEN] and engine._inflight is not None
    (out,) = engine.step()  # the first decode runs on the fed token while the prefill's is read
    assert out.outputs[0].token_ids == expected[:1]
    assert request.output_token_ids == expected[:1] + [PENDING_TOKEN]
    assert engine._inflight.feed.rows == {"r": 0}
    finals = []
    while engine.has_unfinished():
        finals += [o for o in engine.step() if o.finished]
    assert finals[0].outputs[0].token_ids == expected
    assert engine.kv_pools[0].stats().used_blocks == 0


SAMPLING_MIXES = {
    "logprobs": GREEDY.replace(logprobs=2),
    "repetition": GREEDY.replace(repetition_penalty=1.3),
    "presence+frequency": SamplingParams(temperature=0.8, seed=3, presence_penalty=0.5, frequency_penalty=0.5,
                                         max_tokens=6, ignore_eos=True),
    "filters+bias": SamplingParams(temperature=0.8, seed=4, top_p=0.9, top_k=20, min_p=0.02, logit_bias={7: 3.0},
                                   min_tokens=3, max_tokens=6, ignore_eos=True),
}


@pytest.mark.parametrize("params", list(SAMPLING_MIXES.values()), ids=list(SAMPLING_MIXES))
def test_every_sampling_parameter_stays_in_the_async_pipeline(tiny_engine_dir: Path, params: SamplingParams) -> None:
    """Penalties, logprobs, filters and biases run at depth 1 (the step is in flight when step()
    returns) and give the tokens and logprobs of the synchronous engine."""
    prompts = [[5, 6, 7], [8, 9], [3, 1, 4, 1, 5]]
    expected = run_engine(async_engine(tiny_engine_dir, "off"), prompts, params)
    engine = async_engine(tiny_engine_dir)
    for index, prompt in enumerate(prompts):
        engine.add_request(prompt, params, request_id=str(index))
    engine.step()
    assert engine._inflight is not None
    assert all(r.output_token_ids == [PENDING_TOKEN] for r in engine.scheduler.running)
    finals = {}
    while engine.has_unfinished():
        finals |= {o.request_id: o for o in engine.step() if o.finished}
    outs = [finals[str(index)].outputs[0] for index in range(len(prompts))]
    assert [o.token_ids for o in outs] == [e.outputs[0].token_ids for e in expected]
    if params.logprobs is not None:
        assert [o.logprobs for o in outs] == [e.outputs[0].logprobs for e in expected]


def test_abort_while_a_step_is_in_flight_drops_its_token(tiny_engine_dir: Path) -> None:
    engine = async_engine(tiny_engine_dir)
    engine.add_request([5, 6, 7], GREEDY, request_id="a")
    engine.add_request([8, 9], GREEDY, request_id="b")
    engine.step()
    engine.step()
    assert engine.abort("a")
    finals = {}
    while engine.has_unfinished():
        finals |= {o.request_id: o for o in engine.step() if o.finished}
    aborted = finals["a"].outputs[0]
    assert aborted.finish_reason == "abort" and aborted.token_ids and PENDING_TOKEN not in aborted.token_ids
    assert len(finals["b"].outputs[0].token_ids) == 6
    assert engine.kv_pools[0].stats().used_blocks == 0


def test_a_pending_token_without_a_feed_is_refused() -> None:
    with pytest.raises(RuntimeError, match="pending token"):
        feed_pending(torch.tensor([3, 0]), [1], ["r"], None)
    with pytest.raises(RuntimeError, match="pending token"):
        feed_pending(torch.tensor([3, 0]), [1], ["r"], TokenFeed(torch.tensor([5]), {"other": 0}))
    misplaced = StepPlan([ChunkPlan("r", 0, [PENDING_TOKEN, 4], [0], sample=True)])
    with pytest.raises(RuntimeError, match="pending token"):
        build_host_batch(misplaced, block_size=4)


def test_feed_overwrites_only_pending_last_inputs() -> None:
    plan = StepPlan([ChunkPlan("a", 3, [7], [0], sample=True),
                     ChunkPlan("b", 0, [99, PENDING_TOKEN], [1], sample=True)])
    host = build_host_batch(plan, block_size=4)
    assert host.pending_rows == [2] and host.pending_requests == ["b"]
    ids = torch.from_numpy(host.token_ids)
    feed_pending(ids, host.pending_rows, host.pending_requests, TokenFeed(torch.tensor([41, 42]), {"b": 1, "a": 0}))
    assert ids.tolist() == [7, 99, 42]
    assert host.positions.tolist() == [3, 0, 1] and host.slots.tolist() == [3, 4, 5]
    assert host.sample_rows.tolist() == [0, 2] and host.num_decodes == 1


def test_an_eager_step_is_not_launched_behind_a_step_in_flight(tiny_engine_dir: Path) -> None:
    expected = run_engine(async_engine(tiny_engine_dir, "off"), [[5, 6, 7], [8, 9]], GREEDY)
    engine = graph_engine(tiny_engine_dir, scheduler={"async_scheduling": "on"})
    engine.add_request([5, 6, 7], GREEDY, request_id="a")
    engine.step()  # prefill of a (nothing in flight before it)
    engine.step()  # decode of a ("replayed"), prefill's token read
    engine.add_request([8, 9], GREEDY, request_id="b")
    forward_tokens = engine.runner.num_forward_tokens
    (out,) = engine.step()  # b's prefill would run eagerly: only the step in flight is handed out
    assert out.request_id == "a" and engine.runner.num_forward_tokens == forward_tokens
    assert engine._inflight is None and engine._planned is not None
    finals = {}
    while engine.has_unfinished():
        finals |= {o.request_id: o for o in engine.step() if o.finished}
    assert [finals[r].outputs[0].token_ids for r in "ab"] == [o.outputs[0].token_ids for o in expected]
    assert engine.runner.graphs.num_replays > 0 and engine.kv_pools[0].stats().used_blocks == 0
