"""The server against careless and hostile clients: bad text and ids, oversized bodies, internal errors,
API keys, a dead / stalled / loading engine, signals; /tokenize, /detokenize, /version, generation-config
defaults, chat_template_kwargs; and a randomized mix of valid, invalid, oversized and abandoned requests."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, Iterator

import httpx
import openai
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from server_utils import ServerThread, free_port, save_tiny_llama, wait_until

from conftest import ExitingSink, engine_config
from sagellm_core.chat import chat_prompt_ids
from sagellm_core.cli import build_parser
from sagellm_core.cli.serve_cmd import make_server, serve_config, server_settings
from sagellm_core.config import EngineConfig
from sagellm_core.errors import ConfigError, ModelLoadError
from sagellm_core.health import StallWatchdog
from sagellm_core.llm import LLM
from sagellm_core.sampling_params import SamplingParams
from sagellm_core.server import create_app, server_engine_config
from sagellm_core.server.middleware import key_matches
from sagellm_core.server.settings import ServerSettings

MODEL = "tiny"
MAX_WAITING = 40
BODY_LIMIT = 64 * 1024
TIMEOUT = 120.0
KEYS = ("key-one", "key-two")
MESSAGES = [{"role": "user", "content": "Say something."}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("hardening-model") / "llama", default_model_dir)


@pytest.fixture(scope="module")
def llm(model_dir: Path) -> Iterator[LLM]:
    config = EngineConfig.from_dict({
        "model": {"path": str(model_dir), "dtype": "float32"}, "backend": {"name": "cpu"},
        "kv_cache": {"block_size": 16, "num_blocks": 128},
        "scheduler": {"name": "fcfs", "max_waiting": MAX_WAITING, "async_scheduling": "off"},
    })
    engine = LLM(config=server_engine_config(config), stall_timeout_s=None)
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module")
def url(llm: LLM) -> Iterator[str]:
    app = create_app(llm, served_model_name=MODEL, settings=ServerSettings(max_request_bytes=BODY_LIMIT))
    with ServerThread(app) as base_url:
        yield base_url


@pytest.fixture(scope="module")
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=TIMEOUT)


def post(url: str, body: Any, path: str = "/v1/completions", **kwargs: Any) -> httpx.Response:
    if isinstance(body, (bytes, str)):
        return httpx.post(url + path, content=body, headers={"content-type": "application/json"}, timeout=TIMEOUT,
                          **kwargs)
    return httpx.post(url + path, json=body, timeout=TIMEOUT, **kwargs)


def error_of(response: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code
    return error


def wait_idle(llm: LLM) -> None:
    wait_until(lambda: not llm.engine.has_unfinished() and all(p.stats().used_blocks == 0
                                                               for p in llm.engine.kv_pools),
               TIMEOUT, what="the engine to go idle with every KV block released")


# ---- bad input is a 4xx naming the parameter ----------------------------------------------------------
def test_bad_text_ids_and_types_are_400(url: str, llm: LLM) -> None:
    surrogate = '{"prompt": "bad \\ud800 text", "max_tokens": 2}'
    assert "surrogate" in error_of(post(url, surrogate), 400)["message"]
    chat = '{"messages": [{"role": "user", "content": "x \\udfff"}], "max_tokens": 2}'
    assert error_of(post(url, chat, "/v1/chat/completions"), 400)["param"] == "messages"
    echo_bad = {"prompt": [1, llm.engine.vocab_size + 5], "echo": True, "max_tokens": 2}
    assert "token ids" in error_of(post(url, echo_bad), 400)["message"]
    for body, param in (({"prompt": "x", "n": True}, "n"), ({"prompt": "x", "max_tokens": "3"}, "max_tokens"),
                        ({"prompt": "x", "seed": 2**70}, "seed"), ({"prompt": "x", "stop_token_ids": ["a"]},
                                                                   "stop_token_ids"),
                        ('{"prompt": "x", "temperature": NaN}', "temperature"),
                        ('{"prompt": "x", "top_p": Infinity}', "top_p"),
                        ({"prompt": "x", "ignore_eos": 1}, "ignore_eos"),
                        ({"prompt": "x", "n": MAX_WAITING + 1}, "n")):
        error = error_of(post(url, body), 400)
        assert error["param"] == param or param in error["message"], (body, error)
    echoed = post(url, {"prompt": [1, 2, 3], "echo": True, "max_tokens": 2, "ignore_eos": True}).json()
    assert echoed["choices"][0]["text"].startswith(llm.tokenizer.decode([1, 2, 3]))
    wait_idle(llm)


def test_oversized_bodies_get_413_before_parsing(url: str, llm: LLM) -> None:
    big = json.dumps({"prompt": "x" * (BODY_LIMIT + 10)}).encode()
    assert "limit" in error_of(post(url, big), 413, "request_too_large")["message"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while it streams in
        for start in range(0, len(big), 8192):
            yield big[start:start + 8192]

    error_of(httpx.post(url + "/v1/completions", content=chunks(), timeout=TIMEOUT,
                        headers={"content-type": "application/json"}), 413)
    below = {"prompt": "word " * 200, "max_tokens": 2, "ignore_eos": True}
    assert post(url, below).json()["usage"]["completion_tokens"] == 2


def test_a_500_keeps_the_connection_and_hides_internals(url: str, llm: LLM, monkeypatch: pytest.MonkeyPatch,
                                                        caplog: pytest.LogCaptureFixture) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(llm.inputs, "process_chat", broken)
    port = int(url.rsplit(":", 1)[1])
    body = json.dumps({"messages": MESSAGES, "max_tokens": 2}).encode()
    request = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
               b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
    with caplog.at_level(logging.ERROR), socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) as sock:
        sock.sendall(request)
        first = _read_response(sock)
        sock.sendall(b"GET /version HTTP/1.1\r\nHost: x\r\n\r\n")  # the same connection still serves
        second = _read_response(sock)
    assert first.startswith(b"HTTP/1.1 500") and b"secret" not in first and b"RuntimeError" not in first
    assert b'"code":"internal_error"' in first
    assert second.startswith(b"HTTP/1.1 200") and b"version" in second
    logged = [record for record in caplog.records if record.exc_info]
    assert len(logged) == 1 and "secret internal detail" in str(logged[0].exc_info[1])


def _read_response(sock: socket.socket) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, rest = data.partition(b"\r\n\r\n")
    length = int(next(line.split(b":")[1] for line in head.split(b"\r\n") if line.lower().startswith(
        b"content-length")))
    while len(rest) < length:
        rest += sock.recv(65536)
    return head + b"\r\n\r\n" + rest


def test_templates_and_tokenization_run_in_the_input_pool(url: str, llm: LLM,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    threads = []
    process, process_chat = llm.inputs.process, llm.inputs.process_chat

    def recording(function: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            threads.append(threading.current_thread().name)
            return function(*args, **kwargs)
        return wrapper

    monkeypatch.setattr(llm.inputs, "process", recording(process))
    monkeypatch.setattr(llm.inputs, "process_chat", recording(process_chat))
    assert post(url, {"prompt": "Hi", "max_tokens": 1}).status_code == 200
    assert post(url, {"messages": MESSAGES, "max_tokens": 1}, "/v1/chat/completions").status_code == 200
    assert len(threads) >= 2 and all(name.startswith("sagellm-input") for name in threads)


# ---- API keys -------------------------------------------------------------------------------------------
def test_api_keys(llm: LLM) -> None:
    assert key_matches("key-two", KEYS) and not key_matches("key-three", KEYS) and not key_matches("", KEYS)
    app = create_app(llm, served_model_name=MODEL, settings=ServerSettings(api_keys=KEYS))
    with ServerThread(app) as base:
        for key in KEYS:
            api = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=TIMEOUT)
            assert api.completions.create(model=MODEL, prompt="Hi", max_tokens=2).usage.completion_tokens >= 1
        wrong = openai.OpenAI(base_url=base + "/v1", api_key="key-three", max_retries=0, timeout=TIMEOUT)
        with pytest.raises(openai.AuthenticationError):
            wrong.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=2)
        error_of(httpx.post(base + "/v1/completions", json={"prompt": "x"}, timeout=TIMEOUT), 401, "invalid_api_key")
        error_of(httpx.get(base + "/v1/models", headers={"Authorization": "Basic key-one"}), 401)
        error_of(httpx.post(base + "/tokenize", json={"prompt": "x"}), 401)
        assert httpx.get(base + "/health").status_code == 200 and httpx.get(base + "/metrics").status_code == 200
    guarded = create_app(llm, settings=ServerSettings(api_keys=KEYS, auth_health_metrics=True))
    with ServerThread(guarded, wait_healthy=False) as base:
        error_of(httpx.get(base + "/health"), 401)
        error_of(httpx.get(base + "/metrics"), 401)
        assert httpx.get(base + "/health", headers={"Authorization": "Bearer key-one"}).status_code == 200


def test_api_keys_from_options_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SAGELLM_API_KEY", "env-a, env-b")
    args = build_parser().parse_args(["serve", "some/model", "--max-request-bytes", "1000"])
    assert server_settings(args).api_keys == ("env-a", "env-b")
    assert serve_config(args).model.path == "some/model"
    args = build_parser().parse_args(["serve", "--api-key", "a", "--api-key", "b", "--generation-config", "vllm",
                                      "--drain-timeout", "5", "--model", "m"])
    settings_ = server_settings(args)
    assert settings_.api_keys == ("a", "b") and settings_.generation_config == "vllm"
    assert settings_.drain_timeout_s == 5 and serve_config(args).model.path == "m"
    with pytest.raises(ConfigError, match="two models"):
        serve_config(build_parser().parse_args(["serve", "one", "--model", "two"]))
    with pytest.raises(ConfigError, match="max_request_bytes"):
        ServerSettings(max_request_bytes=0)


# ---- /tokenize, /detokenize, /version, chat_template_kwargs, generation config -------------------------------
def test_tokenize_detokenize_version(url: str, llm: LLM) -> None:
    text = "Hello tokenizer"
    ids = list(llm.tokenizer(text).input_ids)
    out = post(url, {"prompt": text, "return_token_strs": True}, "/tokenize").json()
    assert out == {"count": len(ids), "max_model_len": llm.engine.max_model_len, "tokens": ids,
                   "token_strs": llm.tokenizer.convert_ids_to_tokens(ids)}
    chat = post(url, {"messages": MESSAGES}, "/tokenize").json()
    assert chat["tokens"] == chat_prompt_ids(llm.tokenizer, MESSAGES) and chat["token_strs"] is None
    long_text = "word " * 1000  # longer than the context: counted, not refused
    assert post(url, {"prompt": long_text}, "/tokenize").json()["count"] > llm.engine.max_model_len
    assert post(url, {"tokens": ids}, "/detokenize").json() == {"prompt": llm.tokenizer.decode(ids)}
    error_of(post(url, {"tokens": [llm.engine.vocab_size]}, "/detokenize"), 400)
    error_of(post(url, {"prompt": "x", "model": "other"}, "/tokenize"), 404)
    from sagellm_core import __version__

    assert httpx.get(url + "/version").json() == {"version": __version__}
    result = subprocess.run([sys.executable, "-m", "sagellm_core", "--version"], capture_output=True, text=True,
                            timeout=TIMEOUT)
    assert result.stdout.strip() == f"sagellm {__version__}"


def test_tokenize_without_a_tokenizer_is_a_400(url: str, llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(llm, "tokenizer", None)
    error_of(post(url, {"prompt": "x"}, "/tokenize"), 400)


def test_chat_template_kwargs_reach_the_template(client: openai.OpenAI, llm: LLM,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    template = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                "{% if enable_thinking %}<think> thinking on </think>{% endif %}assistant:")
    monkeypatch.setattr(llm.tokenizer, "chat_template", template)

    def prompt_tokens(**extra: Any) -> int:
        out = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1, **extra)
        return out.usage.prompt_tokens

    thinking = prompt_tokens(extra_body={"chat_template_kwargs": {"enable_thinking": True}})
    assert thinking > prompt_tokens()
    with pytest.raises(openai.BadRequestError, match="tokenize"):
        prompt_tokens(extra_body={"chat_template_kwargs": {"tokenize": True}})


def test_generation_config_defaults_apply_to_unset_fields(llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    from transformers import GenerationConfig

    monkeypatch.setattr(llm.engine.model, "generation_config",
                        GenerationConfig(max_new_tokens=3, repetition_penalty=1.1, top_k=5))
    app = create_app(llm, served_model_name=MODEL)
    assert app.state.server.sampling_defaults == {"max_tokens": 3, "repetition_penalty": 1.1, "top_k": 5}
    with ServerThread(app) as base:
        api = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=TIMEOUT)
        out = api.chat.completions.create(model=MODEL, messages=MESSAGES, extra_body={"ignore_eos": True})
        assert out.usage.completion_tokens == 3  # max_new_tokens as the default max_tokens
        out = api.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5,
                                          extra_body={"ignore_eos": True})
        assert out.usage.completion_tokens == 5  # the request's own value wins
    ignored = create_app(llm, served_model_name=MODEL, settings=ServerSettings(generation_config="vllm"))
    assert ignored.state.server.sampling_defaults == {}
    params = ignored.state.server
    from sagellm_core.server.protocol import ChatCompletionRequest

    body = ChatCompletionRequest.model_validate({"messages": MESSAGES})
    assert body.sampling_params(app.state.server.sampling_defaults).top_k == 5
    assert body.sampling_params(params.sampling_defaults).top_k == 0


# ---- a dead, stalled or loading engine ---------------------------------------------------------------------
def test_a_dead_engine_makes_health_and_requests_503(tokenizer_model: Path) -> None:
    llm = LLM(config=server_engine_config(engine_config(tokenizer_model)), stall_timeout_s=None)
    try:
        with ServerThread(create_app(llm, served_model_name=MODEL)) as base:
            llm.call(lambda engine: engine.metric_sinks.__setitem__("exiting", ExitingSink()))
            in_flight = post(base, {"prompt": "doomed", "max_tokens": 20})
            assert "SystemExit" in error_of(in_flight, 503, "engine_dead")["message"]
            error_of(httpx.get(base + "/health"), 503, "engine_dead")
            later = error_of(post(base, {"messages": MESSAGES}, "/v1/chat/completions"), 503, "engine_dead")
            assert "not running" in later["message"]
            assert httpx.get(base + "/metrics").status_code == 200  # still readable
    finally:
        llm.shutdown()


def test_a_stalled_engine_makes_health_503(url: str, llm: LLM, monkeypatch: pytest.MonkeyPatch) -> None:
    dog = StallWatchdog(5.0, clock=lambda: 0.0)
    monkeypatch.setattr(llm, "watchdog", dog)
    dog.observe(marker=-1, busy=True, now=0.0)
    dog.observe(marker=-1, busy=True, now=9.0)
    assert "no engine step" in error_of(httpx.get(url + "/health"), 503, "engine_stalled")["message"]
    dog.observe(marker=0, busy=True, now=10.0)
    assert httpx.get(url + "/health").status_code == 200


def test_the_port_answers_while_the_model_loads(llm: LLM) -> None:
    release = threading.Event()

    def load() -> LLM:
        assert release.wait(TIMEOUT)
        return llm

    with ServerThread(create_app(load, served_model_name=MODEL), wait_healthy=False) as base:
        error_of(httpx.get(base + "/health"), 503, "loading")
        error_of(httpx.post(base + "/v1/completions", json={"prompt": "x"}, timeout=TIMEOUT), 503, "loading")
        release.set()
        wait_until(lambda: httpx.get(base + "/health").status_code == 200, TIMEOUT, what="the model to load")
        assert httpx.post(base + "/v1/completions", json={"prompt": "x", "max_tokens": 1},
                          timeout=TIMEOUT).status_code == 200

    failures = []

    def fail() -> LLM:
        raise ModelLoadError("no such model")

    app = create_app(fail)
    app.state.server.on_load_error = failures.append
    with ServerThread(app, wait_healthy=False) as base:
        wait_until(lambda: failures, TIMEOUT, what="the load to fail")
        assert "no such model" in error_of(httpx.get(base + "/health"), 503, "load_failed")["message"]


def test_second_signal_forces_exit(llm: LLM) -> None:
    settings_ = ServerSettings(drain_timeout_s=7)
    server = make_server(create_app(llm), EngineConfig(), settings_, "warning")
    assert server.config.timeout_graceful_shutdown == 7
    server.handle_exit(signal.SIGTERM, None)
    assert server.should_exit and not server.force_exit
    server.handle_exit(signal.SIGTERM, None)
    assert server.force_exit


def test_serve_positional_model_binds_logs_a_summary_and_drains_on_sigterm(model_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    log_path = tmp_path / "serve.log"
    command = [sys.executable, "-m", "sagellm_core", "serve", str(model_dir), "--port", str(port), "--backend",
               "cpu", "--num-kv-blocks", "64", "--served-model-name", MODEL]
    with open(log_path, "w") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT,
                                   env={**os.environ, "SAGELLM_API_KEY": ""})
    try:
        statuses = []

        def healthy() -> bool:
            try:
                response = httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
            except httpx.HTTPError:
                return process.poll() is not None  # stop waiting if it died
            statuses.append(response.status_code if response.status_code == 200 else response.json()["error"]["code"])
            return response.status_code == 200

        wait_until(healthy, 300, interval=0.1, what="`sagellm serve` to become healthy")
        assert process.poll() is None, log_path.read_text()
        assert set(statuses) <= {"loading", 200}
        out = httpx.post(f"http://127.0.0.1:{port}/v1/completions", json={"model": MODEL, "prompt": "Hi",
                                                                          "max_tokens": 2}, timeout=TIMEOUT)
        assert out.status_code == 200
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=TIMEOUT)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    log = log_path.read_text()
    assert "serving 'llama' as 'tiny'" in log and "KV cache 64 blocks" in log and "max model length 512" in log
    assert f"http://127.0.0.1:{port}" in log and "draining" in log


# ---- randomized: valid, invalid, oversized and abandoned requests at once -----------------------------------
REQUEST = st.one_of(
    st.tuples(st.just("valid"), st.integers(1, 6), st.booleans(), st.sampled_from(["completion", "chat"])),
    st.tuples(st.just("invalid"), st.sampled_from(
        [{"temperature": -1}, {"n": True}, {"seed": "x"}, {"stop_token_ids": ["a"]}, {"prompt": "x \ud800"},
         {"prompt": [10**9]}]), st.booleans(), st.just("completion")),
    st.tuples(st.just("oversized"), st.sampled_from(["body", "prompt"]), st.booleans(), st.just("completion")),
    st.tuples(st.just("disconnect"), st.integers(50, 200), st.just(True), st.sampled_from(["completion", "chat"])),
)


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(requests=st.lists(REQUEST, min_size=2, max_size=10))
def test_random_mix_of_good_bad_big_and_abandoned_requests(url: str, llm: LLM, requests: list[tuple]) -> None:
    wait_idle(llm)
    broken: list[str] = []
    step = llm.engine.step

    def checked_step() -> list:
        outputs = step()
        try:
            for pool in llm.engine.kv_pools:
                pool.check_invariants()
        except AssertionError as exc:
            broken.append(str(exc))
        return outputs

    llm.engine.step = checked_step  # type: ignore[method-assign]
    try:
        results = asyncio.run(_send_all(url, requests))
    finally:
        del llm.engine.step
    for (kind, detail, _, _), result in zip(requests, results):
        if kind == "valid":
            assert result == ("ok", detail), (kind, detail, result)
        elif kind == "invalid":
            assert result == ("status", 400), (kind, detail, result)
        elif kind == "oversized":
            assert result == ("status", 413 if detail == "body" else 400), (kind, detail, result)
        else:
            assert result == ("abandoned", None)
    wait_idle(llm)
    assert not broken, broken
    assert all(pool.stats().used_blocks == 0 for pool in llm.engine.kv_pools)


async def _send_all(url: str, requests: list[tuple]) -> list[tuple[str, Any]]:
    async with httpx.AsyncClient(base_url=url, timeout=TIMEOUT) as http:
        return await asyncio.gather(*(_send(http, *request) for request in requests))


async def _send(http: httpx.AsyncClient, kind: str, detail: Any, stream: bool, endpoint: str) -> tuple[str, Any]:
    path = "/v1/completions" if endpoint == "completion" else "/v1/chat/completions"
    body: dict[str, Any] = {"prompt": "Tell me"} if endpoint == "completion" else {"messages": MESSAGES}
    body.update({"ignore_eos": True, "max_tokens": 4})
    if kind == "valid":
        body["max_tokens"] = detail
    elif kind == "invalid":
        body.update(detail)
    elif kind == "oversized":
        body["prompt"] = "x" * (BODY_LIMIT + 1) if detail == "body" else "word " * 600
    elif kind == "disconnect":
        body["max_tokens"] = detail
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    content = json.dumps(body, ensure_ascii=True).encode()
    headers = {"content-type": "application/json"}
    if not stream:
        response = await http.post(path, content=content, headers=headers)
        if response.status_code != 200:
            return "status", response.status_code
        return "ok", response.json()["usage"]["completion_tokens"]
    async with http.stream("POST", path, content=content, headers=headers) as response:
        if response.status_code != 200:
            return "status", response.status_code
        usage = None
        async for line in response.aiter_lines():
            if kind == "disconnect" and line.startswith("data: "):
                return "abandoned", None  # leaves the block: the connection closes mid-stream
            if line.startswith("data: {"):
                usage = json.loads(line[6:]).get("usage") or usage
        return "ok", usage["completion_tokens"] if usage else None
