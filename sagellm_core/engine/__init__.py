"""The engine: `LLMEngine` (core.py: the step loop) and its parts: admission, builder, output
processing, metric events."""

from sagellm_core.engine.core import LLMEngine

__all__ = ["LLMEngine"]
