"""Async scheduling: step N+1 is queued before step N's tokens are read (run here on the CPU, where
the same bookkeeping runs synchronously). Token parity with transformers under async scheduling is
in test_engine_correctness; randomized aborts / preemption in test_kv_manager."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import DecodeOnlyGraphs, engine_config, run_engine
from sagellm_core.engine import LLMEngine
from sagellm_core.models.token_feed import TokenFeed, feed_pending
from sagellm_core.request import PENDING_TOKEN
from sagellm_core.sampling_params import SamplingParams
from sagellm_core.schedulers.base import ScheduledChunk

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
    finals = []
    while engine.has_unfinished():
        finals += [o for o in engine.step() if o.finished]
    assert finals[0].outputs[0].token_ids == expected
    assert engine.kv_pools[0].stats().used_blocks == 0


@pytest.mark.parametrize("params", [GREEDY.replace(logprobs=2), GREEDY.replace(repetition_penalty=1.3)],
                         ids=["logprobs", "penalty"])
def test_steps_that_need_host_tokens_run_synchronously(tiny_engine_dir: Path, params: SamplingParams) -> None:
    engine = async_engine(tiny_engine_dir)
    engine.add_request([5, 6, 7], params)
    engine.step()
    assert engine._inflight is None
    assert PENDING_TOKEN not in engine.scheduler.running[0].output_token_ids


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
    ids = torch.tensor([3, 0])
    with pytest.raises(RuntimeError, match="pending token"):
        feed_pending(ids, [3, PENDING_TOKEN], [], [], None)


def test_feed_overwrites_only_pending_last_inputs(tiny_engine_dir: Path) -> None:
    engine = async_engine(tiny_engine_dir)
    engine.add_request([5, 6, 7], GREEDY, request_id="r")
    engine.step()
    request = engine.scheduler.running[0]
    feed = TokenFeed(torch.tensor([41]), {"r": 0})
    ids = torch.tensor([7, 99, PENDING_TOKEN])
    feed_pending(ids, [7, 99, PENDING_TOKEN], [ScheduledChunk(request, 1)], [2], feed)
    assert ids.tolist() == [7, 99, 41]


def test_an_eager_step_is_not_launched_behind_a_step_in_flight(tiny_engine_dir: Path) -> None:
    expected = run_engine(async_engine(tiny_engine_dir, "off"), [[5, 6, 7], [8, 9]], GREEDY)
    engine = async_engine(tiny_engine_dir)
    engine.runner.graphs = DecodeOnlyGraphs(engine.runner)
    engine.add_request([5, 6, 7], GREEDY, request_id="a")
    engine.step()  # prefill of a (nothing in flight before it)
    engine.step()  # decode of a ("replayed"), prefill's token read
    engine.add_request([8, 9], GREEDY, request_id="b")
    forward_tokens = engine.runner.num_forward_tokens
    (out,) = engine.step()  # b's prefill would run eagerly: only the step in flight is handed out
    assert out.request_id == "a" and engine.runner.num_forward_tokens == forward_tokens
    assert engine._inflight is None and engine._carried is not None
    finals = {}
    while engine.has_unfinished():
        finals |= {o.request_id: o for o in engine.step() if o.finished}
    assert [finals[r].outputs[0].token_ids for r in "ab"] == [o.outputs[0].token_ids for o in expected]
    assert engine.runner.graphs.replays > 0 and engine.kv_pools[0].stats().used_blocks == 0
