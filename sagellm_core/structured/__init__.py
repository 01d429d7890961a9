"""Structured outputs: constraints (JSON schema, JSON object, regex, Lark/GBNF grammar, choice)
compiled with llguidance, per-request matchers, and token bitmasks applied on the device."""

from sagellm_core.structured.params import StructuredOutputsParams

__all__ = ["StructuredOutputs", "StructuredOutputsParams"]


def __getattr__(name: str):  # noqa: ANN202 - the manager imports torch and llguidance: load it on use
    if name == "StructuredOutputs":
        from sagellm_core.structured.manager import StructuredOutputs

        return StructuredOutputs
    raise AttributeError(name)
