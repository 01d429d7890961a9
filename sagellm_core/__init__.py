"""sageLLM core: a pluggable LLM inference engine.

    from sagellm_core import LLM, SamplingParams
    with LLM() as llm:                      # embedded default model
        print(llm.generate(["Hello"], SamplingParams(max_tokens=16))[0].text)
"""

from __future__ import annotations

__version__ = "0.1.0"

PLUGIN_API_VERSION = "1.0"
"""Version of the hook API; plugins declare the range they support in `SAGELLM_PLUGIN_API`."""

from sagellm_core.errors import (  # noqa: E402
    ConfigError,
    InvalidRequestError,
    ModelLoadError,
    PluginError,
    SageLLMError,
)

__all__ = [
    "PLUGIN_API_VERSION",
    "ConfigError",
    "InvalidRequestError",
    "ModelLoadError",
    "PluginError",
    "SageLLMError",
    "__version__",
]


def __getattr__(name: str):  # lazy: importing sagellm_core must stay cheap (no torch at import)
    lazy = {
        "LLM": ("sagellm_core.llm", "LLM"),
        "AsyncLLM": ("sagellm_core.async_llm", "AsyncLLM"),
        "SamplingParams": ("sagellm_core.sampling_params", "SamplingParams"),
        "StructuredOutputsParams": ("sagellm_core.structured.params", "StructuredOutputsParams"),
        "EngineConfig": ("sagellm_core.config", "EngineConfig"),
        "RequestOutput": ("sagellm_core.outputs", "RequestOutput"),
        "CompletionOutput": ("sagellm_core.outputs", "CompletionOutput"),
        "hookimpl": ("sagellm_core.hookspecs", "hookimpl"),
    }
    if name in lazy:
        import importlib

        module, attr = lazy[name]
        return getattr(importlib.import_module(module), attr)
    raise AttributeError(f"module 'sagellm_core' has no attribute {name!r}")
