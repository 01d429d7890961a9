"""OpenAI response bodies built from engine outputs: completions and chat, whole or as stream chunks.

A formatter knows one endpoint's shapes. Streaming keeps a `ChoiceCursor` per choice so each chunk
carries only what is new (text, logprobs) and each choice reports its finish reason once.
"""

from __future__ import annotations

import json
import math
from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any

import attrs

from sagellm_core.outputs import CompletionOutput, RequestOutput, TokenLogprob

MIN_LOGPROB = -9999.0  # JSON has no -inf
compact_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode  # built once, not per event


@attrs.define
class ChoiceCursor:
    """How much of one choice has been streamed."""

    logprobs_sent: int = 0
    text_offset: int = 0
    started: bool = False
    finished: bool = False


def usage(finals: list[RequestOutput]) -> dict[str, int]:
    """``usage`` of finished outputs: prompt tokens per prompt, generated tokens over all choices."""
    prompt = sum(len(out.prompt_token_ids) for out in finals)
    completion = sum(len(c.token_ids) for out in finals for c in out.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _finite(logprob: float) -> float:
    return MIN_LOGPROB if math.isnan(logprob) or logprob < MIN_LOGPROB else logprob


class Formatter(ABC):
    """Shared envelope: id, object, created, model; choices indexed ``prompt_index * n + index``."""

    object_name = ""
    chunk_object_name = ""

    def __init__(self, response_id: str, model: str, created: int, n: int) -> None:
        self.response_id = response_id
        self.model = model
        self.created = created
        self.n = n
        self._event_head = ""

    def chunk_event(self, choices: list[dict[str, Any]], include_usage: bool) -> str:
        """`chunk` as one server-sent event (``data: {json}\\n\\n``): the envelope's JSON is made once
        per response, only the choices per event."""
        if not self._event_head:
            head = compact_json({"id": self.response_id, "object": self.chunk_object_name, "created": self.created,
                             "model": self.model})
            self._event_head = f"data: {head[:-1]},\"choices\":"
        tail = ',"usage":null}\n\n' if include_usage else "}\n\n"
        return self._event_head + compact_json(choices) + tail

    def envelope(self, object_name: str, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        return {"id": self.response_id, "object": object_name, "created": self.created, "model": self.model,
                "choices": choices, **extra}

    def choice_index(self, prompt_index: int, completion: CompletionOutput) -> int:
        return prompt_index * self.n + completion.index

    def response(self, finals: list[RequestOutput]) -> dict[str, Any]:
        """The non-streaming body."""
        choices = [self.full_choice(i, out, c) for i, out in enumerate(finals) for c in out.outputs]
        return self.envelope(self.object_name, choices, usage=usage(finals))

    def chunk(self, choices: list[dict[str, Any]], include_usage: bool) -> dict[str, Any]:
        """One streamed chunk; with ``include_usage`` every chunk carries ``usage: null`` like OpenAI's."""
        return self.envelope(self.chunk_object_name, choices, **({"usage": None} if include_usage else {}))

    def usage_chunk(self, finals: list[RequestOutput]) -> dict[str, Any]:
        """The last chunk when ``stream_options.include_usage``: no choices, the usage."""
        return self.envelope(self.chunk_object_name, [], usage=usage(finals))

    def delta_choices(self, prompt_index: int, output: RequestOutput,
                      cursors: dict[int, ChoiceCursor]) -> list[dict[str, Any]]:
        """Choices of a chunk for what ``output`` adds; empty when nothing is new."""
        choices = []
        for completion in output.outputs:
            index = self.choice_index(prompt_index, completion)
            cursor = cursors.setdefault(index, ChoiceCursor())
            if cursor.finished:
                continue
            has_news = completion.delta_text or completion.delta_token_ids or completion.finished
            if not has_news:
                continue
            new_logprobs = None
            if completion.logprobs is not None:
                new_logprobs = completion.logprobs[cursor.logprobs_sent:]
                cursor.logprobs_sent = len(completion.logprobs)
            choices.append(self.delta_choice(index, completion, new_logprobs, cursor))
            cursor.started = True
            cursor.finished = completion.finished
        return choices

    # ---- per endpoint --------------------------------------------------------------------------
    @abstractmethod
    def full_choice(self, prompt_index: int, output: RequestOutput, completion: CompletionOutput) -> dict[str, Any]:
        """One choice of the non-streaming body."""

    @abstractmethod
    def delta_choice(self, index: int, completion: CompletionOutput, logprobs: list[TokenLogprob] | None,
                     cursor: ChoiceCursor) -> dict[str, Any]:
        """One choice of a chunk: the new text and logprobs, the finish reason once finished."""


class CompletionFormatter(Formatter):
    """``text_completion`` bodies; ``echo_prompts`` (one text per prompt) are prepended when echoing."""

    object_name = chunk_object_name = "text_completion"

    def __init__(self, response_id: str, model: str, created: int, n: int,
                 echo_prompts: list[str] | None = None) -> None:
        super().__init__(response_id, model, created, n)
        self.echo_prompts = echo_prompts

    def _echo(self, prompt_index: int) -> str:
        return self.echo_prompts[prompt_index] if self.echo_prompts is not None else ""

    def full_choice(self, prompt_index: int, output: RequestOutput, completion: CompletionOutput) -> dict[str, Any]:
        logprobs = None if completion.logprobs is None else completion_logprobs(completion.logprobs, 0)
        return {"index": self.choice_index(prompt_index, completion),
                "text": self._echo(prompt_index) + completion.text,
                "logprobs": logprobs, "finish_reason": completion.finish_reason}

    def delta_choice(self, index: int, completion: CompletionOutput, logprobs: list[TokenLogprob] | None,
                     cursor: ChoiceCursor) -> dict[str, Any]:
        text = completion.delta_text if cursor.started else self._echo(index // self.n) + completion.delta_text
        body = None
        if logprobs is not None:
            body = completion_logprobs(logprobs, cursor.text_offset)
            cursor.text_offset += sum(len(entry.token) for entry in logprobs)
        return {"index": index, "text": text, "logprobs": body, "finish_reason": completion.finish_reason}


class ChatFormatter(Formatter):
    """``chat.completion`` / ``chat.completion.chunk`` bodies; the first delta of a choice names the role."""

    object_name = "chat.completion"
    chunk_object_name = "chat.completion.chunk"

    def full_choice(self, prompt_index: int, output: RequestOutput, completion: CompletionOutput) -> dict[str, Any]:
        logprobs = None if completion.logprobs is None else {"content": chat_logprobs(completion.logprobs)}
        return {"index": self.choice_index(prompt_index, completion),
                "message": {"role": "assistant", "content": completion.text},
                "logprobs": logprobs, "finish_reason": completion.finish_reason}

    def delta_choice(self, index: int, completion: CompletionOutput, logprobs: list[TokenLogprob] | None,
                     cursor: ChoiceCursor) -> dict[str, Any]:
        delta: dict[str, Any] = {"content": completion.delta_text}
        if not cursor.started:
            delta = {"role": "assistant", **delta}
        body = None if logprobs is None else {"content": chat_logprobs(logprobs)}
        return {"index": index, "delta": delta, "logprobs": body, "finish_reason": completion.finish_reason}


def completion_logprobs(entries: Sequence[TokenLogprob], text_offset: int) -> dict[str, Any]:
    """The legacy completions ``logprobs`` object: tokens, token_logprobs, top_logprobs, text_offset."""
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    for entry in entries:  # once: a `TokenLogprobs` makes each entry as it is read
        tokens.append(entry.token)
        token_logprobs.append(_finite(entry.logprob))
        top_logprobs.append({token: _finite(lp) for _, token, lp in entry.top})
        offsets.append(text_offset)
        text_offset += len(entry.token)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}


def chat_logprobs(entries: Sequence[TokenLogprob]) -> list[dict[str, Any]]:
    """The chat ``logprobs.content`` list: token, logprob, bytes and the top alternatives per token."""
    return [
        {"token": entry.token, "logprob": _finite(entry.logprob), "bytes": list(entry.token.encode("utf-8")),
         "top_logprobs": [{"token": token, "logprob": _finite(lp), "bytes": list(token.encode("utf-8"))}
                          for _, token, lp in entry.top]}
        for entry in entries
    ]
