"""Per-request sampling parameters, validated completely (types too) when built or changed.

Validation happens here and only here: a `SamplingParams` that exists is valid, so the input path
and the engine need not check it again. Every error is an `InvalidRequestError` naming the parameter.
"""

from __future__ import annotations

import math
from typing import Any

import attrs

from sagellm_core.errors import InvalidRequestError
from sagellm_core.structured.params import StructuredOutputsParams

GREEDY_EPSILON = 1e-5  # temperatures below this sample greedily (vLLM's _SAMPLING_EPS)
SEED_MIN, SEED_MAX = -(2**63), 2**63 - 1  # a signed 64-bit seed, as vLLM's and OpenAI's APIs take
MAX_LOGPROBS = 20
LOGIT_BIAS_LIMIT = 100.0  # OpenAI's range for a logit_bias value


def _fail(name: str, message: str, value: Any) -> None:
    raise InvalidRequestError(f"{name} {message}, got {value!r}", param=name)


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _int_at_least(minimum: int, optional: bool = False) -> Any:
    def check(_: Any, attribute: attrs.Attribute, value: Any) -> None:
        if optional and value is None:
            return
        if not _integer(value):
            _fail(attribute.name, "must be an integer" + (" or null" if optional else ""), value)
        if value < minimum:
            _fail(attribute.name, f"must be >= {minimum}", value)
    return check


def _float_in(low: float, high: float, *, low_open: bool = False, high_open: bool = False) -> Any:
    def check(_: Any, attribute: attrs.Attribute, value: Any) -> None:
        if not _number(value):
            _fail(attribute.name, "must be a finite number", value)
        if (value <= low if low_open else value < low) or (value >= high if high_open else value > high):
            bounds = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
            _fail(attribute.name, f"must be in {bounds}", value)
    return check


def _boolean(_: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, bool):
        _fail(attribute.name, "must be a boolean", value)


def _seed(_: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is None:
        return
    if not _integer(value):
        _fail("seed", "must be an integer or null", value)
    if not SEED_MIN <= value <= SEED_MAX:
        _fail("seed", f"must be a signed 64-bit integer (in [{SEED_MIN}, {SEED_MAX}])", value)


def _cache_salt(_: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None and (not isinstance(value, str) or not value):
        _fail("cache_salt", "must be a non-empty string or null", value)


def _stop_strings(_: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, list) or not all(isinstance(s, str) and s for s in value):
        _fail(attribute.name, "must be a non-empty string or a list of non-empty strings", value)


def _token_ids(_: Any, attribute: attrs.Attribute, value: Any) -> None:
    if not isinstance(value, list) or not all(_integer(t) and t >= 0 for t in value):
        _fail(attribute.name, "must be a list of non-negative integers", value)


def _logit_bias_keys(value: Any) -> Any:
    """OpenAI sends token ids as JSON object keys (strings): ``{"50256": -100}`` -> ``{50256: -100}``."""
    if isinstance(value, dict):
        return {int(k) if isinstance(k, str) and k.strip().isdigit() else k: v for k, v in value.items()}
    return value


def _logit_bias(_: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is None:
        return
    if not isinstance(value, dict):
        _fail("logit_bias", "must be a mapping of token id to bias, or null", value)
    for token, bias in value.items():
        if not _integer(token) or token < 0:
            _fail("logit_bias", "keys must be non-negative token ids", token)
        if not _number(bias) or not -LOGIT_BIAS_LIMIT <= bias <= LOGIT_BIAS_LIMIT:
            _fail("logit_bias", f"values must be numbers in [{-LOGIT_BIAS_LIMIT:g}, {LOGIT_BIAS_LIMIT:g}]", bias)


def _as_list(value: Any) -> Any:
    """``"x"`` -> ``["x"]``, None -> ``[]``, a tuple -> a list; anything else is left for the validator."""
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return list(value) if isinstance(value, tuple) else value


def _structured(value: Any) -> Any:
    """A `StructuredOutputsParams`, also from a dict of its fields (``{"json": schema}``)."""
    if isinstance(value, dict):
        unknown = set(value) - set(attrs.fields_dict(StructuredOutputsParams))
        if unknown:
            raise InvalidRequestError(f"structured_outputs: unknown field(s) {sorted(unknown)}",
                                      param="structured_outputs")
        return StructuredOutputsParams(**value)
    return value


def _structured_type(_: Any, attribute: attrs.Attribute, value: Any) -> None:
    if value is not None and not isinstance(value, StructuredOutputsParams):
        _fail(attribute.name, "must be a StructuredOutputsParams (or a dict of its fields)", value)


@attrs.define(kw_only=True, on_setattr=[attrs.setters.convert, attrs.setters.validate])
class SamplingParams:
    """How to pick tokens and when to stop (vLLM / OpenAI meanings).

    ``temperature`` below 1e-5 (0 included) is greedy. ``seed`` (a signed 64-bit integer; larger
    ones are rejected) makes this request's samples independent of the rest of the batch. ``stop``
    strings are cut from the output; ``stop_token_ids`` end generation (the token is not shown).
    ``logprobs`` = k returns the chosen token's logprob plus the top-k alternatives.
    Bad values, wrong types (``seed="x"``, ``True`` for an integer), NaN and infinities raise
    `InvalidRequestError` naming the parameter, at construction or on assignment.
    ``logit_bias`` ({token id: bias in [-100, 100]}, OpenAI's) is added to those logits before
    sampling. ``bad_words``: the single-token forms of each word (the word, and the word after a
    space, as vLLM tokenizes them) are never sampled; a word with no single-token form is refused
    when the request is added (banning a multi-token sequence needs the host's view of the last
    tokens, which the asynchronous pipeline does not have).
    ``structured_outputs`` constrains the text to a JSON schema, regex, grammar or choice
    (`StructuredOutputsParams`, or a dict of its fields). Requests with different ``cache_salt``
    values never share cached KV blocks (the salt enters the first block's hash), on any tier.
    """

    n: int = attrs.field(default=1, validator=_int_at_least(1))
    max_tokens: int | None = attrs.field(default=16, validator=_int_at_least(1, optional=True))
    min_tokens: int = attrs.field(default=0, validator=_int_at_least(0))
    temperature: float = attrs.field(default=1.0, validator=_float_in(0.0, math.inf, high_open=True))
    top_p: float = attrs.field(default=1.0, validator=_float_in(0.0, 1.0, low_open=True))
    top_k: int = attrs.field(default=0, validator=_int_at_least(0))
    min_p: float = attrs.field(default=0.0, validator=_float_in(0.0, 1.0))
    repetition_penalty: float = attrs.field(default=1.0, validator=_float_in(0.0, math.inf, low_open=True,
                                                                              high_open=True))
    presence_penalty: float = attrs.field(default=0.0, validator=_float_in(-2.0, 2.0))
    frequency_penalty: float = attrs.field(default=0.0, validator=_float_in(-2.0, 2.0))
    seed: int | None = attrs.field(default=None, validator=_seed)
    stop: list[str] = attrs.field(factory=list, converter=_as_list, validator=_stop_strings)
    stop_token_ids: list[int] = attrs.field(factory=list, converter=_as_list, validator=_token_ids)
    ignore_eos: bool = attrs.field(default=False, validator=_boolean)
    logprobs: int | None = attrs.field(default=None, validator=_int_at_least(0, optional=True))
    skip_special_tokens: bool = attrs.field(default=True, validator=_boolean)
    logit_bias: dict[int, float] | None = attrs.field(default=None, converter=_logit_bias_keys, validator=_logit_bias)
    bad_words: list[str] = attrs.field(factory=list, converter=_as_list, validator=_stop_strings)
    structured_outputs: StructuredOutputsParams | None = attrs.field(default=None, converter=_structured,
                                                                     validator=_structured_type)
    cache_salt: str | None = attrs.field(default=None, validator=_cache_salt)

    def __attrs_post_init__(self) -> None:
        self._check_together()

    def _check_together(self) -> None:
        if self.logprobs is not None and self.logprobs > MAX_LOGPROBS:
            _fail("logprobs", f"must be in [0, {MAX_LOGPROBS}]", self.logprobs)
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise InvalidRequestError(f"min_tokens ({self.min_tokens}) must be <= max_tokens ({self.max_tokens})",
                                      param="min_tokens")

    def validate(self) -> None:
        """Check every parameter again (they are checked on construction and assignment already;
        kept for callers that mutate lists in place)."""
        attrs.validate(self)
        self._check_together()

    @property
    def greedy(self) -> bool:
        """Argmax sampling: temperature 0, or one so small that dividing by it would overflow."""
        return self.temperature < GREEDY_EPSILON

    @property
    def needs_filtering(self) -> bool:
        """top-k, top-p or min-p restricts the candidates (a sort or a threshold over the vocabulary)."""
        return self.top_k > 0 or self.top_p < 1.0 or self.min_p > 0.0

    @property
    def needs_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def replace(self, **changes: Any) -> "SamplingParams":
        return attrs.evolve(self, **changes)
