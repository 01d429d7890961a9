"""Admission: a request is checked completely before it reaches the scheduler. Token ids given by
the caller are used as they are (never re-tokenized); text is tokenized here."""

from __future__ import annotations

import time
from typing import Any

import attrs

from sagellm_core.detokenizer import IncrementalDetokenizer
from sagellm_core.errors import EngineOverloadedError, InvalidRequestError, PromptTooLongError
from sagellm_core.outputs import RequestMetrics
from sagellm_core.request import Request
from sagellm_core.request_state import CompletionState, RequestGroup
from sagellm_core.sampling_params import SamplingParams


@attrs.define
class Admission:
    """Limits a request must meet: vocabulary, context, KV pool, queue."""

    tokenizer: Any
    vocab_size: int
    max_model_len: int
    pool_tokens: int  # tokens one sequence can hold in the smallest KV pool
    block_size: int
    max_waiting: int

    def encode(self, prompt: str) -> list[int]:
        if self.tokenizer is None:
            raise InvalidRequestError("this model has no tokenizer: pass prompt_token_ids")
        return list(self.tokenizer(prompt).input_ids)

    def prompt_ids(self, prompt: str | list[int] | None) -> tuple[str | None, list[int]]:
        """(text or None, token ids) of a prompt given as text or as token ids."""
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt must not be empty")
            return prompt, self.encode(prompt)
        token_ids = list(prompt or [])
        if not token_ids:
            raise InvalidRequestError("prompt must contain at least one token")
        if any(isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size for t in token_ids):
            raise InvalidRequestError(f"prompt token ids must be integers in [0, {self.vocab_size})")
        return None, token_ids

    def max_tokens(self, num_prompt_tokens: int, params: SamplingParams) -> int:
        """The request's token limit (``max_tokens`` capped by the context). Raises
        `PromptTooLongError` when the prompt leaves no room or the whole sequence could never fit
        the KV pool: such a request would preempt itself forever."""
        if num_prompt_tokens >= self.max_model_len:
            raise PromptTooLongError(
                f"prompt has {num_prompt_tokens} tokens; the context is {self.max_model_len} "
                f"(at most {self.max_model_len - 1} prompt tokens leave room for one generated token)")
        room = self.max_model_len - num_prompt_tokens
        max_tokens = min(params.max_tokens or room, room)
        if num_prompt_tokens + max_tokens > self.pool_tokens:
            raise PromptTooLongError(
                f"prompt of {num_prompt_tokens} tokens plus max_tokens {max_tokens} needs "
                f"{num_prompt_tokens + max_tokens} tokens of KV cache; one sequence can hold at most "
                f"{self.pool_tokens} ({self.pool_tokens // self.block_size} blocks of {self.block_size})")
        return max_tokens

    def check_token_params(self, params: SamplingParams) -> frozenset[int]:
        """Checks ``logit_bias`` ids against the vocabulary; returns the tokens ``bad_words`` ban."""
        for token in params.logit_bias or {}:
            if token >= self.vocab_size:
                raise InvalidRequestError(f"logit_bias: token id {token} is not in the vocabulary "
                                          f"[0, {self.vocab_size})", param="logit_bias")
        banned: set[int] = set()
        for word in params.bad_words:
            forms = {tuple(self.encode_plain(text)) for text in (word, " " + word.lstrip())}
            single = {ids[0] for ids in forms if len(ids) == 1 and ids[0] < self.vocab_size}
            if not single:
                raise InvalidRequestError(f"bad_words: {word!r} is not a single token of this model's vocabulary "
                                          "(multi-token bad words are not supported)", param="bad_words")
            banned |= single
        return frozenset(banned)

    def encode_plain(self, text: str) -> list[int]:
        """``text``'s tokens without special tokens (BOS)."""
        if self.tokenizer is None:
            raise InvalidRequestError("this model has no tokenizer: bad_words need one", param="bad_words")
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def check_queue(self, num_waiting: int, n: int) -> None:
        if n > self.max_waiting:
            raise InvalidRequestError(f"n={n} is larger than the waiting queue ({self.max_waiting} requests)")
        if num_waiting + n > self.max_waiting:
            raise EngineOverloadedError(f"waiting queue is full ({self.max_waiting} requests)")

    def new_group(self, request_id: str, text: str | None, token_ids: list[int], params: SamplingParams,
                  max_tokens: int, priority: int, stream: bool, eos_token_ids: frozenset[int],
                  bad_token_ids: frozenset[int] = frozenset()) -> RequestGroup:
        """The request's ``n`` completions (ids ``id#0``, ``id#1``, ... when ``n`` > 1)."""
        now = time.monotonic()
        completions = []
        for index in range(params.n):
            child_id = request_id if params.n == 1 else f"{request_id}#{index}"
            request = Request(child_id, token_ids, params, max_tokens, eos_token_ids=eos_token_ids,
                              priority=priority, arrival_time=now, parent_id=request_id, index=index,
                              bad_token_ids=bad_token_ids)
            detok = IncrementalDetokenizer(self.tokenizer, token_ids, params.skip_special_tokens)
            completions.append(CompletionState(request, detok))
        return RequestGroup(request_id, text, token_ids, params, completions, RequestMetrics(arrival_time=now),
                            stream=stream)
