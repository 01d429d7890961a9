"""What callers receive: per-request outputs, incremental while streaming."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import overload

import attrs


@attrs.define
class TokenLogprob:
    token_id: int
    token: str
    logprob: float
    top: list[tuple[int, str, float]] = attrs.field(factory=list)


FlatLogprobs = tuple[list[int], list[float], list[list[int]], list[list[float]]]
"""Logprobs of consecutive tokens as parallel lists: token ids, their logprobs, and per token the ids
and logprobs of the top alternatives (best first)."""


class TokenLogprobs(Sequence[TokenLogprob]):
    """One completion's logprob entries, stored flat (`FlatLogprobs`): appending one costs four list
    appends; a `TokenLogprob` is made only when an entry is read, its tokens named then by ``texts``
    (token id -> text, e.g. a `sagellm_core.detokenizer.TokenTexts`).

    Equal to any sequence of equal `TokenLogprob` entries. Entries are only ever appended, so
    `snapshot` shares the storage: a read-only view of the entries so far, in O(1)."""

    __slots__ = ("texts", "token_ids", "logprobs", "top_ids", "top_logprobs", "_end")

    def __init__(self, texts: Mapping[int, str]) -> None:
        self.texts = texts
        self.token_ids: list[int] = []
        self.logprobs: list[float] = []
        self.top_ids: list[list[int]] = []
        self.top_logprobs: list[list[float]] = []
        self._end: int | None = None  # a snapshot's length; None in the container that grows

    def append(self, token_id: int, logprob: float, top_ids: list[int], top_logprobs: list[float]) -> None:
        """Add the next token's entry (the lists are kept, not copied)."""
        if self._end is not None:
            raise TypeError("a TokenLogprobs snapshot is read-only")
        self.token_ids.append(token_id)
        self.logprobs.append(logprob)
        self.top_ids.append(top_ids)
        self.top_logprobs.append(top_logprobs)

    def snapshot(self) -> TokenLogprobs:
        """A read-only view of the current entries; later appends to this container are not in it."""
        view = TokenLogprobs.__new__(TokenLogprobs)
        view.texts, view.token_ids, view.logprobs = self.texts, self.token_ids, self.logprobs
        view.top_ids, view.top_logprobs, view._end = self.top_ids, self.top_logprobs, len(self)
        return view

    def flat(self, start: int = 0) -> FlatLogprobs:
        """Entries ``start:`` as `FlatLogprobs` (new lists of the stored values)."""
        end = len(self)
        return (self.token_ids[start:end], self.logprobs[start:end], self.top_ids[start:end],
                self.top_logprobs[start:end])

    def __len__(self) -> int:
        return len(self.token_ids) if self._end is None else self._end

    def _entry(self, index: int) -> TokenLogprob:
        texts, token_id = self.texts, self.token_ids[index]
        top = [(tid, texts[tid], lp) for tid, lp in zip(self.top_ids[index], self.top_logprobs[index])]
        return TokenLogprob(token_id, texts[token_id], self.logprobs[index], top)

    @overload
    def __getitem__(self, index: int) -> TokenLogprob: ...

    @overload
    def __getitem__(self, index: slice) -> list[TokenLogprob]: ...

    def __getitem__(self, index: int | slice) -> TokenLogprob | list[TokenLogprob]:
        if isinstance(index, slice):
            return [self._entry(i) for i in range(*index.indices(len(self)))]
        size = len(self)
        if index < 0:
            index += size
        if not 0 <= index < size:
            raise IndexError("TokenLogprobs index out of range")
        return self._entry(index)

    def __iter__(self) -> Iterator[TokenLogprob]:
        return (self._entry(i) for i in range(len(self)))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Sequence):
            return NotImplemented
        return len(self) == len(other) and all(a == b for a, b in zip(self, other))

    def __repr__(self) -> str:
        return f"TokenLogprobs({list(self)!r})"


@attrs.define
class CompletionOutput:
    """One of the ``n`` completions of a request. ``text``/``token_ids`` are cumulative; ``delta_*`` new."""

    index: int
    text: str = ""
    token_ids: list[int] = attrs.field(factory=list)
    delta_text: str = ""
    delta_token_ids: list[int] = attrs.field(factory=list)
    finish_reason: str | None = None  # "stop" | "length" | "abort" | "error"
    stop_reason: str | int | None = None
    logprobs: TokenLogprobs | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@attrs.define
class RequestMetrics:
    arrival_time: float
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    last_token_time: float | None = None
    finished_time: float | None = None
    num_cached_tokens: int = 0
    num_preemptions: int = 0

    @property
    def ttft(self) -> float | None:
        return None if self.first_token_time is None else self.first_token_time - self.arrival_time

    @property
    def e2e(self) -> float | None:
        return None if self.finished_time is None else self.finished_time - self.arrival_time


@attrs.define
class RequestOutput:
    """State of a request after a step (or at the end). ``finished`` once every completion finished.

    ``error``: set when processing this request failed inside a step (its finish reason is then
    ``"error"``); the other requests of the step went on."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    metrics: RequestMetrics | None = None
    error: str | None = None

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids
