"""Library API: LLM generate / stream (sync and async) / abort / stats, bad input, plugins that raise."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import engine_config, run_engine
from sagellm_core.engine import LLMEngine
from sagellm_core.errors import InvalidRequestError, ModelLoadError, PromptTooLongError
from sagellm_core.llm import LLM
from sagellm_core.plugin_manager import create_plugin_manager
from sagellm_core.sampling_params import SamplingParams


@pytest.fixture(scope="module", params=["off", "on"], ids=["sync", "async"])
def llm(tokenizer_model: Path, request: pytest.FixtureRequest):
    """The library API over a synchronous and an async-scheduling engine (the CUDA default)."""
    with LLM(config=engine_config(tokenizer_model, scheduler={"async_scheduling": request.param})) as engine:
        yield engine


def test_generate_many_prompts_in_order(llm: LLM) -> None:
    prompts = ["Hello", "Bonjour tout le monde", "1 2 3"]
    outs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    assert [o.prompt for o in outs] == prompts
    assert all(len(o.outputs[0].token_ids) == 6 and o.finished for o in outs)


def test_sync_and_async_streams_agree(llm: LLM) -> None:
    params = SamplingParams(temperature=0.7, seed=3, max_tokens=12, ignore_eos=True)
    sync_text = "".join(o.outputs[0].delta_text for o in llm.generate_stream("Tell me", params))

    async def collect() -> tuple[str, str]:
        streamed = ""
        async for out in llm.generate_stream("Tell me", params):
            streamed += out.outputs[0].delta_text
        final = await llm.generate_async("Tell me", params)
        return streamed, final.outputs[0].text

    async_text, final_text = asyncio.run(collect())
    assert sync_text == async_text == final_text


def test_abort_frees_blocks_and_reports_abort(llm: LLM) -> None:
    stream = llm.generate_stream("Abort me", SamplingParams(max_tokens=200, ignore_eos=True))
    outputs = iter(stream)
    next(outputs)
    llm.abort(stream.request_id)
    last = list(outputs)[-1]
    assert last.finished and last.outputs[0].finish_reason == "abort"
    assert len(last.outputs[0].token_ids) < 200


def test_bad_requests_fail_alone_and_the_engine_keeps_serving(llm: LLM) -> None:
    with pytest.raises(InvalidRequestError):
        list(llm.generate_stream("", SamplingParams()))
    with pytest.raises(PromptTooLongError):
        list(llm.generate_stream(list(range(1, 300)), SamplingParams()))
    with pytest.raises(InvalidRequestError):
        list(llm.generate_stream([10**9], SamplingParams()))
    with pytest.raises(InvalidRequestError):
        SamplingParams(temperature=-1)
    ok = llm.generate("still alive", SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)[0]
    assert len(ok.outputs[0].token_ids) == 3
    stats = llm.get_stats()
    assert stats["kv_pools"][0].used_blocks == 0
    assert stats["latency"]["ttft"]["mean"] > 0 and stats["throughput"]["output_tokens"] > 0


def test_unknown_and_corrupt_models_raise_model_load_error(tmp_path: Path, tiny_models: dict[str, Path]) -> None:
    with pytest.raises(ModelLoadError, match="not found"):
        LLMEngine(engine_config(tmp_path / "missing"))
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text((tiny_models["llama"] / "config.json").read_text())
    (corrupt / "model.safetensors").write_bytes(b"\x00garbage" * 100)
    with pytest.raises(ModelLoadError, match="cannot load model weights"):
        LLMEngine(engine_config(corrupt))


class _ExplodingSink:
    def __init__(self, config: object = None) -> None:
        pass

    def on_step(self, event: object) -> None:
        raise RuntimeError("boom")

    def on_request_finished(self, event: object) -> None:
        pass

    def snapshot(self) -> dict:
        return {}


class _ExplodingMetricPlugin:
    from sagellm_core.hookspecs import hookimpl

    @staticmethod
    @hookimpl
    def sagellm_register_metrics(register):  # noqa: ANN001, ANN205
        register("exploding", _ExplodingSink)


def test_a_metric_plugin_that_raises_is_dropped_not_fatal(tiny_models: dict[str, Path]) -> None:
    manager = create_plugin_manager(entry_points=False, extra={"exploding": _ExplodingMetricPlugin})
    config = engine_config(tiny_models["llama"], metrics={"enabled": ["latency", "exploding"]})
    engine = LLMEngine(config, plugin_manager=manager)
    out = run_engine(engine, [[1, 2, 3]], SamplingParams(max_tokens=4, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 4
    assert "exploding" not in engine.metric_sinks and "latency" in engine.metric_sinks


def test_unknown_scheduler_and_bad_plugin_options_are_config_errors(tiny_models: dict[str, Path]) -> None:
    from sagellm_core.errors import ConfigError, PluginError

    with pytest.raises(PluginError, match="unknown scheduler 'nope'"):
        LLMEngine(engine_config(tiny_models["llama"], scheduler={"name": "nope"}))
    with pytest.raises(ConfigError, match=r"scheduler.options.mode: must be one of"):
        LLMEngine(engine_config(tiny_models["llama"], scheduler={"name": "pd", "options": {"mode": "x"}}))


def test_priority_scheduler_runs_urgent_requests_first(tiny_models: dict[str, Path]) -> None:
    engine = LLMEngine(engine_config(tiny_models["llama"], scheduler={"name": "priority", "max_num_seqs": 1}))
    params = SamplingParams(max_tokens=2, ignore_eos=True)
    order = []
    for rid, priority in (("low", 5), ("high", 0), ("mid", 2)):
        engine.add_request([1, 2, 3], params, request_id=rid, priority=priority)
    while engine.has_unfinished():
        order += [o.request_id for o in engine.step() if o.finished]
    assert order == ["high", "mid", "low"]


@pytest.mark.slow
def test_cli_generate_answers_paris_with_the_default_model() -> None:
    result = subprocess.run([sys.executable, "-m", "sagellm_core", "generate", "What is the capital of France?",
                             "--max-tokens", "32"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
    assert "TTFT" in result.stderr and "tok/s" in result.stderr


def test_call_runs_on_the_engine_thread_and_propagates_errors(llm: LLM) -> None:
    import threading

    name, vocab = llm.call(lambda engine: (threading.current_thread().name, engine.vocab_size))
    assert name == "sagellm-engine" and vocab == llm.engine.vocab_size
    with pytest.raises(ZeroDivisionError):
        llm.call(lambda engine: 1 / 0)
    assert llm.generate("after", SamplingParams(max_tokens=2, ignore_eos=True), use_tqdm=False)[0].finished
