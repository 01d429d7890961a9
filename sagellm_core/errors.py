"""User-facing error hierarchy. Every error sageLLM raises on purpose derives from `SageLLMError`."""

from __future__ import annotations


class SageLLMError(Exception):
    """Base class of every error sageLLM raises for a user to read."""


class ConfigError(SageLLMError, ValueError):
    """A configuration value is invalid; the message names the field path (`scheduler.max_num_seqs`)."""


class PluginError(SageLLMError):
    """A plugin could not be loaded, is incompatible, or misbehaved."""


class BackendUnavailableError(PluginError):
    """The requested backend is missing, failed to load, or found no device."""


class ModelLoadError(SageLLMError):
    """A model path is unknown or its files are unreadable or corrupt."""


class InvalidRequestError(SageLLMError, ValueError):
    """A request is malformed: empty prompt, bad sampling parameters, prompt longer than the context.
    ``param`` names the offending parameter where one is to blame."""

    def __init__(self, message: str = "", param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class PromptTooLongError(InvalidRequestError):
    """The prompt (plus at least one generated token) does not fit the model's context."""


class EngineOverloadedError(SageLLMError):
    """The waiting queue is full; the caller should retry later."""


class EngineDeadError(SageLLMError):
    """The engine loop stopped because of an unrecoverable error."""
