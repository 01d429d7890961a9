"""What a constrained request asks for: exactly one of a JSON schema, any JSON object, a regex, a
grammar (Lark or GBNF) or a choice of strings (vLLM's ``structured_outputs`` names)."""

from __future__ import annotations

import json
from typing import Any

import attrs

from sagellm_core.errors import InvalidRequestError

KINDS = ("json", "json_object", "regex", "grammar", "choice")


def _schema(value: Any) -> Any:
    """A JSON schema given as a string is parsed (a bad string is reported by `validate`)."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


@attrs.define(kw_only=True, frozen=True)
class StructuredOutputsParams:
    """One constraint on the generated text. ``json`` is a JSON schema (dict or JSON text);
    ``json_object`` any JSON object; ``regex`` a regular expression the whole output matches;
    ``grammar`` a Lark or GBNF grammar; ``choice`` the output is exactly one of these strings.

    ``whitespace_flexible`` lets JSON contain any whitespace between tokens; off by default (items
    are separated by ``", "`` and keys by ``": "``), which keeps small models from wandering into
    endless whitespace.
    """

    json: Any = attrs.field(default=None, converter=_schema)
    json_object: bool = False
    regex: str | None = None
    grammar: str | None = None
    choice: list[str] | None = attrs.field(default=None, converter=lambda c: None if c is None else list(c))
    whitespace_flexible: bool = False

    def __attrs_post_init__(self) -> None:
        self.validate()

    @property
    def kind(self) -> str:
        """Which constraint this is: one of `KINDS`."""
        for kind in KINDS:
            value = getattr(self, kind)
            if value is not None and value is not False:
                return kind
        raise InvalidRequestError("structured_outputs: one of json, json_object, regex, grammar, choice is required")

    def validate(self) -> None:
        """Raise `InvalidRequestError` naming the field when the shape is wrong (the grammar itself is
        checked when it is compiled, see `sagellm_core.structured.grammar`)."""
        given = [k for k in KINDS if getattr(self, k) is not None and getattr(self, k) is not False]
        if len(given) != 1:
            raise InvalidRequestError(
                f"structured_outputs: exactly one of {', '.join(KINDS)} must be set, got {given or 'none'}")
        if self.json is not None and not isinstance(self.json, (dict, bool)):
            raise InvalidRequestError("structured_outputs.json: must be a JSON schema (an object or its JSON text)")
        if self.regex is not None and (not isinstance(self.regex, str) or not self.regex):
            raise InvalidRequestError("structured_outputs.regex: must be a non-empty string")
        if self.grammar is not None and (not isinstance(self.grammar, str) or not self.grammar.strip()):
            raise InvalidRequestError("structured_outputs.grammar: must be a non-empty string")
        if self.choice is not None and (not self.choice or not all(isinstance(c, str) and c for c in self.choice)):
            raise InvalidRequestError("structured_outputs.choice: must be a non-empty list of non-empty strings")

    def cache_key(self) -> str:
        """A string that identifies the compiled grammar (equal constraints share it)."""
        value = getattr(self, self.kind)
        return json.dumps([self.kind, value, self.whitespace_flexible], sort_keys=True)
