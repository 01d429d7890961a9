"""Tool calling in chat completions: validate ``tools`` / ``tool_choice``, render the tools with the
chat template, force a call through the structured-output path when the client requires one, and
answer with ``message.tool_calls`` or streamed ``delta.tool_calls`` and ``finish_reason: tool_calls``.
"""

from __future__ import annotations

import json
from typing import Any

import attrs

from sagellm_core.outputs import CompletionOutput, RequestOutput, TokenLogprob
from sagellm_core.sampling_params import SamplingParams
from sagellm_core.server.errors import APIError
from sagellm_core.server.responses import ChatFormatter, ChoiceCursor
from sagellm_core.server.structured_requests import checked
from sagellm_core.server.tools import StreamingToolCalls, ToolCall, ToolParser
from sagellm_core.structured.params import StructuredOutputsParams


@attrs.define
class ToolPlan:
    """What one chat request does with tools: which to render, how to parse, what to force."""

    tools: list[dict[str, Any]] | None = None  # rendered by the chat template
    parser: ToolParser | None = None  # parses the reply (None: tools are off)
    constraint: StructuredOutputsParams | None = None  # forces a call (required / named)
    parallel: bool = True

    def sampling_params(self, params: SamplingParams) -> SamplingParams:
        """``params`` with the forced call's constraint, and special tokens kept in the text when the
        format's marker is one."""
        if self.constraint is not None:
            params = params.replace(structured_outputs=self.constraint)
        if self.parser is not None and self.parser.needs_special_tokens:
            params = params.replace(skip_special_tokens=False)
        return params


def _check_tools(tools: Any) -> list[dict[str, Any]]:
    if not isinstance(tools, list) or not tools:
        raise APIError(400, "tools must be a non-empty list", param="tools")
    names = set()
    for index, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(function, dict):
            raise APIError(400, f"tools[{index}]: expected {{'type': 'function', 'function': {{...}}}}",
                           param=f"tools.{index}")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise APIError(400, f"tools[{index}].function.name must be a non-empty string",
                           param=f"tools.{index}.function.name")
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise APIError(400, f"tools[{index}].function.parameters must be a JSON schema object",
                           param=f"tools.{index}.function.parameters")
        names.add(name)
    return tools


def _chosen(tool_choice: Any, tools: list[dict[str, Any]]) -> list[dict[str, Any]] | str:
    """``"none"``, ``"auto"``, or the tools a call must be made to."""
    if tool_choice is None or tool_choice == "auto":
        return "auto"
    if tool_choice == "none":
        return "none"
    if tool_choice == "required":
        return tools
    function = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(tool_choice, dict) or tool_choice.get("type", "function") != "function" or not name:
        raise APIError(400, "tool_choice must be none, auto, required or "
                            "{'type': 'function', 'function': {'name': ...}}", param="tool_choice")
    named = [tool for tool in tools if tool["function"]["name"] == name]
    if not named:
        raise APIError(400, f"tool_choice names function {name!r}, which is not in tools", param="tool_choice")
    return named


def plan_tools(tools: Any, tool_choice: Any, parallel_tool_calls: bool | None, parser: ToolParser,
               has_constraint: bool) -> ToolPlan:
    """The `ToolPlan` of a request; 400 naming the field for bad ``tools`` / ``tool_choice``."""
    if not tools:
        if tool_choice not in (None, "none", "auto"):
            raise APIError(400, "tool_choice needs tools", param="tool_choice")
        return ToolPlan()
    tools = _check_tools(tools)
    chosen = _chosen(tool_choice, tools)
    parallel = parallel_tool_calls is not False
    if chosen == "none":
        return ToolPlan()
    if chosen == "auto":
        return ToolPlan(tools, parser, None, parallel)
    if has_constraint:
        raise APIError(400, "a required tool call cannot be combined with response_format or another "
                            "structured-output option", param="tool_choice")
    constraint = checked(lambda: parser.constraint(chosen, parallel), "tools")  # type: ignore[arg-type]
    return ToolPlan(tools, parser, constraint, parallel)


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Messages for a chat template: assistant ``tool_calls`` arguments as objects (templates
    serialise them with ``tojson``), as vLLM passes them."""
    out = []
    for message in messages:
        calls = message.get("tool_calls")
        if isinstance(calls, list):
            message = {**message, "tool_calls": [_decoded_call(call) for call in calls]}
        out.append(message)
    return out


def _decoded_call(call: Any) -> Any:
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("arguments"), str):
        return call
    try:
        arguments = json.loads(function["arguments"])
    except json.JSONDecodeError:
        return call
    return {**call, "function": {**function, "arguments": arguments}}


class ToolChatFormatter(ChatFormatter):
    """Chat bodies whose replies are parsed for tool calls (``message.tool_calls`` /
    ``delta.tool_calls``, ``finish_reason: tool_calls``)."""

    def __init__(self, response_id: str, model: str, created: int, n: int, plan: ToolPlan) -> None:
        super().__init__(response_id, model, created, n)
        assert plan.parser is not None
        self.plan = plan
        self.parser: ToolParser = plan.parser
        self._streams: dict[int, StreamingToolCalls] = {}

    def full_choice(self, prompt_index: int, output: RequestOutput, completion: CompletionOutput) -> dict[str, Any]:
        choice = super().full_choice(prompt_index, output, completion)
        content, calls = self.parser.extract(completion.text)
        if not self.plan.parallel:
            calls = calls[:1]
        if calls:
            choice["message"] = {"role": "assistant", "content": content,
                                 "tool_calls": [call.to_openai() for call in calls]}
            choice["finish_reason"] = _finish_reason(completion.finish_reason)
        return choice

    def delta_choice(self, index: int, completion: CompletionOutput, logprobs: list[TokenLogprob] | None,
                     cursor: ChoiceCursor) -> dict[str, Any]:
        choice = super().delta_choice(index, completion, logprobs, cursor)
        stream = self._streams.setdefault(index, StreamingToolCalls(self.parser, self.plan.parallel))
        content, calls = stream.feed(completion.delta_text, completion.finished)
        delta = {k: v for k, v in choice["delta"].items() if k != "content"}
        delta["content"] = content if content or not calls else None
        if calls:
            delta["tool_calls"] = [_call_delta(i, call) for i, call in calls]
        choice["delta"] = delta
        if completion.finished and stream.called:
            choice["finish_reason"] = _finish_reason(completion.finish_reason)
        return choice


def _finish_reason(reason: str | None) -> str | None:
    return "tool_calls" if reason == "stop" else reason


def _call_delta(index: int, call: ToolCall) -> dict[str, Any]:
    return {"index": index, **call.to_openai()}
