"""Tool calls end to end through the official `openai` client: a tiny random Llama with the default
model's tokenizer and the Hermes/Qwen or Llama-3 chat template stored in tests/fixtures, with
``tool_choice`` required or a named function (forced through the structured-output path), streaming
and not; ``auto`` with no call; errors naming the field."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import httpx
import jsonschema
import openai
import pytest
from server_utils import ServerThread, save_tiny_llama

from sagellm_core.config import EngineConfig
from sagellm_core.llm import LLM
from sagellm_core.server import create_app, server_engine_config

TEMPLATES = Path(__file__).parent / "fixtures" / "chat_templates"
TIMEOUT = 600.0
MODEL = "tiny"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"hour24": {"type": "boolean"}},
                                       "required": ["hour24"], "additionalProperties": False}}}
TOOLS = [WEATHER, TIME]
SCHEMAS = {tool["function"]["name"]: tool["function"]["parameters"] for tool in TOOLS}
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def llm(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> Iterator[LLM]:
    model_dir = save_tiny_llama(tmp_path_factory.mktemp("tools-model") / "llama", default_model_dir)
    config = EngineConfig.from_dict({"model": {"path": str(model_dir), "dtype": "float32"},
                                     "backend": {"name": "cpu"}, "kv_cache": {"block_size": 16, "num_blocks": 256}})
    engine = LLM(config=server_engine_config(config))
    yield engine
    engine.shutdown()


@pytest.fixture(scope="module", params=["hermes", "llama3_json"])
def url(llm: LLM, request: pytest.FixtureRequest) -> Iterator[str]:
    """The server with a chat template of each format; the parser is detected from the template."""
    original = llm.tokenizer.chat_template
    llm.tokenizer.chat_template = (TEMPLATES / f"{request.param}.jinja").read_text()
    try:
        app = create_app(llm, served_model_name=MODEL)
        assert app.state.server.tool_parser.name == request.param
        with ServerThread(app) as base_url:
            yield base_url
    finally:
        llm.tokenizer.chat_template = original


@pytest.fixture(scope="module")
def client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=TIMEOUT)


def _check_call(name: str, arguments: str, allowed: set[str]) -> None:
    assert name in allowed
    jsonschema.validate(json.loads(arguments), SCHEMAS[name])


@pytest.mark.parametrize("tool_choice, allowed", [
    ("required", {"get_weather", "get_time"}),
    ({"type": "function", "function": {"name": "get_time"}}, {"get_time"}),
])
def test_forced_calls_non_streaming(client: openai.OpenAI, tool_choice: Any, allowed: set[str]) -> None:
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice=tool_choice,
                                           parallel_tool_calls=False, max_tokens=120, temperature=1.0, seed=5, n=3)
    for choice in reply.choices:
        assert choice.finish_reason == "tool_calls", choice
        assert choice.message.content is None and len(choice.message.tool_calls) == 1
        call = choice.message.tool_calls[0]
        assert call.type == "function" and call.id.startswith("call_")
        _check_call(call.function.name, call.function.arguments, allowed)


@pytest.mark.parametrize("tool_choice, allowed", [
    ("required", {"get_weather", "get_time"}),
    ({"type": "function", "function": {"name": "get_weather"}}, {"get_weather"}),
])
def test_forced_calls_streaming(client: openai.OpenAI, tool_choice: Any, allowed: set[str]) -> None:
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice=tool_choice,
                                            parallel_tool_calls=False, max_tokens=120, temperature=1.0, seed=9,
                                            stream=True)
    calls: dict[int, dict[str, str]] = {}
    finish = None
    for chunk in stream:
        for choice in chunk.choices:
            assert not choice.delta.content
            for delta in choice.delta.tool_calls or []:  # OpenAI's incremental shape: accumulate by index
                entry = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
                entry["id"] += delta.id or ""
                if delta.function is not None:
                    entry["name"] += delta.function.name or ""
                    entry["arguments"] += delta.function.arguments or ""
            finish = choice.finish_reason or finish
    assert finish == "tool_calls" and list(calls) == [0]
    assert calls[0]["id"].startswith("call_")
    _check_call(calls[0]["name"], calls[0]["arguments"], allowed)


def test_auto_and_none_answer_with_text_when_no_call_is_made(client: openai.OpenAI) -> None:
    for tool_choice in ("auto", "none"):
        reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, tools=TOOLS, tool_choice=tool_choice,
                                               max_tokens=8, temperature=0, extra_body={"ignore_eos": True,
                                                                                        "guided_regex": "[a-z ]{8,}"})
        choice = reply.choices[0]
        assert choice.message.tool_calls is None and choice.finish_reason == "length"
        assert choice.message.content


def test_tool_turns_in_the_history_are_rendered(client: openai.OpenAI) -> None:
    history = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
            "name": "get_weather", "arguments": json.dumps({"city": "Paris", "unit": "celsius"})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 degrees"},
    ]
    reply = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, tool_choice="required",
                                           parallel_tool_calls=False, max_tokens=120, temperature=0)
    assert reply.choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("body, param", [
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "bad"}}}],
      "tool_choice": "required"}, "tools"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
])
def test_bad_tool_requests_are_400(url: str, body: dict, param: str) -> None:
    response = httpx.post(url + "/v1/chat/completions", timeout=TIMEOUT,
                          json={"model": MODEL, "messages": MESSAGES, "max_tokens": 4, **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
