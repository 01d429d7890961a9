"""The library front end: complete parameter validation, the input worker pool (the engine gets token
ids only), the length pre-check, engine death and the stall watchdog."""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Any, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import ExitingSink, engine_config
from sagellm_core.errors import EngineDeadError, InvalidRequestError, PromptTooLongError
from sagellm_core.health import StallWatchdog
from sagellm_core.inputs import InputProcessor, generation_defaults
from sagellm_core.llm import LLM
from sagellm_core.sampling_params import SamplingParams

TIMEOUT = 120.0
NO_EOS = dict(ignore_eos=True)


@pytest.fixture(scope="module")
def llm(tokenizer_model: Path) -> Iterator[LLM]:
    with LLM(config=engine_config(tokenizer_model, scheduler={"max_waiting": 50}), stall_timeout_s=None) as engine:
        yield engine


# ---- SamplingParams: every type and value checked once, at construction ---------------------------
@pytest.mark.parametrize("kwargs, param", [
    ({"seed": "x"}, "seed"), ({"seed": 2**70}, "seed"), ({"seed": -(2**63) - 1}, "seed"), ({"seed": 1.5}, "seed"),
    ({"stop_token_ids": ["a"]}, "stop_token_ids"), ({"stop_token_ids": [True]}, "stop_token_ids"),
    ({"stop_token_ids": [-1]}, "stop_token_ids"), ({"stop": 5}, "stop"), ({"stop": [""]}, "stop"),
    ({"n": True}, "n"), ({"n": 0}, "n"), ({"max_tokens": 1.0}, "max_tokens"), ({"max_tokens": False}, "max_tokens"),
    ({"ignore_eos": 1}, "ignore_eos"), ({"skip_special_tokens": "yes"}, "skip_special_tokens"),
    ({"temperature": math.nan}, "temperature"), ({"temperature": math.inf}, "temperature"),
    ({"temperature": -0.1}, "temperature"), ({"temperature": "1"}, "temperature"), ({"top_p": math.nan}, "top_p"),
    ({"top_p": 0.0}, "top_p"), ({"min_p": -math.inf}, "min_p"), ({"top_k": 2.0}, "top_k"),
    ({"repetition_penalty": math.inf}, "repetition_penalty"), ({"presence_penalty": 3}, "presence_penalty"),
    ({"frequency_penalty": math.nan}, "frequency_penalty"), ({"logprobs": 21}, "logprobs"),
    ({"logprobs": True}, "logprobs"), ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
])
def test_sampling_params_reject_bad_values_and_types(kwargs: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequestError, match=param) as raised:
        SamplingParams(**kwargs)
    assert raised.value.param == param


def test_sampling_params_checked_on_assignment_and_accept_edges() -> None:
    params = SamplingParams(seed=2**63 - 1, stop="x", stop_token_ids=(1, 2), temperature=0)
    assert params.stop == ["x"] and params.stop_token_ids == [1, 2] and params.greedy
    assert SamplingParams(seed=-(2**63)).seed == -(2**63)
    with pytest.raises(InvalidRequestError, match="seed"):
        params.seed = "y"
    with pytest.raises(InvalidRequestError, match="temperature"):
        params.replace(temperature=math.nan)


def test_tiny_temperatures_are_greedy(llm: LLM) -> None:
    assert SamplingParams(temperature=1e-6).greedy and SamplingParams(temperature=1e-38).greedy
    assert not SamplingParams(temperature=1e-5).greedy
    greedy = llm.generate("Tiny temperature", SamplingParams(temperature=0.0, max_tokens=8, **NO_EOS),
                          use_tqdm=False)[0]
    tiny = llm.generate("Tiny temperature", SamplingParams(temperature=1e-30, seed=1, max_tokens=8, **NO_EOS),
                        use_tqdm=False)[0]
    assert tiny.outputs[0].token_ids == greedy.outputs[0].token_ids
    assert len(set(tiny.outputs[0].token_ids)) > 1  # not token 0 over and over (NaN probabilities)


# ---- the input pool ---------------------------------------------------------------------------------
def test_submit_returns_at_once_and_the_engine_gets_token_ids_from_the_pool(llm: LLM,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    seen: dict[str, Any] = {}
    process, add_request = llm.inputs.process, llm.engine.add_request

    def slow_process(prompt: Any, **kwargs: Any) -> Any:
        seen["thread"] = threading.current_thread().name
        assert release.wait(TIMEOUT)
        return process(prompt, **kwargs)

    def recording_add(prompt: Any, *args: Any, **kwargs: Any) -> Any:
        seen["prompt"] = prompt
        return add_request(prompt, *args, **kwargs)

    monkeypatch.setattr(llm.inputs, "process", slow_process)
    monkeypatch.setattr(llm.engine, "add_request", recording_add)
    stream = llm.submit("Hello there", SamplingParams(max_tokens=3, **NO_EOS))  # returns while tokenizing is held
    assert "prompt" not in seen
    release.set()
    final = list(stream)[-1]
    assert seen["thread"].startswith("sagellm-input")
    assert isinstance(seen["prompt"], list) and all(isinstance(t, int) for t in seen["prompt"])
    assert seen["prompt"] == list(llm.tokenizer("Hello there").input_ids)
    assert final.prompt == "Hello there" and len(final.outputs[0].token_ids) == 3


def test_input_errors_reach_the_stream(llm: LLM) -> None:
    cases = [("bad \ud800 text", InvalidRequestError, "surrogate"), ("", InvalidRequestError, "empty"),
             ([llm.engine.vocab_size], InvalidRequestError, "token ids"), ([True], InvalidRequestError, "integers"),
             (3.5, InvalidRequestError, "prompt must be"), (list(range(1, 300)), PromptTooLongError, "context")]
    for prompt, error, message in cases:
        stream = llm.submit(prompt, SamplingParams(max_tokens=2))
        with pytest.raises(error, match=message):
            list(stream)
    with pytest.raises(InvalidRequestError, match="n \\(51\\)"):  # can never fit the waiting queue
        list(llm.submit("x", SamplingParams(n=51)))
    with pytest.raises(InvalidRequestError, match="SamplingParams"):
        list(llm.submit("x", {"max_tokens": 2}))  # type: ignore[arg-type]
    assert llm.generate("still fine", SamplingParams(max_tokens=2, **NO_EOS), use_tqdm=False)[0].finished


def test_abort_while_the_input_is_processed(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    release = threading.Event()
    process = llm.inputs.process

    def held(prompt: Any, **kwargs: Any) -> Any:
        assert release.wait(TIMEOUT)
        return process(prompt, **kwargs)

    monkeypatch.setattr(llm.inputs, "process", held)
    stream = llm.submit("Abort me early", SamplingParams(max_tokens=100, **NO_EOS))
    llm.abort(stream.request_id)  # before the engine has seen the request
    release.set()
    final = list(stream)[-1]
    assert final.outputs[0].finish_reason == "abort" and len(final.outputs[0].token_ids) < 100
    assert llm.call(lambda engine: engine.kv_pools[0].stats().used_blocks) == 0


def test_chat_template_kwargs_reach_the_template(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                "{% if enable_thinking %}<think>{% endif %}assistant:")
    monkeypatch.setattr(llm.tokenizer, "chat_template", template)
    messages = [{"role": "user", "content": "Hi"}]
    plain = llm.inputs.render_chat(messages)
    thinking = llm.inputs.render_chat(messages, {"enable_thinking": True})
    assert "<think>" in thinking and "<think>" not in plain
    final = list(llm.chat(messages, SamplingParams(max_tokens=2, **NO_EOS), chat_template_kwargs={
        "enable_thinking": True}))[-1]
    assert final.prompt == thinking
    with pytest.raises(InvalidRequestError, match="tokenize"):
        llm.inputs.render_chat(messages, {"tokenize": True})


# ---- the length pre-check ---------------------------------------------------------------------------
class CountingTokenizer:
    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        return self.tokenizer(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.tokenizer, name)


def test_an_overlong_text_is_refused_without_tokenizing(llm: LLM) -> None:
    counting = CountingTokenizer(llm.tokenizer)
    inputs = InputProcessor(counting, llm.engine.vocab_size, llm.engine.max_model_len, 50)
    limit = inputs.max_prompt_chars
    assert limit is not None and limit >= llm.engine.max_model_len
    with pytest.raises(PromptTooLongError, match="characters"):
        inputs.encode("a" * (limit + 1))
    assert counting.calls == 0
    with pytest.raises(PromptTooLongError, match="tokens"):  # fits the bound, tokenized, then too long
        inputs.encode("a " * llm.engine.max_model_len)
    assert counting.calls == 1


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=st.one_of(st.text(min_size=1, max_size=600),
                      st.builds(lambda piece, times: piece * times, st.text(min_size=1, max_size=8),
                                st.integers(1, 200))))
def test_the_pre_check_never_refuses_a_prompt_that_fits(llm: LLM, text: str) -> None:
    """With a context of 8 tokens the character bound bites often; whenever it refuses, the real
    tokenization is too long as well."""
    inputs = InputProcessor(llm.tokenizer, llm.engine.vocab_size, 8, 50)
    try:
        inputs.check_length(text)
    except PromptTooLongError:
        assert len(llm.tokenizer(text).input_ids) >= 8


def test_generation_defaults_read_only_what_the_model_sets() -> None:
    from transformers import GenerationConfig

    class Model:
        generation_config = GenerationConfig(temperature=0.6, top_p=0.95, top_k=20, max_new_tokens=7)

    assert generation_defaults(Model()) == {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "max_tokens": 7}
    Model.generation_config = GenerationConfig()
    assert generation_defaults(Model()) == {}


# ---- engine death and the watchdog ------------------------------------------------------------------
def test_engine_death_fails_callers_at_once_and_refuses_work(tokenizer_model: Path) -> None:
    llm = LLM(config=engine_config(tokenizer_model), stall_timeout_s=None)
    try:
        assert llm.health().ok and llm.is_running
        llm.call(lambda engine: engine.metric_sinks.__setitem__("exiting", ExitingSink()))
        stream = llm.submit("doomed", SamplingParams(max_tokens=50, **NO_EOS))
        with pytest.raises(EngineDeadError, match="SystemExit"):
            list(stream)
        health = llm.health()
        assert health.status == "dead" and "SystemExit" in health.detail and not llm.is_running
        with pytest.raises(EngineDeadError):
            llm.submit("refused")
        with pytest.raises(EngineDeadError):
            llm.call(lambda engine: None)
        with pytest.raises(EngineDeadError):
            llm.generate("refused too", use_tqdm=False)
    finally:
        llm.shutdown()
    assert llm.health().status == "dead"


def test_stall_watchdog_with_an_injected_clock() -> None:
    now = [0.0]
    dog = StallWatchdog(10.0, clock=lambda: now[0])
    assert not dog.observe(marker=1, busy=True)
    now[0] = 9.0
    assert not dog.observe(marker=1, busy=True)
    now[0] = 10.5
    assert dog.observe(marker=1, busy=True) and dog.stalled_for == pytest.approx(10.5)
    assert not dog.observe(marker=2, busy=True)  # a step completed: healthy again
    now[0] = 30.0
    assert not dog.observe(marker=2, busy=False)  # idle is not a stall
    now[0] = 35.0
    assert not dog.observe(marker=2, busy=True)
    now[0] = 45.0
    assert dog.observe(marker=2, busy=True)


def test_health_reports_a_stall(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    dog = StallWatchdog(5.0, clock=lambda: 0.0)
    monkeypatch.setattr(llm, "watchdog", dog)
    dog.observe(marker=llm.engine.step_counter, busy=True, now=0.0)
    assert llm.health().ok
    dog.observe(marker=llm.engine.step_counter, busy=True, now=6.0)
    health = llm.health()
    assert health.status == "stalled" and "6 s" in health.detail
