"""Request bodies of the OpenAI-compatible endpoints (pydantic) and their mapping to `SamplingParams`.

Unknown fields are rejected (400 "Unrecognized request argument"), as OpenAI does. vLLM-style extras
are accepted: ``top_k``, ``min_p``, ``repetition_penalty``, ``ignore_eos``, ``min_tokens``,
``stop_token_ids``, ``skip_special_tokens``, ``bad_words``, and the structured-output options (``response_format``,
``structured_outputs``, ``guided_json`` / ``guided_regex`` / ``guided_grammar`` / ``guided_choice``:
see `sagellm_core.server.structured_requests`). Fields we cannot honour (suffix, ...)
are declared so that a non-trivial value is a clear 400 rather than silently ignored.
"""

from __future__ import annotations

from typing import Any, Mapping

from pydantic import BaseModel, ConfigDict, Field

from sagellm_core.sampling_params import SamplingParams
from sagellm_core.server.errors import APIError
from sagellm_core.server.structured_requests import request_constraint

Prompt = str | list[int]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)  # no "5" for 5, no true for 1


class StreamOptions(_Strict):
    include_usage: bool = False
    include_obfuscation: bool | None = None  # accepted; this server never obfuscates


class SamplingRequest(_Strict):
    """Fields shared by completions and chat completions."""

    model: str | None = None
    n: int = 1
    temperature: float | None = None
    top_p: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    # extras (vLLM names)
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: list[int] | None = None
    skip_special_tokens: bool = True
    bad_words: list[str] | None = None
    # structured outputs (OpenAI's response_format, vLLM's names)
    response_format: dict[str, Any] | None = None
    structured_outputs: dict[str, Any] | None = None
    guided_json: dict[str, Any] | str | None = None
    guided_regex: str | None = None
    guided_grammar: str | None = None
    guided_choice: list[str] | None = None
    cache_salt: str | None = None  # vLLM's: requests with different salts share no cached KV

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage

    def _check_common(self) -> None:
        if self.stream_options is not None and not self.stream:
            raise APIError(400, "stream_options is only allowed when stream is true", param="stream_options")

    def _sampling_kwargs(self, defaults: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Keyword arguments for `SamplingParams`. Where the request sent null: ``defaults`` (the
        model's generation config), else OpenAI's defaults."""
        defaults = defaults or {}

        def pick(name: str, fallback: Any) -> Any:
            value = getattr(self, name)
            return value if value is not None else defaults.get(name, fallback)

        top_k = pick("top_k", 0)
        return {
            "n": self.n,
            "temperature": pick("temperature", 1.0),
            "top_p": pick("top_p", 1.0),
            "top_k": 0 if top_k == -1 else top_k,  # vLLM clients send -1 for "off"
            "min_p": pick("min_p", 0.0),
            "repetition_penalty": pick("repetition_penalty", 1.0),
            "presence_penalty": self.presence_penalty or 0.0,
            "frequency_penalty": self.frequency_penalty or 0.0,
            "seed": self.seed,
            "stop": self.stop,
            "stop_token_ids": self.stop_token_ids,
            "ignore_eos": self.ignore_eos,
            "min_tokens": self.min_tokens,
            "skip_special_tokens": self.skip_special_tokens,
            "logit_bias": self.logit_bias or None,
            "bad_words": self.bad_words or [],
            "structured_outputs": request_constraint(self),
            "cache_salt": self.cache_salt,
        }


class CompletionRequest(SamplingRequest):
    """``POST /v1/completions``: a prompt (string, token ids, or a batch of either)."""

    prompt: str | list[str] | list[int] | list[list[int]]
    max_tokens: int | None = 16
    logprobs: int | None = None
    echo: bool = False
    suffix: str | None = None
    best_of: int | None = None

    def prompts(self) -> list[Prompt]:
        """The prompts of this request (a batch prompt gives several), each a string or token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            batch: list[Prompt] = [prompt]
        elif prompt and all(isinstance(p, int) for p in prompt):
            batch = [list(prompt)]  # type: ignore[arg-type]
        else:
            batch = list(prompt)  # type: ignore[arg-type]
        if not batch or any(len(p) == 0 for p in batch):
            raise APIError(400, "prompt must not be empty", param="prompt")
        return batch

    def sampling_params(self, defaults: Mapping[str, Any] | None = None) -> SamplingParams:
        """Validated `SamplingParams` (raises `InvalidRequestError` or `APIError` naming the field);
        ``defaults`` fill what the request left null (``max_tokens`` only when sent as null)."""
        self._check_common()
        if self.suffix:
            raise APIError(400, "suffix is not supported", param="suffix")
        if self.best_of is not None and self.best_of != self.n:
            raise APIError(400, "best_of other than n is not supported", param="best_of")
        if self.echo and self.logprobs is not None:
            raise APIError(400, "echo together with logprobs is not supported", param="echo")
        max_tokens = self.max_tokens if self.max_tokens is not None else (defaults or {}).get("max_tokens")
        return SamplingParams(max_tokens=max_tokens, logprobs=self.logprobs, **self._sampling_kwargs(defaults))


class ChatMessage(BaseModel):
    """One chat message; extra keys (``name``, ``tool_call_id``, ...) reach the chat template as given."""

    model_config = ConfigDict(extra="allow")

    role: str
    content: str | list[dict[str, Any]] | None = None

    def template_dict(self) -> dict[str, Any]:
        """The message as the chat template expects it, with content parts joined into one string."""
        data = self.model_dump(exclude_none=True)
        data["content"] = self._text()
        return data

    def _text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        texts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise APIError(400, f"unsupported content part type {part.get('type')!r}; only text is supported",
                               param="messages")
            texts.append(part["text"])
        return "".join(texts)


class ChatCompletionRequest(SamplingRequest):
    """``POST /v1/chat/completions``: messages rendered with the model's chat template."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = None
    max_completion_tokens: int | None = None
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: list[dict[str, Any]] | None = None  # see sagellm_core.server.tool_chat
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None  # template variables, e.g. Qwen3's enable_thinking

    def template_messages(self) -> list[dict[str, Any]]:
        return [message.template_dict() for message in self.messages]

    def sampling_params(self, defaults: Mapping[str, Any] | None = None) -> SamplingParams:
        """Validated `SamplingParams`; ``max_completion_tokens`` wins over the older ``max_tokens``;
        ``defaults`` (the model's generation config) fill what the request left unset."""
        self._check_common()
        if self.top_logprobs is not None and not self.logprobs:
            raise APIError(400, "top_logprobs requires logprobs to be true", param="top_logprobs")
        max_tokens = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        if max_tokens is None:
            max_tokens = (defaults or {}).get("max_tokens")
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        return SamplingParams(max_tokens=max_tokens, logprobs=logprobs, **self._sampling_kwargs(defaults))


