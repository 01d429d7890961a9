"""Input processing: prompts and chat conversations to validated token ids, before the engine sees them.

Runs in `LLM`'s worker pool (and the server awaits it there), never on an event loop or the engine's
thread: the engine only receives token ids. A prompt that cannot fit the context is refused by its
length in characters before it is tokenized (`InputProcessor.max_prompt_chars`).
"""

from __future__ import annotations

from typing import Any, Mapping

import attrs

from sagellm_core.errors import InvalidRequestError, PromptTooLongError
from sagellm_core.sampling_params import SamplingParams

GENERATION_DEFAULT_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty")


@attrs.frozen
class ProcessedPrompt:
    """A validated prompt: token ids that fit the context, and the text they came from (if any)."""

    token_ids: list[int]
    text: str | None = None


class InputProcessor:
    """Validates prompts against one model's tokenizer, vocabulary and context length."""

    def __init__(self, tokenizer: Any, vocab_size: int, max_model_len: int, max_waiting: int) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.max_model_len = max_model_len
        self.max_waiting = max_waiting
        self._max_prompt_chars: int | None = None

    # ---- length pre-check ----------------------------------------------------------------------
    @property
    def max_prompt_chars(self) -> int | None:
        """Characters beyond which a text cannot fit the context whatever its tokens: max_model_len
        times the longest vocabulary entry (a token never covers more input characters than its
        own spelling, one character per byte for byte-level BPE). None (no pre-check) when the
        tokenizer's normalizer may delete characters, which would break that bound."""
        if self._max_prompt_chars is None:
            self._max_prompt_chars = _max_prompt_chars(self.tokenizer, self.max_model_len)
        return self._max_prompt_chars or None

    def check_length(self, text: str) -> None:
        """Refuse ``text`` without tokenizing it when it is too long to fit in any tokenization."""
        limit = self.max_prompt_chars
        if limit is not None and len(text) > limit:
            raise PromptTooLongError(
                f"prompt has {len(text)} characters; at most {limit} characters can fit in "
                f"{self.max_model_len} tokens with this tokenizer")

    # ---- prompts -------------------------------------------------------------------------------
    def check_params(self, params: Any) -> SamplingParams:
        """``params`` as a `SamplingParams` (None: the defaults) that could ever be admitted."""
        if params is None:
            return SamplingParams()
        if not isinstance(params, SamplingParams):
            raise InvalidRequestError(f"params must be SamplingParams, got {type(params).__name__}")
        if params.n > self.max_waiting:
            raise InvalidRequestError(f"n ({params.n}) is larger than the waiting queue "
                                      f"({self.max_waiting} sequences): it can never be admitted", param="n")
        return params

    def process(self, prompt: Any, *, add_special_tokens: bool = True) -> ProcessedPrompt:
        """A text or token-id prompt validated and tokenized."""
        if isinstance(prompt, ProcessedPrompt):
            return prompt
        if isinstance(prompt, str):
            return ProcessedPrompt(self.encode(prompt, add_special_tokens=add_special_tokens), prompt)
        if isinstance(prompt, (list, tuple)):
            return ProcessedPrompt(self.check_token_ids(prompt))
        raise InvalidRequestError(f"prompt must be a string or a list of token ids, got {type(prompt).__name__}")

    def encode(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``; refuses empty text, lone surrogates and text that cannot fit."""
        if not text:
            raise InvalidRequestError("prompt must not be empty")
        if self.tokenizer is None:
            raise InvalidRequestError("this model has no tokenizer: pass token ids")
        check_text(text, "prompt")
        self.check_length(text)
        ids = list(self.tokenizer(text, add_special_tokens=add_special_tokens).input_ids)
        return self.check_token_ids(ids)

    def check_token_ids(self, token_ids: Any, param: str = "prompt") -> list[int]:
        """``token_ids`` as a list of in-vocabulary ids that leaves room for one generated token."""
        ids = list(token_ids)
        if not ids:
            raise InvalidRequestError(f"{param} must contain at least one token")
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise InvalidRequestError(f"{param} token ids must be integers")
        if not all(0 <= t < self.vocab_size for t in ids):
            raise InvalidRequestError(f"{param} token ids must be in [0, {self.vocab_size})")
        if len(ids) >= self.max_model_len:
            raise PromptTooLongError(
                f"prompt has {len(ids)} tokens; the context is {self.max_model_len} "
                f"(at most {self.max_model_len - 1} prompt tokens leave room for one generated token)")
        return ids

    def decode(self, token_ids: Any, param: str = "tokens") -> str:
        """Text of validated token ids (echo, /detokenize)."""
        if self.tokenizer is None:
            raise InvalidRequestError("this model has no tokenizer")
        ids = list(token_ids)
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < self.vocab_size for t in ids):
            raise InvalidRequestError(f"{param} must be token ids in [0, {self.vocab_size})")
        return self.tokenizer.decode(ids)

    # ---- chat ----------------------------------------------------------------------------------
    def render_chat(self, messages: list[dict[str, Any]], template_kwargs: Mapping[str, Any] | None = None,
                    add_generation_prompt: bool = True, tools: list[dict[str, Any]] | None = None) -> str:
        """``messages`` rendered with the model's chat template (``template_kwargs`` and ``tools``
        reach the template)."""
        from sagellm_core.chat import render_chat

        for message in messages:
            if isinstance(message.get("content"), str):
                check_text(message["content"], "messages")
        return render_chat(self.tokenizer, messages, template_kwargs, add_generation_prompt, tools)

    def process_chat(self, messages: list[dict[str, Any]], template_kwargs: Mapping[str, Any] | None = None,
                     add_generation_prompt: bool = True, tools: list[dict[str, Any]] | None = None
                     ) -> ProcessedPrompt:
        """The chat prompt: rendered, pre-checked for length, tokenized (the template has the BOS)."""
        text = self.render_chat(messages, template_kwargs, add_generation_prompt, tools)
        has_template = getattr(self.tokenizer, "chat_template", None) is not None
        return ProcessedPrompt(self.encode(text, add_special_tokens=not has_template), text)


def check_text(text: str, param: str) -> None:
    """Refuse text that is not valid Unicode (lone surrogates from JSON escapes like ``\\ud800``)."""
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise InvalidRequestError(f"{param} is not valid Unicode: lone surrogate at character {exc.start}",
                                  param=param) from None


def _max_prompt_chars(tokenizer: Any, max_model_len: int) -> int:
    """0 when no safe bound is known."""
    if tokenizer is None or not _normalizer_keeps_length(tokenizer):
        return 0
    try:
        vocab = tokenizer.get_vocab()
    except Exception:
        return 0
    longest = max((len(token) for token in vocab), default=0)
    return max_model_len * longest if longest else 0


_PROBE = "a\u0301 \t\x00\x07 e\u0301\u0323 \u1100\u1161\u11a8 \uff21 \ufb01\u200b\ufeff x"


def _normalizer_keeps_length(tokenizer: Any) -> bool:
    """Whether each input character still has a character of its own in the vocabulary's spelling
    after normalization, tried on a probe with control, zero-width and combining characters. A
    byte-level vocabulary spells a token one character per UTF-8 byte, so NFC composition (two
    characters into one of two or more bytes) keeps the bound; BERT-style cleaning does not.
    Slow tokenizers get no pre-check."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return False
    normalizer = backend.normalizer
    if normalizer is None:
        return True
    try:
        normalized = normalizer.normalize_str(_PROBE)
    except Exception:
        return False
    byte_level = "ByteLevel" in f"{backend.pre_tokenizer!r}{backend.decoder!r}"
    spelled = len(normalized.encode("utf-8")) if byte_level else len(normalized)
    return spelled >= len(_PROBE)


def generation_defaults(model: Any) -> dict[str, Any]:
    """Sampling defaults the model's ``generation_config.json`` sets (vLLM's default behaviour):
    temperature, top_p, top_k, min_p, repetition_penalty, and ``max_tokens`` from max_new_tokens.
    Only values that differ from transformers' own defaults count (as vLLM reads them)."""
    config = getattr(model, "generation_config", None)
    if config is None:
        return {}
    try:
        diff = config.to_diff_dict()
    except Exception:
        return {}
    defaults = {key: diff[key] for key in GENERATION_DEFAULT_KEYS if diff.get(key) is not None}
    if defaults.get("top_k") == -1:
        defaults["top_k"] = 0
    if diff.get("max_new_tokens") is not None:
        defaults["max_tokens"] = diff["max_new_tokens"]
    return defaults
