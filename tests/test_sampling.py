"""Sampling parameters, seeded reproducibility, stop conditions, streaming text and logprobs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from conftest import assert_seeded_request_ignores_its_batch, engine_config, run_engine
from sagellm_core.detokenizer import IncrementalDetokenizer
from sagellm_core.engine import LLMEngine
from sagellm_core.errors import InvalidRequestError
from sagellm_core.request import Request
from sagellm_core.sampler import Sampler
from sagellm_core.sampling_params import SamplingParams


@pytest.mark.parametrize("bad", [
    {"max_tokens": 0}, {"temperature": -0.1}, {"top_p": 0.0}, {"top_p": 1.5}, {"top_k": -1}, {"n": 0},
    {"min_p": 2.0}, {"logprobs": 50}, {"presence_penalty": 3.0}, {"min_tokens": 5, "max_tokens": 2},
    {"stop": [""]}, {"repetition_penalty": 0.0},
])
def test_invalid_sampling_parameters_raise(bad: dict) -> None:
    with pytest.raises(InvalidRequestError):
        SamplingParams(**bad)


def _request(rid: str, params: SamplingParams, prompt: list[int] | None = None) -> Request:
    return Request(rid, prompt or [1, 2, 3], params, params.max_tokens or 16)


def test_top_k_top_p_min_p_restrict_the_support() -> None:
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]] * 3)
    params = [SamplingParams(temperature=1.0, top_k=2, seed=1), SamplingParams(temperature=1.0, top_p=0.5, seed=2),
              SamplingParams(temperature=1.0, min_p=0.3, seed=3)]
    sampler = Sampler()
    allowed = [{0, 1}, {0}, {0, 1}]  # softmax: 0.64, 0.24, 0.09, ... ; min_p 0.3*0.64 = 0.19
    for _ in range(50):
        result = sampler.sample(logits, [_request(f"r{i}", p) for i, p in enumerate(params)])
        for token, ok in zip(result.token_ids, allowed):
            assert token in ok


def test_penalties_change_the_greedy_choice() -> None:
    logits = torch.tensor([[2.0, 1.9, 0.0]])
    base = _request("a", SamplingParams(temperature=0.0))
    base.output_token_ids = [0]
    assert Sampler().sample(logits, [base]).token_ids == [0]
    for params in (SamplingParams(temperature=0.0, presence_penalty=0.5),
                   SamplingParams(temperature=0.0, frequency_penalty=0.5),
                   SamplingParams(temperature=0.0, repetition_penalty=1.2)):
        request = _request("b", params, prompt=[2])
        request.output_token_ids = [0]
        assert Sampler().sample(logits, [request]).token_ids == [1]


def test_min_tokens_masks_eos() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0]])
    request = Request("a", [2], SamplingParams(temperature=0.0, min_tokens=2), 4, eos_token_ids=frozenset({1}))
    assert Sampler().sample(logits, [request]).token_ids == [2]


def test_logprobs_are_log_softmax_with_top_alternatives() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0]])
    result = Sampler().sample(logits, [_request("a", SamplingParams(temperature=0.0, logprobs=2))])
    expected = torch.log_softmax(logits[0], dim=-1)
    chosen, top_ids, top_logprobs = result.logprobs[0]
    assert result.token_ids == [1] and chosen == pytest.approx(float(expected[1]))
    assert top_ids == [1, 2] and top_logprobs[1] == pytest.approx(float(expected[2]))


def test_seeded_sampling_is_independent_of_the_batch(tiny_models: dict[str, Path]) -> None:
    seeded = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=12, ignore_eos=True)
    assert_seeded_request_ignores_its_batch(
        LLMEngine(engine_config(tiny_models["qwen2"])),
        LLMEngine(engine_config(tiny_models["qwen2"], scheduler={"max_num_batched_tokens": 9})), seeded)


def test_n_completions_are_distinct_and_seed_reproducible(tiny_models: dict[str, Path]) -> None:
    params = SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=8, ignore_eos=True)
    first = run_engine(LLMEngine(engine_config(tiny_models["llama"])), [[5, 6, 7]], params)[0]
    second = run_engine(LLMEngine(engine_config(tiny_models["llama"])), [[5, 6, 7]], params)[0]
    assert len(first.outputs) == 3
    assert [o.token_ids for o in first.outputs] == [o.token_ids for o in second.outputs]
    assert len({tuple(o.token_ids) for o in first.outputs}) > 1


@pytest.mark.parametrize("async_scheduling", ["off", "on"])
def test_stop_token_ids_end_generation(tiny_models: dict[str, Path], async_scheduling: str) -> None:
    engine = LLMEngine(engine_config(tiny_models["llama"], scheduler={"async_scheduling": async_scheduling}))
    free = run_engine(engine, [[9, 8, 7]], SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True))[0]
    stop_at = free.outputs[0].token_ids[3]
    first = free.outputs[0].token_ids.index(stop_at)
    out = run_engine(engine, [[9, 8, 7]], SamplingParams(temperature=0.0, max_tokens=10, stop_token_ids=[stop_at]))[0]
    assert out.outputs[0].token_ids == free.outputs[0].token_ids[: first + 1]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].stop_reason == stop_at


def _stream(engine: LLMEngine, prompt: str, params: SamplingParams) -> tuple[str, str, str | None]:
    """Streams one request. A replacement character may reach the stream only where the tokens'
    own decoding has one (bytes the model sampled that are no UTF-8), never for a partial character."""
    rid = engine.add_request(prompt, params)
    streamed = ""
    final = None
    while engine.has_unfinished():
        for out in engine.step():
            assert out.request_id == rid
            streamed += out.outputs[0].delta_text
            final = out
    assert final is not None and final.finished
    if "\ufffd" in streamed:
        assert streamed.count("\ufffd") == engine.tokenizer.decode(final.outputs[0].token_ids).count("\ufffd")
    return streamed, final.outputs[0].text, final.outputs[0].finish_reason


@pytest.mark.parametrize("mode", ["sync", "async"])
def test_stop_strings_cut_exactly_and_stream_equals_final_text(tokenizer_model: Path, mode: str) -> None:
    engine = LLMEngine(engine_config(tokenizer_model, scheduler={"async_scheduling": "on" if mode == "async" else "off"}))
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    streamed, text, _ = _stream(engine, "Once upon a time", params)
    assert streamed == text and len(text) > 10
    stop = text[len(text) // 2: len(text) // 2 + 3]
    cut = text[: text.index(stop)]
    streamed, stopped, reason = _stream(engine, "Once upon a time", params.replace(stop=["@@never@@", stop]))
    assert stopped == cut and streamed == cut and reason == "stop"


@pytest.mark.parametrize("text", ["北京是中国的首都。東京は日本の首都です。", "Rocket 🚀 party 🎉🎉 and 👩‍👩‍👧 family", "naïve café 😀 ü"])
def test_incremental_detokenizer_never_emits_broken_characters(default_model_dir: Path, text: str) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    prompt = tokenizer("Say:").input_ids
    ids = tokenizer(text, add_special_tokens=False).input_ids
    detok = IncrementalDetokenizer(tokenizer, prompt)
    pieces = [detok.add(t) for t in ids] + [detok.flush()]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) == tokenizer.decode(ids)
    assert any(p == "" for p in pieces)  # some tokens were partial characters and were held back


def test_engine_stream_of_cjk_and_emoji_equals_final_text(tokenizer_model: Path) -> None:
    engine = LLMEngine(engine_config(tokenizer_model))
    for seed in range(3):
        params = SamplingParams(temperature=1.0, seed=seed, max_tokens=30, ignore_eos=True, stop=["。"])
        streamed, text, _ = _stream(engine, "北京 🚀 東京 🎉", params)
        assert streamed == text
