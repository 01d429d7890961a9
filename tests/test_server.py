"""The OpenAI-compatible server over loopback: the official `openai` client, raw SSE, disconnects
(abort + KV freed), 64 concurrent streams, Prometheus metrics, and OpenAI-shaped errors; against the
engine in the server's process (synchronous and with async scheduling) and in a process of its own
(`sagellm serve`'s default)."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path
from typing import Any, Iterator

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_utils import ServerThread, save_tiny_llama, wait_until

from sagellm_core.chat import chat_prompt_ids
from sagellm_core.cli import build_parser
from sagellm_core.cli.serve_cmd import serve_config, serve_topology
from sagellm_core.config import EngineConfig
from sagellm_core.errors import ConfigError
from sagellm_core.engine.client import EngineClient
from sagellm_core.llm import LLM
from sagellm_core.server import create_app, server_engine_config
from sagellm_core.server.processes import EngineLauncher, ServeTopology

MODEL = "tiny-llama"
MAX_WAITING = 100
TIMEOUT = 120.0
NO_EOS = {"ignore_eos": True}
MESSAGES = [{"role": "user", "content": "Say something."}]


# ---- fixtures -------------------------------------------------------------------------------------
Engine = LLM | EngineClient


@pytest.fixture(scope="module", params=["off", "on", "process"], ids=["sync", "async", "engine-process"])
def llm(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path, request: pytest.FixtureRequest
        ) -> Iterator[Engine]:
    """The served engine: in this process, synchronous and with async scheduling (the CUDA default),
    and in an engine process of its own behind an `EngineClient`."""
    model_dir = save_tiny_llama(tmp_path_factory.mktemp("server-model") / "llama", default_model_dir)
    config = server_engine_config(EngineConfig.from_dict({
        "model": {"path": str(model_dir), "dtype": "float32"},
        "backend": {"name": "cpu"},
        "kv_cache": {"block_size": 16, "num_blocks": 256},
        "scheduler": {"name": "fcfs", "max_waiting": MAX_WAITING,
                      "async_scheduling": "off" if request.param == "process" else request.param},
    }))
    engine: Engine
    if request.param == "process":
        launcher = EngineLauncher(config, ServeTopology())
        launcher.start()
        engine = launcher.client(0, input_workers=2, stall_timeout_s=120.0, owns_engines=True)
    else:
        engine = LLM(config=config)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def url(llm: Engine) -> Iterator[str]:
    with ServerThread(create_app(llm, served_model_name=MODEL)) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=TIMEOUT)


# ---- helpers --------------------------------------------------------------------------------------
def idle(llm: Engine) -> bool:
    """No request in the engine and no KV block referenced (cached free blocks may remain)."""
    if isinstance(llm, LLM):
        return not llm.engine.has_unfinished() and all(p.stats().used_blocks == 0 for p in llm.engine.kv_pools)
    stats = llm.get_stats()
    return stats["num_running"] == stats["num_waiting"] == 0 and all(p.used_blocks == 0 for p in stats["kv_pools"])


def wait_idle(llm: Engine) -> None:
    wait_until(lambda: idle(llm), TIMEOUT, what="the engine to go idle with every KV block released")


def sink_value(llm: Engine, key: str) -> float:
    if isinstance(llm, LLM):
        return llm.engine.metric_sinks["prometheus"].snapshot().get(key, 0.0)
    return llm.get_stats()["prometheus"].get(key, 0.0)


ABORTED = 'request_finished_total{finish_reason="abort"}'


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    if code is not None:
        assert error["code"] == code
    return error


def sse_payloads(lines: list[str]) -> list[str]:
    return [line.removeprefix("data: ") for line in lines if line.startswith("data: ")]


# ---- basic endpoints --------------------------------------------------------------------------------
def test_models_and_health(url: str, client: openai.OpenAI) -> None:
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL
    assert httpx.get(url + "/health").json() == {"status": "ok"}


def test_completion_shapes_and_usage(client: openai.OpenAI, llm: Engine) -> None:
    prompt = "The capital of France is"
    out = client.completions.create(model=MODEL, prompt=prompt, max_tokens=5, extra_body=NO_EOS)
    assert out.object == "text_completion" and out.id.startswith("cmpl-") and out.model == MODEL
    [choice] = out.choices
    assert choice.index == 0 and choice.finish_reason == "length" and isinstance(choice.text, str)
    prompt_len = len(llm.tokenizer(prompt).input_ids)
    assert (out.usage.prompt_tokens, out.usage.completion_tokens, out.usage.total_tokens) == (
        prompt_len, 5, prompt_len + 5)

    ids = [1, 2, 3, 4, 5, 6, 7]
    by_ids = client.completions.create(model=MODEL, prompt=ids, max_tokens=3, extra_body=NO_EOS)
    assert by_ids.usage.prompt_tokens == len(ids) and by_ids.usage.completion_tokens == 3

    batch = client.completions.create(model=MODEL, prompt=["One", "Two three"], n=2, max_tokens=2,
                                      temperature=1.0, extra_body=NO_EOS)
    assert sorted(c.index for c in batch.choices) == [0, 1, 2, 3]
    assert batch.usage.completion_tokens == 8

    echoed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, echo=True, extra_body=NO_EOS)
    assert echoed.choices[0].text.startswith(prompt) and len(echoed.choices[0].text) > len(prompt)
    streamed = client.completions.create(model=MODEL, prompt=prompt, max_tokens=3, echo=True, stream=True,
                                         extra_body=NO_EOS)
    assert "".join(c.choices[0].text for c in streamed).startswith(prompt)


def test_chat_streaming_matches_non_streaming(client: openai.OpenAI, llm: Engine) -> None:
    kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0.8, seed=7, extra_body=NO_EOS)
    full = client.chat.completions.create(**kwargs)
    assert full.object == "chat.completion" and full.id.startswith("chatcmpl-")
    [choice] = full.choices
    assert choice.message.role == "assistant" and choice.finish_reason == "length"
    assert full.usage.prompt_tokens == len(chat_prompt_ids(llm.tokenizer, MESSAGES))
    assert full.usage.completion_tokens == 12
    parts = [{"role": "user", "content": [{"type": "text", "text": "Say "}, {"type": "text", "text": "something."}]}]
    as_parts = client.chat.completions.create(model=MODEL, messages=parts, max_tokens=1)
    assert as_parts.usage.prompt_tokens == full.usage.prompt_tokens

    chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **kwargs))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    content = [c for c in chunks if c.choices]
    assert content[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in content) == choice.message.content
    assert [c.choices[0].finish_reason for c in content if c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 12
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_completion_streaming_matches_non_streaming_with_seed(client: openai.OpenAI) -> None:
    def text(seed: int, stream: bool) -> str:
        kwargs = dict(model=MODEL, prompt="The quick brown fox", max_tokens=24, temperature=0.8, seed=seed,
                      extra_body=NO_EOS)
        if not stream:
            return client.completions.create(**kwargs).choices[0].text
        return "".join(c.choices[0].text for c in client.completions.create(stream=True, **kwargs))

    first = text(1234, stream=False)
    assert text(1234, stream=True) == first
    assert text(4321, stream=False) != first  # the seed reaches the sampler


def test_n_choices(client: openai.OpenAI) -> None:
    out = client.completions.create(model=MODEL, prompt="Hello", n=3, max_tokens=6, temperature=1.0, seed=3,
                                    extra_body=NO_EOS)
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    assert out.usage.completion_tokens == 18
    assert len({c.text for c in out.choices}) > 1  # seed + index: the samples differ

    texts: dict[int, str] = {0: "", 1: ""}
    finishes: dict[int, list[str]] = {0: [], 1: []}
    for chunk in client.chat.completions.create(model=MODEL, messages=MESSAGES, n=2, max_tokens=5, stream=True,
                                                temperature=1.0, extra_body=NO_EOS):
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                finishes[choice.index].append(choice.finish_reason)
    assert finishes == {0: ["length"], 1: ["length"]}
    assert texts[0] != texts[1]

    batch_finishes: dict[int, list[str]] = {}
    for chunk in client.completions.create(model=MODEL, prompt=["First", "Second prompt"], n=2, max_tokens=4,
                                           stream=True, extra_body=NO_EOS):
        for choice in chunk.choices:
            if choice.finish_reason:
                batch_finishes.setdefault(choice.index, []).append(choice.finish_reason)
    assert batch_finishes == {i: ["length"] for i in range(4)}


def test_stop_strings(client: openai.OpenAI) -> None:
    kwargs = dict(model=MODEL, prompt="Once upon a time", max_tokens=16, temperature=0.8, seed=11,
                  extra_body=NO_EOS)
    reference = client.completions.create(logprobs=0, **kwargs).choices[0]
    tokens = reference.logprobs.tokens
    stop = next(t for t in tokens[2:] if t.strip())
    expected = reference.text[: reference.text.index(stop)]

    stopped = client.completions.create(stop=[stop], **kwargs).choices[0]
    assert stopped.finish_reason == "stop" and stopped.text == expected
    streamed = list(client.completions.create(stop=stop, stream=True, **kwargs))
    assert "".join(c.choices[0].text for c in streamed) == expected
    assert streamed[-1].choices[0].finish_reason == "stop"


def test_logprobs(client: openai.OpenAI) -> None:
    out = client.completions.create(model=MODEL, prompt="Hi", max_tokens=4, logprobs=3, extra_body=NO_EOS)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 4
    assert all(v <= 0 for v in lp.token_logprobs) and all(len(top) <= 3 and top for top in lp.top_logprobs)
    assert lp.text_offset == sorted(lp.text_offset)

    chat = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, logprobs=True,
                                          top_logprobs=2, extra_body=NO_EOS)
    content = chat.choices[0].logprobs.content
    assert len(content) == 4 and all(len(entry.top_logprobs) == 2 for entry in content)
    assert all(entry.logprob <= 0 and entry.bytes == list(entry.token.encode()) for entry in content)


def test_sse_wire_format(url: str) -> None:
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 3, "stream": True, "ignore_eos": True,
            "stream_options": {"include_usage": True}}
    with httpx.stream("POST", url + "/v1/completions", json=body, timeout=TIMEOUT) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        raw = response.read().decode()
    events = raw.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    payloads = [json.loads(e.removeprefix("data: ")) for e in events[:-2]]
    assert all(e.startswith("data: ") for e in events[:-1])
    assert payloads[-1]["choices"] == [] and payloads[-1]["usage"]["completion_tokens"] == 3
    assert all(p["usage"] is None for p in payloads[:-1])


# ---- load, disconnects, KV accounting --------------------------------------------------------------
def test_64_concurrent_streams_release_kv(url: str, llm: Engine) -> None:
    clients = 64
    prompt_len = len(chat_prompt_ids(llm.tokenizer, MESSAGES))

    async def one(api: openai.AsyncOpenAI, index: int) -> tuple[int, int, str | None, Any]:
        stream = await api.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=8, stream=True, temperature=1.0, seed=index,
            logprobs=True, stream_options={"include_usage": True}, extra_body=NO_EOS)
        tokens, finish, usage = 0, None, None
        async for chunk in stream:
            for choice in chunk.choices:
                tokens += len(choice.logprobs.content) if choice.logprobs else 0
                finish = choice.finish_reason or finish
            usage = chunk.usage or usage
        return index, tokens, finish, usage

    async def run_all() -> list[tuple[int, int, str | None, Any]]:
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=TIMEOUT) as api:
            return await asyncio.gather(*(one(api, i) for i in range(clients)))

    results = asyncio.run(run_all())
    assert len(results) == clients
    for _, tokens, finish, usage in results:
        assert finish == "length" and tokens == 8
        assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (prompt_len, 8, prompt_len + 8)
    wait_idle(llm)
    assert idle(llm)


def test_streaming_client_disconnect_aborts_and_frees_kv(url: str, llm: Engine,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """In this process, deterministic: the engine is held after the request's first tokens until the
    server asked to abort it, so the request is still running when the client hangs up, whatever the
    machine's speed. The engine process cannot be held: there the request asks for the whole context."""
    if isinstance(llm, EngineClient):
        return _disconnect_aborts_engine_process_request(url, llm)
    wait_idle(llm)
    aborted = sink_value(llm, ABORTED)
    released, abort_asked = threading.Event(), threading.Event()
    step, abort = llm.engine.step, llm.abort
    produced = []

    def held_step() -> list:
        if produced:
            released.wait(TIMEOUT)
        outputs = step()
        produced.extend(o for o in outputs if o.outputs[0].token_ids)
        return outputs

    def recorded_abort(request_id: str) -> None:
        abort(request_id)
        abort_asked.set()

    monkeypatch.setattr(llm.engine, "step", held_step)
    monkeypatch.setattr(llm, "abort", recorded_abort)
    body = {"model": MODEL, "prompt": "Tell me a long story", "max_tokens": 500, "stream": True, "ignore_eos": True}
    try:
        with httpx.Client(timeout=TIMEOUT) as http:
            with http.stream("POST", url + "/v1/completions", json=body) as response:
                assert response.status_code == 200
                first = next(response.iter_lines())
                assert first.startswith("data: ")
                assert llm.engine.has_unfinished()  # held: still generating when we hang up
        assert abort_asked.wait(TIMEOUT), "the server never aborted the request"
    finally:
        released.set()
    wait_until(lambda: sink_value(llm, ABORTED) == aborted + 1, TIMEOUT, what="the request to be aborted")
    wait_idle(llm)
    assert len(produced[-1].outputs[0].token_ids) < 500


def _disconnect_aborts_engine_process_request(url: str, llm: EngineClient) -> None:
    wait_idle(llm)
    aborted = sink_value(llm, ABORTED)
    body = {"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 500, "stream": True, "ignore_eos": True}
    with httpx.Client(timeout=TIMEOUT) as http:
        with http.stream("POST", url + "/v1/completions", json=body) as response:
            assert response.status_code == 200
            assert next(response.iter_lines()).startswith("data: ")
    wait_until(lambda: sink_value(llm, ABORTED) == aborted + 1, TIMEOUT, what="the request to be aborted")
    wait_idle(llm)


def test_non_streaming_client_disconnect_aborts(url: str, llm: Engine) -> None:
    wait_idle(llm)
    aborted = sink_value(llm, ABORTED)
    body = {"model": MODEL, "prompt": "Tell me a long story", "max_tokens": 500, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(url + "/v1/completions", json=body, timeout=httpx.Timeout(TIMEOUT, read=0.5))
    wait_until(lambda: sink_value(llm, ABORTED) == aborted + 1, TIMEOUT, what="the request to be aborted")
    wait_idle(llm)


# ---- metrics ----------------------------------------------------------------------------------------
def scrape(url: str) -> dict[str, float]:
    response = httpx.get(url + "/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    values = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = ",".join(f"{k}={v}" for k, v in sorted(sample.labels.items()))
            values[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return values


def test_metrics_endpoint_counts_requests(url: str, client: openai.OpenAI, llm: Engine) -> None:
    client.completions.create(model=MODEL, prompt="Warm", max_tokens=2, extra_body=NO_EOS)  # gauges get labels
    wait_idle(llm)
    before = scrape(url)
    for name in ("sagellm_time_to_first_token_seconds_count", "sagellm_inter_token_latency_seconds_count",
                 "sagellm_time_per_output_token_seconds_count", "sagellm_e2e_request_latency_seconds_count",
                 "sagellm_num_requests_waiting", "sagellm_kv_cache_usage_ratio{pool=0}",
                 "sagellm_prefix_cache_hit_rate{pool=0}", "sagellm_num_preemptions_total"):
        assert name in before, name
    out = client.completions.create(model=MODEL, prompt="Count me", max_tokens=5, extra_body=NO_EOS)
    after = scrape(url)

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    assert delta("sagellm_generation_tokens_total") == 5
    assert delta("sagellm_prompt_tokens_total") == out.usage.prompt_tokens
    assert delta("sagellm_request_finished_total{finish_reason=length}") == 1
    assert delta("sagellm_time_to_first_token_seconds_count") == 1
    assert delta("sagellm_inter_token_latency_seconds_count") == 4
    assert after["sagellm_num_requests_running"] == 0


# ---- errors -----------------------------------------------------------------------------------------
def test_bad_requests_get_openai_errors_and_server_keeps_serving(url: str, client: openai.OpenAI,
                                                                 llm: Engine) -> None:
    completions = url + "/v1/completions"

    def post(body: dict[str, Any], path: str = completions) -> httpx.Response:
        return httpx.post(path, json=body, timeout=TIMEOUT)

    malformed = httpx.post(completions, content=b'{"prompt": "x",', timeout=TIMEOUT,
                           headers={"content-type": "application/json"})
    assert "JSON" in assert_error(malformed, 400)["message"]
    assert assert_error(post({"model": MODEL}), 400)["param"] == "prompt"
    assert "Unrecognized" in assert_error(post({"prompt": "x", "max_tokenz": 3}), 400)["message"]
    assert assert_error(post({"model": "nope", "prompt": "x"}), 404, "model_not_found")["param"] == "model"
    assert "temperature" in assert_error(post({"prompt": "x", "temperature": -1}), 400)["message"]
    assert "temperature" in assert_error(post({"prompt": "x", "temperature": -1, "stream": True}), 400)["message"]
    assert_error(post({"messages": []}, url + "/v1/chat/completions"), 400)
    assert_error(httpx.get(url + "/v1/nothing-here"), 404)

    too_long = list(range(1, 601))
    for body in ({"prompt": too_long}, {"prompt": too_long, "stream": True}):
        error = assert_error(post(body), 400, "context_length_exceeded")
        assert "maximum context length" in error["message"]
    never_fits = post({"prompt": "x", "n": MAX_WAITING + 1, "max_tokens": 1})
    assert assert_error(never_fits, 400)["param"] == "n"  # can never be queued: not "retry later"

    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "word " * 600}])
    with pytest.raises(openai.BadRequestError, match="temperature"):
        client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=-1)

    out = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3, extra_body=NO_EOS)
    assert out.usage.completion_tokens == 3
    wait_idle(llm)


def test_serve_command_options() -> None:
    args = build_parser().parse_args(["serve", "--port", "9001", "--host", "0.0.0.0", "--max-waiting", "7",
                                      "--served-model-name", "m", "--num-kv-blocks", "64"])
    config = serve_config(args)
    assert (config.server.host, config.server.port, config.server.served_model_name) == ("0.0.0.0", 9001, "m")
    assert config.scheduler.max_waiting == 7 and config.kv_cache.num_blocks == 64
    assert config.metrics.enabled[-1] == "prometheus"
    assert server_engine_config(config) is config  # already enabled: unchanged
    assert serve_topology(args, config, device_type="cpu").describe() == {
        "engine_process": True, "api_server_count": 1, "api_server_count_source": "derived", "data_parallel_size": 1}


def test_api_server_count_is_derived_from_the_backend_and_cores() -> None:
    """Unset: 2 front ends per engine process on an accelerator as the cores allow, 1 on the CPU backend
    and without the engine process; an explicit count always wins."""
    from sagellm_core.server.frontends import backend_device_type, derived_frontends, resolve_frontends, usable_cores

    config = serve_config(build_parser().parse_args(["serve"]))
    assert derived_frontends("cuda", 1, 16).count == 2
    assert derived_frontends("cuda", 4, 64).count == 8
    assert derived_frontends("cuda", 4, 8).count == 3  # 8 cores less 4 engines less 1 reserved
    assert derived_frontends("cuda", 1, 2).count == 1
    assert derived_frontends("cpu", 1, 64).count == 1
    assert resolve_frontends(None, config, engine_process=False, device_type="cuda", cores=16).count == 1
    derived = resolve_frontends(None, config, engine_process=True, device_type="npu", cores=16)
    assert (derived.count, derived.source) == (2, "derived")
    explicit = resolve_frontends(3, config, engine_process=True, device_type="cpu", cores=2)
    assert (explicit.count, explicit.source) == (3, "option")
    args = build_parser().parse_args(["serve"])
    topology = serve_topology(args, config, device_type="cuda")
    assert topology.api_server_count == (2 if usable_cores() >= 4 else 1)
    assert topology.describe()["api_server_count_source"] == "derived"
    probed = backend_device_type(config)  # this host's backend, probed without device work
    assert serve_topology(args, config).api_server_count == derived_frontends(probed, 1, usable_cores()).count
    dp_args = build_parser().parse_args(["serve", "--data-parallel-size", "2"])
    assert serve_topology(dp_args, serve_config(dp_args), device_type="cuda").api_server_count == min(
        4, max(1, usable_cores() - 3))


def test_serve_reaches_every_config_field() -> None:
    args = build_parser().parse_args([
        "serve", "--max-num-seqs", "512", "--max-num-batched-tokens", "16384", "--data-parallel-size", "2",
        "--api-server-count", "3", "--set", "scheduler.async_scheduling=off", "--set", "kv_cache.memory_utilization=0.5",
        "--set", "scheduler.options.mode=hybrid", "--scheduler", "pd", "--set", "backend.cuda_graphs=false"])
    config = serve_config(args)
    assert (config.scheduler.max_num_seqs, config.scheduler.max_num_batched_tokens) == (512, 16384)
    assert config.scheduler.async_scheduling == "off" and config.kv_cache.memory_utilization == 0.5
    assert config.scheduler.options == {"mode": "hybrid"} and config.backend.cuda_graphs is False
    assert serve_topology(args, config).describe() == {"engine_process": True, "api_server_count": 3,
                                                       "api_server_count_source": "option",
                                                       "data_parallel_size": 2}
    with pytest.raises(ConfigError, match="kv_cache.nope: unknown key"):
        serve_config(build_parser().parse_args(["serve", "--set", "kv_cache.nope=1"]))
    with pytest.raises(ConfigError, match="SECTION.FIELD=VALUE"):
        serve_config(build_parser().parse_args(["serve", "--set", "scheduler=1"]))
    with pytest.raises(ConfigError, match="need the engine process"):
        serve_topology(build_parser().parse_args(["serve", "--no-engine-process", "--api-server-count", "2"]),
                       config)
