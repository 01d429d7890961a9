"""The engine process's plain-data side, in one process: the wire codec round-trips what crosses it
(`SamplingParams` with structured outputs, delta outputs, errors), and an engine in token mode whose
deltas go through the front end's `FrontendOutputs` gives the outputs of the in-process engine
(text, stop strings cut at the same place, finish reasons, logprob strings, ``n`` > 1)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from sagellm_core import errors
from sagellm_core.config import EngineConfig
from sagellm_core.engine import LLMEngine
from sagellm_core.engine.codec import Kind, decode, decode_error, encode, encode_error
from sagellm_core.engine.frontend_output import FrontendOutputs
from sagellm_core.outputs import RequestMetrics, RequestOutput
from sagellm_core.sampling_params import SamplingParams
from sagellm_core.structured.params import StructuredOutputsParams


# ---- codec ----------------------------------------------------------------------------------------
def test_codec_round_trips_requests_outputs_and_calls() -> None:
    params = SamplingParams(temperature=0.7, top_p=0.9, seed=-5, stop=["\n\n", "END"], max_tokens=7, n=2,
                            logprobs=3, structured_outputs=StructuredOutputsParams(
                                json={"type": "object", "properties": {"a": {"type": "integer"}}}))
    message = (Kind.ADD, 1, "req-1", [1, 2, 3], params, 0, True)
    kind, frontend, request_id, token_ids, decoded, priority, stream = decode(encode(message))
    assert (kind, frontend, request_id, token_ids, priority, stream) == (Kind.ADD, 1, "req-1", [1, 2, 3], 0, True)
    assert decoded == params and decoded.structured_outputs == params.structured_outputs
    assert decoded.structured_outputs.kind == "json"

    delta = ("req-1", True, None, RequestMetrics(arrival_time=1.0, first_token_time=2.0),
             [(0, [5, 6], "stop", None, [(5, -0.5, [(5, -0.5), (7, -1.5)]), (6, -0.1, [(6, -0.1)])])])
    assert decode(encode((Kind.OUTPUTS, 12, [delta]))) == (Kind.OUTPUTS, 12, [delta])
    assert decode(memoryview(encode((Kind.CALL, 0, 3, "stats")))) == (Kind.CALL, 0, 3, "stats")
    with pytest.raises(ValueError, match="not a sageLLM IPC message"):
        decode(encode(["a list"]))  # type: ignore[arg-type]


@pytest.mark.parametrize("error", [errors.InvalidRequestError("bad n", param="n"),
                                   errors.PromptTooLongError("too long", param="prompt"),
                                   errors.EngineOverloadedError("queue full"), errors.EngineDeadError("gone")])
def test_errors_cross_as_the_same_class(error: errors.SageLLMError) -> None:
    back = decode_error(decode(encode((Kind.REJECTED, "r", encode_error(error))))[2])
    assert type(back) is type(error) and str(back) == str(error)
    assert getattr(back, "param", None) == getattr(error, "param", None)


def test_other_errors_become_engine_dead_naming_the_class() -> None:
    back = decode_error(encode_error(KeyError("x")))
    assert isinstance(back, errors.EngineDeadError) and "KeyError" in str(back)


# ---- token mode + front-end detokenization == the in-process engine ---------------------------------
def _engine(model_dir: Path, detokenize: bool) -> LLMEngine:
    config = EngineConfig.from_dict({"model": {"path": str(model_dir), "dtype": "float32"},
                                     "backend": {"name": "cpu"}, "kv_cache": {"num_blocks": 128}})
    return LLMEngine(config, detokenize=detokenize)


def _finals(engine: LLMEngine, requests: list[tuple[list[int], SamplingParams, bool]],
            frontend: FrontendOutputs | None = None) -> dict[str, RequestOutput]:
    finals: dict[str, RequestOutput] = {}
    for index, (token_ids, params, stream) in enumerate(requests):
        engine_stream = stream if frontend is None else FrontendOutputs.engine_stream(params, stream)
        engine.add_request(token_ids, params, request_id=f"r{index}", stream=engine_stream)
        if frontend is not None:
            frontend.add(f"r{index}", None, token_ids, params, stream)
    while engine.has_unfinished():
        outputs = engine.step()
        if frontend is None:
            finals.update((output.request_id, output) for output in outputs if output.finished)
            continue
        assert outputs == []
        for delta in engine.take_deltas():
            shown, hit = frontend.apply(delta)
            for sequence_id, stop_string in hit:
                engine.finish_stopped(sequence_id, stop_string)
            if shown is not None and shown.finished:
                finals[shown.request_id] = shown
    return finals


def _summary(output: RequestOutput) -> list[tuple[Any, ...]]:
    return [(c.text, c.token_ids, c.finish_reason, c.stop_reason,
             [(e.token, round(e.logprob, 5), [t for _, t, _ in e.top]) for e in c.logprobs or []])
            for c in output.outputs]


def test_front_end_detokenization_matches_the_in_process_engine(tokenizer_model: Path) -> None:
    reference = _engine(tokenizer_model, detokenize=True)
    texts = _finals(reference, [([1, 450, 4996, 17354], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True), True)])
    generated = texts["r0"].outputs[0].text
    words = [w for w in generated.split(" ") if w.strip()]
    stop = words[len(words) // 2] if len(words) > 2 else generated[len(generated) // 2:][:3]
    requests = [
        ([1, 450, 4996, 17354], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True), True),
        ([1, 450, 4996, 17354], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=[stop]), True),
        ([1, 450, 4996, 17354], SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, stop=[stop]), False),
        ([1, 3, 5, 7, 9], SamplingParams(max_tokens=12, logprobs=2, ignore_eos=True), False),
        ([1, 3, 5, 7, 9], SamplingParams(max_tokens=10, n=3, temperature=1.0, seed=4, ignore_eos=True), True),
        ([1, 3, 5, 7, 9], SamplingParams(max_tokens=10, n=2, temperature=1.0, seed=9), False),
    ]
    expected = _finals(_engine(tokenizer_model, detokenize=True), requests)
    got = _finals(_engine(tokenizer_model, detokenize=False), requests,
                  FrontendOutputs(reference.tokenizer, reference.eos_token_ids))
    assert set(got) == set(expected) == {f"r{i}" for i in range(len(requests))}
    for request_id in expected:
        assert _summary(got[request_id]) == _summary(expected[request_id]), request_id
    assert got["r1"].outputs[0].finish_reason == "stop" and got["r1"].outputs[0].stop_reason == stop


def test_token_mode_outputs_are_deltas(tokenizer_model: Path) -> None:
    engine = _engine(tokenizer_model, detokenize=False)
    engine.add_request([1, 2, 3], SamplingParams(max_tokens=5, ignore_eos=True), request_id="a")
    seen: list[int] = []
    while engine.has_unfinished():
        assert engine.step() == []
        for request_id, finished, error, metrics, [(index, new, finish_reason, _, logprobs)] in engine.take_deltas():
            assert (request_id, index, error, logprobs) == ("a", 0, None, None)
            seen += new  # only what is new
            assert (metrics is not None) == finished == (finish_reason == "length")
    assert len(seen) == 5
    assert engine.finish_stopped("a", "x") is False  # finished and forgotten
    with pytest.raises(TypeError, match="detokenize=False"):
        _engine(tokenizer_model, detokenize=True).take_deltas()
