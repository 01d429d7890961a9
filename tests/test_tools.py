"""Tool-call parsers on fixed model text (whole and streamed in small pieces), the grammars that
force a call, request validation, and chat templates with tools (Hermes/Qwen and Llama-3 style
templates stored in tests/fixtures) rendered with the default model's real tokenizer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import llguidance
import llguidance.hf
import pytest

from sagellm_core.chat import chat_prompt_ids
from sagellm_core.server.errors import APIError
from sagellm_core.server.tool_chat import plan_tools, template_messages
from sagellm_core.server.tools import (
    HermesParser,
    Llama3JsonParser,
    MistralParser,
    StreamingToolCalls,
    ToolParser,
    detect_parser_name,
    make_parser,
)
from sagellm_core.structured.grammar import compile_grammar

TEMPLATES = Path(__file__).parent / "fixtures" / "chat_templates"
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                    "unit": {"enum": ["celsius", "fahrenheit"]}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {
    "name": "get_time", "parameters": {"type": "object", "properties": {"zone": {"type": "string"}},
                                       "required": ["zone"]}}}

HERMES_TEXT = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
               '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>')
LLAMA_TEXT = '{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_time", "parameters": {"zone": "CET"}}'
MISTRAL_TEXT = ('[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Paris"}}, '
                '{"name": "get_time", "arguments": {"zone": "CET"}}]')
EXPECTED = [("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})]


def _calls(calls: list) -> list[tuple[str, Any]]:
    return [(call.name, json.loads(call.arguments)) for call in calls]


# ---- parsing -------------------------------------------------------------------------------------
@pytest.mark.parametrize("parser, text, content", [
    (HermesParser(), HERMES_TEXT, "Let me check."),
    (Llama3JsonParser(), LLAMA_TEXT, None),
    (Llama3JsonParser(), "<|python_tag|>" + LLAMA_TEXT, None),
    (MistralParser(), MISTRAL_TEXT, None),
    (MistralParser(), '[TOOL_CALLS]get_weather[ARGS]{"city": "Paris"}[TOOL_CALLS]get_time[ARGS]{"zone": "CET"}', None),
])
def test_parsers_extract_calls_and_content(parser: ToolParser, text: str, content: str | None) -> None:
    parsed_content, calls = parser.extract(text)
    assert parsed_content == content
    assert _calls(calls) == EXPECTED
    assert all(call.id.startswith("call_") for call in calls) and len({c.id for c in calls}) == 2


@pytest.mark.parametrize("parser, text", [
    (HermesParser(), "The weather is nice."),
    (HermesParser(), "<tool_call>\nnot json\n</tool_call>"),
    (Llama3JsonParser(), "Paris is sunny."),
    (Llama3JsonParser(), '{"city": "Paris"}'),  # JSON, but not a call
    (MistralParser(), "No calls here."),
])
def test_text_without_a_valid_call_stays_content(parser: ToolParser, text: str) -> None:
    assert parser.extract(text) == (text, [])


def _stream(parser: ToolParser, text: str, size: int, parallel: bool = True) -> tuple[str, list]:
    stream = StreamingToolCalls(parser, parallel)
    content, calls = "", []
    pieces = [text[i:i + size] for i in range(0, len(text), size)] or [""]
    for i, piece in enumerate(pieces):
        delta, new = stream.feed(piece, i == len(pieces) - 1)
        content += delta
        calls += new
    assert [index for index, _ in calls] == list(range(len(calls)))
    return content, [call for _, call in calls]


@pytest.mark.parametrize("size", [1, 3, 7, 1000])
@pytest.mark.parametrize("parser, text, content", [
    (HermesParser(), HERMES_TEXT, "Let me check.\n"),
    (Llama3JsonParser(), LLAMA_TEXT, ""),
    (MistralParser(), MISTRAL_TEXT, ""),
])
def test_streamed_calls_match_the_whole_parse(parser: ToolParser, text: str, content: str, size: int) -> None:
    streamed_content, calls = _stream(parser, text, size)
    assert streamed_content == content
    assert _calls(calls) == EXPECTED


def test_streamed_hermes_call_is_sent_as_soon_as_it_closes() -> None:
    stream = StreamingToolCalls(HermesParser())
    first_block_end = HERMES_TEXT.index("</tool_call>") + len("</tool_call>")
    content, calls = stream.feed(HERMES_TEXT[:first_block_end], False)
    assert content == "Let me check.\n" and _calls([c for _, c in calls]) == EXPECTED[:1]
    _, calls = stream.feed(HERMES_TEXT[first_block_end:], True)
    assert [(i, c.name) for i, c in calls] == [(1, "get_time")]


@pytest.mark.parametrize("parser, text", [(HermesParser(), "I think <tool is a word, {not a call}."),
                                          (Llama3JsonParser(), "{not a call} but text"),
                                          (Llama3JsonParser(), "Plain answer.")])
def test_held_back_text_that_is_no_call_is_released(parser: ToolParser, text: str) -> None:
    for size in (1, 4, 100):
        assert _stream(parser, text, size) == (text, [])


def test_parallel_off_keeps_the_first_call() -> None:
    _, calls = _stream(HermesParser(), HERMES_TEXT, 5, parallel=False)
    assert _calls(calls) == EXPECTED[:1]


def test_parser_detection_from_the_chat_template() -> None:
    assert detect_parser_name((TEMPLATES / "hermes.jinja").read_text()) == "hermes"
    assert detect_parser_name((TEMPLATES / "llama3_json.jinja").read_text()) == "llama3_json"
    assert detect_parser_name("{{ '[TOOL_CALLS]' }}") == "mistral"
    assert detect_parser_name(None) == "hermes"
    with pytest.raises(ValueError, match="unknown tool-call parser"):
        make_parser("nope")


# ---- forced calls --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tokenizer(default_model_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_dir)


@pytest.mark.parametrize("parser, text, parallel", [
    (HermesParser(), HERMES_TEXT.split("\n", 1)[1], True),
    (HermesParser(), '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>', False),
    (Llama3JsonParser(), LLAMA_TEXT, True),
    (MistralParser(), MISTRAL_TEXT, True),
])
def test_forcing_grammar_accepts_the_format(parser: ToolParser, text: str, parallel: bool, tokenizer: Any) -> None:
    grammar = compile_grammar(parser.constraint([WEATHER, TIME], parallel))
    matcher = llguidance.LLMatcher(llguidance.hf.from_tokenizer(tokenizer), grammar, log_level=0)
    assert matcher.consume_tokens(tokenizer(text).input_ids), matcher.get_error()
    assert matcher.is_accepting()


def test_forcing_grammar_rejects_other_functions_and_bad_arguments(tokenizer: Any) -> None:
    grammar = compile_grammar(HermesParser().constraint([WEATHER], False))
    lltokenizer = llguidance.hf.from_tokenizer(tokenizer)
    for bad in ['<tool_call>\n{"name": "get_time", "arguments": {}}', '<tool_call>\n{"name": "get_weather", '
                '"arguments": {"unit": "kelvin"', "Sure! <tool_call>"]:
        matcher = llguidance.LLMatcher(lltokenizer, grammar, log_level=0)
        assert not matcher.consume_tokens(tokenizer(bad).input_ids)


# ---- request validation --------------------------------------------------------------------------
def test_tool_plans() -> None:
    parser = HermesParser()
    assert plan_tools(None, None, None, parser, False).parser is None
    auto = plan_tools([WEATHER], "auto", None, parser, False)
    assert auto.parser is parser and auto.constraint is None and auto.tools == [WEATHER]
    assert plan_tools([WEATHER], "none", None, parser, False).tools is None
    required = plan_tools([WEATHER, TIME], "required", False, parser, False)
    assert required.constraint is not None and not required.parallel
    named = plan_tools([WEATHER, TIME], {"type": "function", "function": {"name": "get_time"}}, None, parser, False)
    assert "get_time" in named.constraint.grammar and "get_weather" not in named.constraint.grammar


@pytest.mark.parametrize("tools, choice, constrained, param", [
    (None, "required", False, "tool_choice"),
    ([WEATHER], {"type": "function", "function": {"name": "missing"}}, False, "tool_choice"),
    ([WEATHER], "sometimes", False, "tool_choice"),
    ([{"type": "function", "function": {"description": "no name"}}], "auto", False, "tools.0.function.name"),
    ([{"type": "retrieval"}], "auto", False, "tools.0"),
    ([WEATHER], "required", True, "tool_choice"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}], "required", False, "tools"),
])
def test_bad_tool_requests_name_the_field(tools: Any, choice: Any, constrained: bool, param: str) -> None:
    with pytest.raises(APIError) as caught:
        plan_tools(tools, choice, None, HermesParser(), constrained)
    assert caught.value.status == 400 and caught.value.param == param


# ---- chat templates with tools -------------------------------------------------------------------
@pytest.mark.parametrize("template, call_text", [
    ("hermes.jinja", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'),
    ("llama3_json.jinja", '{"name": "get_weather", "parameters": {"city": "Paris"}}'),
])
def test_templates_render_tools_and_tool_turns(template: str, call_text: str, tokenizer: Any) -> None:
    tokenizer.chat_template = (TEMPLATES / template).read_text()
    messages = template_messages([
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": json.dumps({"city": "Paris"})}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C, sunny"},
    ])
    text = tokenizer.decode(chat_prompt_ids(tokenizer, messages, tools=[WEATHER, TIME]))
    assert '"name": "get_weather"' in text and '"name": "get_time"' in text  # the tool specs
    assert call_text in text  # the earlier call, its arguments as an object (not a JSON string in a string)
    assert "18 C, sunny" in text and "Weather in Paris?" in text
    assert "get_time" not in tokenizer.decode(chat_prompt_ids(tokenizer, messages[:1]))
