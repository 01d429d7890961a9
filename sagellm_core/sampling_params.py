"""Per-request sampling parameters, validated on construction."""

from __future__ import annotations

from typing import Any

import attrs

from sagellm_core.errors import InvalidRequestError
from sagellm_core.structured.params import StructuredOutputsParams


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise InvalidRequestError(message)


def _structured(value: Any) -> StructuredOutputsParams | None:
    """A `StructuredOutputsParams`, also from a dict of its fields (``{"json": schema}``)."""
    if isinstance(value, dict):
        unknown = set(value) - set(attrs.fields_dict(StructuredOutputsParams))
        if unknown:
            raise InvalidRequestError(f"structured_outputs: unknown field(s) {sorted(unknown)}")
        return StructuredOutputsParams(**value)
    return value


@attrs.define(kw_only=True)
class SamplingParams:
    """How to pick tokens and when to stop (vLLM / OpenAI meanings).

    ``temperature`` 0 is greedy. ``seed`` makes this request's samples independent of the rest of the
    batch. ``stop`` strings are cut from the output; ``stop_token_ids`` end generation (the token is
    not shown). ``logprobs`` = k returns the chosen token's logprob plus the top-k alternatives.
    ``structured_outputs`` constrains the text to a JSON schema, regex, grammar or choice
    (`StructuredOutputsParams`, or a dict of its fields).
    """

    n: int = 1
    max_tokens: int | None = 16
    min_tokens: int = 0
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    seed: int | None = None
    stop: list[str] = attrs.field(factory=list, converter=lambda s: [s] if isinstance(s, str) else list(s or []))
    stop_token_ids: list[int] = attrs.field(factory=list, converter=lambda s: list(s or []))
    ignore_eos: bool = False
    logprobs: int | None = None
    skip_special_tokens: bool = True
    structured_outputs: StructuredOutputsParams | None = attrs.field(default=None, converter=_structured)

    def __attrs_post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise `InvalidRequestError` naming the first bad parameter."""
        _check(isinstance(self.n, int) and self.n >= 1, f"n must be >= 1, got {self.n}")
        _check(self.max_tokens is None or self.max_tokens >= 1, f"max_tokens must be >= 1, got {self.max_tokens}")
        _check(self.min_tokens >= 0, f"min_tokens must be >= 0, got {self.min_tokens}")
        _check(self.max_tokens is None or self.min_tokens <= self.max_tokens,
               f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})")
        _check(self.temperature >= 0.0, f"temperature must be >= 0, got {self.temperature}")
        _check(0.0 < self.top_p <= 1.0, f"top_p must be in (0, 1], got {self.top_p}")
        _check(self.top_k >= 0, f"top_k must be >= 0 (0 = off), got {self.top_k}")
        _check(0.0 <= self.min_p <= 1.0, f"min_p must be in [0, 1], got {self.min_p}")
        _check(self.repetition_penalty > 0.0, f"repetition_penalty must be > 0, got {self.repetition_penalty}")
        _check(-2.0 <= self.presence_penalty <= 2.0, f"presence_penalty must be in [-2, 2], got {self.presence_penalty}")
        _check(-2.0 <= self.frequency_penalty <= 2.0,
               f"frequency_penalty must be in [-2, 2], got {self.frequency_penalty}")
        _check(self.logprobs is None or 0 <= self.logprobs <= 20, f"logprobs must be in [0, 20], got {self.logprobs}")
        _check(all(isinstance(s, str) and s for s in self.stop), "stop strings must be non-empty strings")
        _check(self.structured_outputs is None or isinstance(self.structured_outputs, StructuredOutputsParams),
               "structured_outputs must be a StructuredOutputsParams (or a dict of its fields)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def needs_filtering(self) -> bool:
        """top-k, top-p or min-p restricts the candidates (a sort or a threshold over the vocabulary)."""
        return self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0

    @property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def replace(self, **changes: Any) -> "SamplingParams":
        return attrs.evolve(self, **changes)
