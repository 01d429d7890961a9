"""The engine under randomized workloads and hostile input: nothing leaks, nothing livelocks, a
poison request fails alone, gauges keep flowing. Deterministic (no timing assertions)."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import drive_with_aborts, engine_config, graph_engine, run_engine, unvalidated
from sagellm_core.engine import LLMEngine
from sagellm_core.engine.events import IDLE_EVENT_INTERVAL, EngineEvents
from sagellm_core.errors import ConfigError, InvalidRequestError, PromptTooLongError
from sagellm_core.plan import StepPlan
from sagellm_core.sampler import seed63
from sagellm_core.sampling_params import SamplingParams

EXACT = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


def drive(engine: LLMEngine, max_steps: int = 3000) -> dict[str, object]:
    """Step to completion checking the KV invariants after every step; final outputs by id."""
    return drive_with_aborts(engine, random.Random(0), 0.0, max_steps)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 10_000), num_blocks=st.integers(10, 30), scheduler=st.sampled_from(["fcfs", "priority", "pd"]),
       mode=st.sampled_from(["strict", "time_share", "hybrid"]), async_scheduling=st.sampled_from(["on", "off"]))
def test_small_pools_every_request_completes_with_its_token_count(tiny_engine_dir: Path, seed: int, num_blocks: int,
                                                                  scheduler: str, mode: str,
                                                                  async_scheduling: str) -> None:
    rng = random.Random(seed)
    engine = LLMEngine(engine_config(tiny_engine_dir, kv_cache={"num_blocks": num_blocks},
                                     scheduler={"name": scheduler, "options": {"mode": mode} if scheduler == "pd" else {},
                                                "max_num_batched_tokens": 16, "async_scheduling": async_scheduling}))
    capacity = engine.admission.pool_tokens
    expected = {}
    for i in range(rng.randint(2, 8)):
        prompt = [rng.randrange(1, 256) for _ in range(rng.randint(1, 24))]
        params = EXACT.replace(max_tokens=rng.randint(1, 12), temperature=rng.choice([0.0, 1.0]), seed=i)
        try:
            rid = engine.add_request(prompt, params, priority=rng.randint(0, 2))
        except PromptTooLongError as exc:
            assert len(prompt) + params.max_tokens > capacity and str(capacity) in str(exc)
            continue
        expected[rid] = min(params.max_tokens, engine.max_model_len - len(prompt))  # capped by the context
    finals = drive(engine)
    assert {rid: len(out.outputs[0].token_ids) for rid, out in finals.items()} == expected
    assert engine.events.step_counter > 0


@settings(max_examples=16, deadline=None)
@given(seed=st.integers(0, 10_000), num_blocks=st.integers(12, 40), scheduler=st.sampled_from(["fcfs", "priority", "pd"]),
       mode=st.sampled_from(["strict", "time_share", "hybrid"]), async_scheduling=st.sampled_from(["on", "off"]),
       decode_graphs=st.booleans())
def test_engine_randomized_aborts_and_preemption_leak_nothing(tiny_engine_dir: Path, seed: int, num_blocks: int,
                                                              scheduler: str, mode: str, async_scheduling: str,
                                                              decode_graphs: bool) -> None:
    """Random prompts sharing prefixes, random aborts, stop ids, logprobs, penalties, a small KV pool
    (preemption), with and without (CPU stand-ins for) decode graphs: every request ends exactly
    once and every block ends free."""
    rng = random.Random(seed)
    sections = dict(kv_cache={"num_blocks": num_blocks},
                    scheduler={"name": scheduler, "options": {"mode": mode} if scheduler == "pd" else {},
                               "max_num_batched_tokens": 24, "async_scheduling": async_scheduling})
    engine = graph_engine(tiny_engine_dir, **sections) if decode_graphs else LLMEngine(
        engine_config(tiny_engine_dir, **sections))
    base = [rng.randrange(1, 256) for _ in range(24)]
    ids = []
    for i in range(rng.randint(3, 10)):
        prompt = base[: rng.randint(0, 20)] + [rng.randrange(1, 256) for _ in range(rng.randint(1, 12))]
        params = SamplingParams(temperature=rng.choice([0.0, 1.0]), max_tokens=rng.randint(1, 8), seed=i,
                                stop_token_ids=[rng.randrange(1, 256)], n=rng.choice([1, 1, 2]),
                                logprobs=rng.choice([None, None, None, 1]),
                                repetition_penalty=rng.choice([1.0, 1.0, 1.0, 1.2]))
        try:
            ids.append(engine.add_request(prompt, params, priority=rng.randint(0, 3)))
        except PromptTooLongError:
            assert len(prompt) + params.max_tokens > engine.admission.pool_tokens  # rejected, not lost
    assert sorted(drive_with_aborts(engine, rng, 0.1)) == sorted(ids)


# ---- issue 10: livelock, admission, start-up limits --------------------------------------------
def test_a_request_that_can_never_fit_is_refused_with_the_numbers(tiny_engine_dir: Path) -> None:
    """The context is capped by the pool (64 tokens), so every admitted request fits it alone."""
    engine = LLMEngine(engine_config(tiny_engine_dir, kv_cache={"num_blocks": 16}))
    with pytest.raises(PromptTooLongError, match=r"prompt has 64 tokens; the context is 64"):
        engine.add_request(list(range(1, 65)), EXACT)
    assert isinstance(PromptTooLongError("x"), InvalidRequestError)
    long, short = run_engine(engine, [list(range(1, 41)), [1, 2, 3]], EXACT.replace(max_tokens=30))
    assert len(long.outputs[0].token_ids) == 24 and long.outputs[0].finish_reason == "length"  # 40 + 24 = 64
    assert len(short.outputs[0].token_ids) == 30


def test_a_request_that_fits_only_alone_runs_while_the_others_wait(tiny_engine_dir: Path) -> None:
    """16 blocks of 4: the big request needs 15 of them; the small ones give way (no spinning)."""
    engine = LLMEngine(engine_config(tiny_engine_dir, kv_cache={"num_blocks": 16},
                                     scheduler={"max_num_batched_tokens": 64}))
    small = [engine.add_request([i + 1] * 8, EXACT.replace(max_tokens=12)) for i in range(3)]
    big = engine.add_request(list(range(1, 31)), EXACT.replace(max_tokens=30))
    finals = drive(engine, max_steps=400)
    assert len(finals[big].outputs[0].token_ids) == 30
    assert all(len(finals[r].outputs[0].token_ids) == 12 for r in small)
    stats = engine.get_stats()
    assert stats["num_preemptions"] > 0 and stats["scheduler"]["preemptions"] == stats["num_preemptions"]


def test_self_preemption_is_counted_and_the_head_always_progresses(tiny_engine_dir: Path) -> None:
    """Two requests that each fit alone but not together: the later one gives way to itself."""
    engine = LLMEngine(engine_config(tiny_engine_dir, kv_cache={"num_blocks": 10}))  # 40 tokens
    first = engine.add_request(list(range(1, 11)), EXACT.replace(max_tokens=24))
    second = engine.add_request(list(range(11, 22)), EXACT.replace(max_tokens=24))  # crosses blocks first
    finals = drive(engine, max_steps=400)
    assert [len(finals[r].outputs[0].token_ids) for r in (first, second)] == [24, 24]
    assert engine.get_stats()["scheduler"]["self_preemptions"] > 0
    assert finals[first].metrics.num_preemptions == 0  # the head never gave way


def test_max_model_len_is_capped_by_the_pool_unless_set_explicitly(tiny_engine_dir: Path) -> None:
    engine = LLMEngine(engine_config(tiny_engine_dir, kv_cache={"num_blocks": 16}))
    assert engine.max_model_len == 64  # the model allows 256; the pool holds 16 x 4
    assert LLMEngine(engine_config(tiny_engine_dir)).max_model_len == 256
    with pytest.raises(ConfigError, match=r"model.max_model_len: 128 tokens .* holds 64 tokens .*16 blocks of 4"):
        LLMEngine(engine_config(tiny_engine_dir, model={"max_model_len": 128}, kv_cache={"num_blocks": 16}))


def test_n_larger_than_the_queue_is_invalid_not_overloaded(tiny_engine_dir: Path) -> None:
    engine = LLMEngine(engine_config(tiny_engine_dir, scheduler={"max_waiting": 2}))
    with pytest.raises(InvalidRequestError, match="n=3 is larger than the waiting queue"):
        engine.add_request([1, 2], EXACT.replace(n=3))


def test_token_id_prompts_are_used_as_given(tiny_engine_dir: Path) -> None:
    engine = LLMEngine(engine_config(tiny_engine_dir))
    rid = engine.add_request([5, 250, 7], EXACT)
    assert engine.groups[rid].prompt is None and engine.groups[rid].prompt_token_ids == [5, 250, 7]
    with pytest.raises(InvalidRequestError, match="integers in"):
        engine.add_request([5, "6"], EXACT)  # type: ignore[list-item]


# ---- gauges and watchdog -------------------------------------------------------------------------
class _Recorder:
    def __init__(self) -> None:
        self.steps: list = []

    def on_step(self, event: object) -> None:
        self.steps.append(event)

    def on_request_finished(self, event: object) -> None:
        pass


def test_idle_steps_report_gauges_at_a_bounded_rate(tiny_engine_dir: Path) -> None:
    engine = LLMEngine(engine_config(tiny_engine_dir))
    sink = _Recorder()
    events = EngineEvents({"rec": sink}, engine.scheduler, engine.kv_pools)
    for t in (0.0, IDLE_EVENT_INTERVAL / 2, IDLE_EVENT_INTERVAL * 1.5, IDLE_EVENT_INTERVAL * 1.6):
        events.step(StepPlan(), t, t, idle=True)
    assert len(sink.steps) == 2
    events.step(StepPlan(preempted=["r"]), 1.0, 1.0)  # not idle: always reported
    assert sink.steps[-1].num_preempted == 1


def test_every_working_step_reports_and_progress_is_visible(tiny_engine_dir: Path) -> None:
    engine = LLMEngine(engine_config(tiny_engine_dir))
    sink = _Recorder()
    engine.events.sinks["rec"] = sink
    before = engine.last_progress_time
    engine.add_request([1, 2, 3], EXACT)
    assert engine.has_unfinished()
    steps = 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
    assert len(sink.steps) == steps == engine.step_counter
    assert engine.last_progress_time >= before and not engine.has_unfinished()
    assert sum(e.num_output_tokens for e in sink.steps) == 6


# ---- poison requests fail alone --------------------------------------------------------------------
@pytest.mark.parametrize("async_scheduling", ["off", "on"])
def test_a_poison_seed_fails_its_request_only(tiny_engine_dir: Path, async_scheduling: str) -> None:
    engine = LLMEngine(engine_config(tiny_engine_dir, scheduler={"async_scheduling": async_scheduling}))
    good = engine.add_request([1, 2, 3], EXACT.replace(temperature=1.0, seed=1))
    bad = engine.add_request([4, 5, 6], unvalidated(EXACT.replace(temperature=1.0), seed="x"))
    finals = drive(engine)
    assert finals[bad].outputs[0].finish_reason == "error" and "seed" in finals[bad].error
    assert len(finals[good].outputs[0].token_ids) == 6 and finals[good].error is None


def test_an_output_processing_failure_fails_its_request_only(tokenizer_model: Path) -> None:
    engine = LLMEngine(engine_config(tokenizer_model))
    good = engine.add_request("Hello", EXACT)
    bad = engine.add_request("World", EXACT.replace(stop=["zz"]))

    class Broken:
        def add(self, token_id: int) -> str:
            raise ValueError("cannot detokenize")

    engine.outputs.states[bad][1].detokenizer = Broken()
    finals = drive(engine)
    assert finals[bad].outputs[0].finish_reason == "error" and "cannot detokenize" in finals[bad].error
    assert len(finals[good].outputs[0].token_ids) == 6


# ---- seeds and temperatures ------------------------------------------------------------------------
def test_seeds_are_reduced_to_63_bits_by_one_fixed_function() -> None:
    assert seed63(1234) == 1234
    big = [seed63(2**70), seed63(2**70 + 1), seed63(-5), seed63(-(2**80))]
    assert all(0 <= s < 2**63 for s in big) and len(set(big)) == 4
    assert seed63(2**70) == seed63(2**70)
    with pytest.raises(TypeError, match="seed must be an integer"):
        seed63("x")  # type: ignore[arg-type]


def test_huge_seeds_and_tiny_temperatures_run(tiny_engine_dir: Path) -> None:
    engine = LLMEngine(engine_config(tiny_engine_dir))
    greedy = run_engine(engine, [[9, 8, 7]], EXACT)[0].outputs[0].token_ids
    tiny = run_engine(engine, [[9, 8, 7]], EXACT.replace(temperature=1e-40))[0].outputs[0].token_ids
    assert tiny == greedy
    params = unvalidated(EXACT.replace(temperature=1.0, top_p=0.9), seed=2**70)  # the front end refuses it
    first = run_engine(engine, [[9, 8, 7]], params)[0].outputs[0].token_ids
    assert run_engine(engine, [[9, 8, 7]], params)[0].outputs[0].token_ids == first and len(first) == 6
