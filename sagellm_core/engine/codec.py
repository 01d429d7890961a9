"""The wire format between front ends and engine processes: one frame per message, pickle protocol 5.

Messages are tuples of plain data whose first item names the kind (`Kind`). Pickle carries
`SamplingParams` (structured-output parameters included) and the engine's delta `RequestOutput`s as
they are, without a schema to keep in step; the sockets are local (``ipc://`` in a directory only
this user can read), and only processes of one server talk over them. Errors cross as (class name,
message, param) and are rebuilt as the same `sagellm_core.errors` class, so the server maps them to
the same HTTP statuses as in-process errors.
"""

from __future__ import annotations

import pickle
from typing import Any

from sagellm_core import errors


class Kind:
    """Message kinds. Front end -> engine: ADD, ABORT, STOP, CALL. Engine -> front end: OUTPUTS
    (one per engine step, every output of that step for this front end), PROGRESS (a step without
    outputs, at most once a second), REJECTED (a request the engine refused), FAILED (a step failed:
    every request of this front end failed), RESULT (the answer to a CALL)."""

    ADD = "add"
    ABORT = "abort"
    STOP = "stop"
    CALL = "call"
    OUTPUTS = "outputs"
    PROGRESS = "progress"
    REJECTED = "rejected"
    FAILED = "failed"
    RESULT = "result"


def encode(message: tuple[Any, ...]) -> bytes:
    """One message as one frame."""
    return pickle.dumps(message, protocol=5)


def decode(frame: bytes | memoryview) -> tuple[Any, ...]:
    """The message of one frame."""
    message = pickle.loads(frame)
    if not isinstance(message, tuple) or not message:
        raise ValueError(f"not a sageLLM IPC message: {type(message).__name__}")
    return message


def encode_error(error: BaseException) -> tuple[str, str, str | None]:
    """An exception as plain data: its class name (a `sagellm_core.errors` class or not), message, param."""
    return type(error).__name__, str(error), getattr(error, "param", None)


def decode_error(data: tuple[str, str, str | None]) -> errors.SageLLMError:
    """The `sagellm_core.errors` exception of `encode_error`'s data; other classes become
    `EngineDeadError` naming the original class (an engine-side failure the front end cannot mend)."""
    name, message, param = data
    cls = getattr(errors, name, None)
    if isinstance(cls, type) and issubclass(cls, errors.InvalidRequestError):
        return cls(message, param=param)
    if isinstance(cls, type) and issubclass(cls, errors.SageLLMError):
        return cls(message)
    return errors.EngineDeadError(f"{name}: {message}")
