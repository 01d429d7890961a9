"""Tool-call formats of the model families the engine runs: parse the model's text into OpenAI
``tool_calls``, whole or as it streams, and build the grammar that forces a call in the model's own
format (``tool_choice: required`` or a named function).

* ``hermes`` (Hermes, Qwen2/2.5/3): ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``,
  one block per call, text before the first block is content.
* ``llama3_json`` (Llama 3.x): the reply is ``{"name": ..., "parameters": {...}}``, optionally after
  ``<|python_tag|>``; several calls are separated by ``;``.
* ``mistral``: ``[TOOL_CALLS][{"name": ..., "arguments": {...}}, ...]`` (and the newer
  ``[TOOL_CALLS]name[ARGS]{...}``).
"""

from __future__ import annotations

import json
import re
import uuid
from abc import ABC, abstractmethod
from typing import Any

import attrs

from sagellm_core.structured.grammar import COMPACT_JSON
from sagellm_core.structured.params import StructuredOutputsParams


@attrs.define
class ToolCall:
    """One parsed call: the function's name and its arguments as JSON text (OpenAI's shape)."""

    name: str
    arguments: str
    id: str = attrs.field(factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def to_openai(self) -> dict[str, Any]:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


def _call(data: Any, arguments_key: str) -> ToolCall | None:
    """A `ToolCall` from a decoded ``{"name": ..., arguments_key: {...}}``; None for anything else."""
    if not isinstance(data, dict) or not isinstance(data.get("name"), str):
        return None
    arguments = data.get(arguments_key, data.get("arguments", data.get("parameters", {})))
    if isinstance(arguments, str):  # some models emit the arguments as JSON text already
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            return None
    return ToolCall(data["name"], json.dumps(arguments, ensure_ascii=False))


def _json_values(text: str) -> tuple[list[Any], str]:
    """JSON values at the start of ``text`` separated by whitespace, ``,`` or ``;``, and the rest."""
    decoder = json.JSONDecoder()
    values: list[Any] = []
    position = 0
    while True:
        while position < len(text) and text[position] in " \t\r\n;,":
            position += 1
        if position >= len(text):
            return values, ""
        try:
            value, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError:
            return values, text[position:]
        values.append(value)


def _partial_marker_at_end(text: str, marker: str) -> int | None:
    """Where a prefix of ``marker`` ends ``text`` (it may become the marker), else None."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if text.endswith(marker[:size]):
            return len(text) - size
    return None


def call_schema(tools: list[dict[str, Any]], arguments_key: str) -> dict[str, Any]:
    """The JSON schema of one call object ``{"name": ..., arguments_key: ...}`` of any of ``tools``."""
    options = []
    for tool in tools:
        function = tool["function"]
        parameters = function.get("parameters") or {"type": "object", "properties": {}}
        options.append({"type": "object", "properties": {"name": {"const": function["name"]},
                                                         arguments_key: parameters},
                        "required": ["name", arguments_key], "additionalProperties": False})
    schema: dict[str, Any] = options[0] if len(options) == 1 else {"anyOf": options}
    return {**schema, "x-guidance": COMPACT_JSON}


def _lark_json(schema: dict[str, Any]) -> str:
    return "%json " + json.dumps(schema, ensure_ascii=False)


class ToolParser(ABC):
    """One model family's tool-call format."""

    name = ""
    marker = ""  # where a call section begins ("" = the reply itself is the call)
    arguments_key = "arguments"
    needs_special_tokens = False  # the marker is a special token: keep special tokens in the text

    @abstractmethod
    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        """(content, calls) of a finished reply; no calls means the text is all content."""

    @abstractmethod
    def required_grammar(self, tools: list[dict[str, Any]], parallel: bool) -> str:
        """A Lark grammar whose sentences are one (or with ``parallel`` several) calls of ``tools``."""

    def section_start(self, text: str) -> int | None:
        """Index where a call section begins or may begin in ``text`` (the rest is held back while
        streaming), else None."""
        index = text.find(self.marker)
        if index >= 0:
            return index
        return _partial_marker_at_end(text, self.marker)

    def constraint(self, tools: list[dict[str, Any]], parallel: bool) -> StructuredOutputsParams:
        """The structured-output constraint that forces a call of ``tools`` in this format."""
        return StructuredOutputsParams(grammar=self.required_grammar(tools, parallel))


class HermesParser(ToolParser):
    """``<tool_call>{json}</tool_call>`` blocks (Hermes 2 Pro, Qwen 2/2.5/3)."""

    name = "hermes"
    marker = "<tool_call>"
    _block = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        start = text.find(self.marker)
        if start < 0:
            return text, []
        calls = []
        for body in self._block.findall(text[start:]):
            values, _ = _json_values(body)
            call = _call(values[0], "arguments") if len(values) == 1 else None
            if call is None:
                return text, []  # a malformed block: show the text rather than drop it
            calls.append(call)
        content = text[:start].strip()
        return content or None, calls

    def required_grammar(self, tools: list[dict[str, Any]], parallel: bool) -> str:
        repeat = ' ("\\n" call)*' if parallel else ""
        return (f"start: call{repeat}\n"
                'call: "<tool_call>\\n" body "\\n</tool_call>"\n'
                f"body: {_lark_json(call_schema(tools, 'arguments'))}\n")


class Llama3JsonParser(ToolParser):
    """Llama 3.x JSON calls: ``{"name": ..., "parameters": {...}}`` (``;`` between several)."""

    name = "llama3_json"
    marker = "<|python_tag|>"
    arguments_key = "parameters"

    def section_start(self, text: str) -> int | None:
        stripped = text.lstrip()
        if not stripped or stripped[0] == "{" or stripped.startswith(self.marker) or self.marker.startswith(stripped):
            return 0
        return None

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        body = text.strip()
        if body.startswith(self.marker):
            body = body[len(self.marker):].lstrip()
        if not body.startswith("{"):
            return text, []
        values, rest = _json_values(body)
        calls = [_call(value, "parameters") for value in values]
        if rest.strip() or not calls or any(call is None for call in calls):
            return text, []
        return None, calls  # type: ignore[return-value]

    def required_grammar(self, tools: list[dict[str, Any]], parallel: bool) -> str:
        repeat = ' ("; " call)*' if parallel else ""
        return f"start: call{repeat}\ncall: {_lark_json(call_schema(tools, 'parameters'))}\n"


class MistralParser(ToolParser):
    """``[TOOL_CALLS]`` followed by a JSON list of calls, or by ``name[ARGS]{...}`` per call."""

    name = "mistral"
    marker = "[TOOL_CALLS]"
    needs_special_tokens = True

    def __init__(self, marker_token_id: int | None = None) -> None:
        self.marker_token_id = marker_token_id

    def extract(self, text: str) -> tuple[str | None, list[ToolCall]]:
        start = text.find(self.marker)
        if start < 0:
            return text, []
        content = text[:start].strip() or None
        calls: list[ToolCall] = []
        for section in text[start:].split(self.marker)[1:]:
            section = section.strip()
            if "[ARGS]" in section and not section.startswith("["):
                name, _, arguments = section.partition("[ARGS]")
                values, _ = _json_values(arguments)
                call = _call({"name": name.strip(), "arguments": values[0]}, "arguments") if values else None
                if call is None:
                    return text, []
                calls.append(call)
                continue
            values, _ = _json_values(section)
            items = values[0] if values and isinstance(values[0], list) else values
            parsed = [_call(item, "arguments") for item in items]
            if not parsed or any(call is None for call in parsed):
                return text, []
            calls.extend(parsed)  # type: ignore[arg-type]
        return content, calls

    def required_grammar(self, tools: list[dict[str, Any]], parallel: bool) -> str:
        item = call_schema(tools, "arguments")
        array: dict[str, Any] = {"type": "array", "items": {k: v for k, v in item.items() if k != "x-guidance"},
                                 "minItems": 1, "x-guidance": COMPACT_JSON}
        if not parallel:
            array["maxItems"] = 1
        marker = f"<[{self.marker_token_id}]>" if self.marker_token_id is not None else json.dumps(self.marker)
        return f"start: {marker} calls\ncalls: {_lark_json(array)}\n"


PARSERS: dict[str, type[ToolParser]] = {"hermes": HermesParser, "llama3_json": Llama3JsonParser,
                                        "mistral": MistralParser}


def detect_parser_name(chat_template: str | None) -> str:
    """The tool-call format a chat template teaches (``hermes`` when it names none)."""
    template = chat_template or ""
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "<tool_call>" in template:
        return "hermes"
    if "<|python_tag|>" in template or ('"parameters"' in template and "<|eot_id|>" in template):
        return "llama3_json"
    return "hermes"


def make_parser(name: str, tokenizer: Any = None) -> ToolParser:
    """The parser called ``name`` (``auto``: detected from the tokenizer's chat template)."""
    if name == "auto":
        name = detect_parser_name(getattr(tokenizer, "chat_template", None))
    if name not in PARSERS:
        raise ValueError(f"unknown tool-call parser {name!r}; choose auto, {', '.join(PARSERS)}")
    if name == "mistral":
        return MistralParser(_special_token_id(tokenizer, MistralParser.marker))
    return PARSERS[name]()


def _special_token_id(tokenizer: Any, token: str) -> int | None:
    """The id of ``token`` when the tokenizer has it as one special token."""
    if tokenizer is None:
        return None
    added = getattr(tokenizer, "added_tokens_encoder", {}) or {}
    return added.get(token)


class StreamingToolCalls:
    """Splits a streamed reply into content deltas and whole tool calls.

    Text before a possible call section streams as content at once; from the section's start it
    is held back and each call is emitted as soon as its JSON is complete (OpenAI's incremental
    ``delta.tool_calls`` shape, one delta per call with the whole arguments). At the end, held
    text that turned out not to be a call is released as content.
    """

    def __init__(self, parser: ToolParser, parallel: bool = True) -> None:
        self.parser = parser
        self.parallel = parallel
        self.text = ""
        self.content_sent = 0
        self.calls_sent = 0

    def feed(self, delta: str, finished: bool) -> tuple[str, list[tuple[int, ToolCall]]]:
        """Add ``delta``; returns (content to send, [(index, call)] to send)."""
        self.text += delta
        start = self.parser.section_start(self.text[self.content_sent:])
        if start is None and not finished:
            content, self.content_sent = self.text[self.content_sent:], len(self.text)
            return content, []
        if start is not None:
            start += self.content_sent
        if finished:
            return self._finish(start)
        assert start is not None  # an unfinished text without a tool-call section returned above
        content, self.content_sent = self.text[self.content_sent:start], start
        return content, self._new_calls(self._complete_calls(self.text[start:]))

    def _complete_calls(self, section: str) -> list[ToolCall]:
        """Calls of ``section`` whose text is complete (a later call may still be growing)."""
        _, calls = self.parser.extract(section)
        if calls and not self._closed(section):
            calls = calls[:-1]  # the last one may be cut short
        return calls

    def _closed(self, section: str) -> bool:
        if isinstance(self.parser, HermesParser):
            return section.rstrip().endswith("</tool_call>")
        return False  # JSON formats: the next token may continue the last value

    def _new_calls(self, calls: list[ToolCall]) -> list[tuple[int, ToolCall]]:
        if not self.parallel:
            calls = calls[:1]
        new = [(index, call) for index, call in enumerate(calls) if index >= self.calls_sent]
        self.calls_sent = max(self.calls_sent, len(calls))
        return new

    def _finish(self, start: int | None) -> tuple[str, list[tuple[int, ToolCall]]]:
        if start is None:
            content, self.content_sent = self.text[self.content_sent:], len(self.text)
            return content, []
        _, calls = self.parser.extract(self.text[start:])
        if not calls and not self.calls_sent:  # not a call after all: it is content
            content, self.content_sent = self.text[self.content_sent:], len(self.text)
            return content, []
        content, self.content_sent = self.text[self.content_sent:start], len(self.text)
        return content, self._new_calls(calls)

    @property
    def called(self) -> bool:
        """Whether any call was emitted."""
        return self.calls_sent > 0
