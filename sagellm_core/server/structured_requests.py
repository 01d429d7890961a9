"""Structured-output options of a request body, as OpenAI and vLLM name them, turned into one
`StructuredOutputsParams`; a bad schema, regex or grammar is a 400 naming the field it came in.

* OpenAI: ``response_format`` ``{"type": "json_object"}`` or ``{"type": "json_schema", "json_schema":
  {"name", "schema", "strict"}}`` (what ``client.beta.chat.completions.parse`` sends).
* vLLM: ``structured_outputs: {json | regex | grammar | choice | json_object}`` and the older
  ``guided_json``, ``guided_regex``, ``guided_grammar``, ``guided_choice``.
"""

from __future__ import annotations

from typing import Any

import attrs

from sagellm_core.errors import InvalidRequestError
from sagellm_core.server.errors import APIError
from sagellm_core.structured.grammar import compile_grammar
from sagellm_core.structured.params import StructuredOutputsParams

GUIDED_FIELDS = {"guided_json": "json", "guided_regex": "regex", "guided_grammar": "grammar",
                 "guided_choice": "choice"}


def from_response_format(response_format: dict[str, Any] | None) -> StructuredOutputsParams | None:
    """The constraint of an OpenAI ``response_format`` (None for ``text`` or absent)."""
    if not response_format:
        return None
    kind = response_format.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return StructuredOutputsParams(json_object=True)
    if kind == "json_schema":
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema"), (dict, bool)):
            raise APIError(400, "response_format.json_schema.schema: a JSON schema object is required",
                           param="response_format")
        return StructuredOutputsParams(json=spec["schema"])
    raise APIError(400, f"response_format.type must be text, json_object or json_schema, got {kind!r}",
                   param="response_format")


def from_structured_outputs(value: dict[str, Any]) -> StructuredOutputsParams:
    """The constraint of vLLM's ``structured_outputs`` object."""
    fields = set(attrs.fields_dict(StructuredOutputsParams))
    unknown = sorted(set(value) - fields)
    if unknown:
        raise APIError(400, f"structured_outputs: unknown field(s) {unknown}; expected some of {sorted(fields)}",
                       param="structured_outputs")
    return StructuredOutputsParams(**{k: v for k, v in value.items() if v is not None})


def request_constraint(body: Any) -> StructuredOutputsParams | None:
    """The one constraint a request body asks for, compiled once to check it (400 if it is bad)."""
    sources: list[tuple[str, Any]] = []
    if getattr(body, "response_format", None):
        sources.append(("response_format", lambda: from_response_format(body.response_format)))
    if getattr(body, "structured_outputs", None):
        sources.append(("structured_outputs", lambda: from_structured_outputs(body.structured_outputs)))
    for field, kind in GUIDED_FIELDS.items():
        value = getattr(body, field, None)
        if value is not None:
            sources.append((field, lambda kind=kind, value=value: StructuredOutputsParams(**{kind: value})))
    if len(sources) > 1:
        names = ", ".join(name for name, _ in sources)
        raise APIError(400, f"only one structured-output option may be given, got {names}", param=sources[1][0])
    if not sources:
        return None
    field, build = sources[0]
    return checked(build, field)


def checked(build: Any, field: str) -> StructuredOutputsParams | None:
    """``build()`` with its grammar compiled; errors become a 400 whose ``param`` is ``field``."""
    try:
        constraint = build()
        if constraint is not None:
            compile_grammar(constraint)
        return constraint
    except InvalidRequestError as exc:
        message = str(exc)
        if message.startswith("structured_outputs"):
            message = message.split(": ", 1)[-1]
        raise APIError(400, f"{field}: {message}", param=field) from None
