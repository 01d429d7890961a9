"""Constraints compiled into llguidance grammars, and their validation (errors name the field).

llguidance covers JSON schema, regular expressions, Lark and GBNF with no further dependencies;
xgrammar (vLLM's and SGLang's default) was measured as well but pulls triton and a CUDA torch build
into a CPU install.
"""

from __future__ import annotations

import json

import llguidance
from llguidance.gbnf_to_lark import any_to_lark

from sagellm_core.errors import InvalidRequestError
from sagellm_core.structured.params import StructuredOutputsParams

COMPACT_JSON = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def json_schema_grammar(schema: dict | bool, whitespace_flexible: bool = False) -> str:
    """The llguidance grammar of a JSON schema."""
    overrides = {"whitespace_flexible": True} if whitespace_flexible else COMPACT_JSON
    return llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=overrides)  # type: ignore[arg-type]


def choice_lark(choices: list[str]) -> str:
    """A Lark grammar whose language is exactly ``choices``."""
    return "start: " + " | ".join(json.dumps(choice) for choice in choices)


def to_grammar(params: StructuredOutputsParams) -> str:
    """The llguidance grammar text for ``params`` (not yet validated)."""
    kind = params.kind
    try:
        if kind == "json":
            return json_schema_grammar(params.json, params.whitespace_flexible)
        if kind == "json_object":
            return json_schema_grammar({"type": "object"}, params.whitespace_flexible)
        if kind == "regex":
            # \d and \w mean ASCII digits and word characters (as most clients expect), not Unicode's
            return llguidance.LLMatcher.grammar_from_regex(llguidance.regex_to_lark(params.regex or "", "dw"))
        if kind == "grammar":
            return llguidance.LLMatcher.grammar_from_lark(any_to_lark(params.grammar))  # type: ignore[arg-type]
        return llguidance.LLMatcher.grammar_from_lark(choice_lark(params.choice))  # type: ignore[arg-type]
    except Exception as exc:  # the converters raise ValueError and friends for malformed input
        raise InvalidRequestError(f"structured_outputs.{kind}: {exc}") from None


def compile_grammar(params: StructuredOutputsParams) -> str:
    """The validated llguidance grammar for ``params``; `InvalidRequestError` names the problem."""
    grammar = to_grammar(params)
    is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar)
    if is_error:
        raise InvalidRequestError(f"structured_outputs.{params.kind}: invalid {_what(params.kind)}: "
                                  f"{messages[0] if messages else 'rejected by the grammar compiler'}")
    return grammar


def _what(kind: str) -> str:
    return {"json": "JSON schema", "json_object": "JSON schema", "regex": "regular expression",
            "grammar": "grammar", "choice": "choice list"}[kind]
