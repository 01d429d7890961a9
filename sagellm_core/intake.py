"""Request intake shared by the library `LLM` (engine on a thread) and the server's `EngineClient`
(engine in a process): ids, the table of unfinished requests, validation and tokenization in a small
worker pool, and refusal once the engine is gone. What happens to a prepared request (queued for
the engine thread, or sent over ZMQ) is the subclass's `_dispatch`."""

from __future__ import annotations

import threading
import uuid
from abc import ABC, abstractmethod
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, TypeVar

from sagellm_core.errors import EngineDeadError, InvalidRequestError, SageLLMError
from sagellm_core.health import EngineHealth, StallWatchdog
from sagellm_core.inputs import InputProcessor, ProcessedPrompt
from sagellm_core.sampling_params import SamplingParams
from sagellm_core.streams import RequestStream

T = TypeVar("T")


class RequestIntake(ABC):
    """`submit` / `chat` / `process_inputs` over an input worker pool, for a subclass that calls
    `_init_requests`, sets ``inputs``, calls `_start_intake`, keeps ``_dead`` / ``_stopped`` current, and dispatches
    prepared requests (`_dispatch`)."""

    inputs: InputProcessor
    watchdog: StallWatchdog | None
    _dead: EngineDeadError | None = None
    _stopped: bool = False

    def _init_requests(self) -> None:
        """The table of unfinished requests (before anything that may fail them starts)."""
        self._requests: dict[str, RequestStream] = {}  # every unfinished request, from submit on
        self._requests_lock = threading.Lock()

    def _start_intake(self, input_workers: int, stall_timeout_s: float | None) -> None:
        """The input pool and the stall watchdog (sampling `_progress_sample`)."""
        self._pool = ThreadPoolExecutor(max_workers=input_workers, thread_name_prefix="sagellm-input")
        self.watchdog = StallWatchdog(stall_timeout_s) if stall_timeout_s is not None else None
        self._stop_watchdog = (self.watchdog.start(self._progress_sample, min(1.0, self.watchdog.timeout_s / 4))
                               if self.watchdog is not None else None)

    # ---- for the subclass ----------------------------------------------------------------------
    @abstractmethod
    def _dispatch(self, stream: RequestStream, prompt: ProcessedPrompt, params: SamplingParams, priority: int,
                  incremental: bool) -> None:
        """Hand a validated, tokenized request to the engine (an input worker calls this)."""

    @abstractmethod
    def _progress_sample(self) -> tuple[Any, bool]:
        """(the engine's progress marker, whether requests are waiting), for the stall watchdog."""

    def _end(self, stream: RequestStream, error: BaseException) -> None:
        """Fail ``stream`` with ``error`` and forget it."""
        stream.fail(error)
        self._forget(stream.request_id)

    def _forget(self, request_id: str) -> RequestStream | None:
        """Drop a request from the table (finished, failed); returns its stream if it was there."""
        with self._requests_lock:
            return self._requests.pop(request_id, None)

    def _take_requests(self) -> list[RequestStream]:
        """Empty the table, returning every stream that was in it."""
        with self._requests_lock:
            pending = list(self._requests.values())
            self._requests.clear()
        return pending

    def _request(self, request_id: str) -> RequestStream | None:
        with self._requests_lock:
            return self._requests.get(request_id)

    def _gone(self) -> EngineDeadError | None:
        """Why no request can be served any more (the engine died or was shut down), else None."""
        return self._dead or (EngineDeadError("the engine has been shut down") if self._stopped else None)

    def _check_alive(self) -> None:
        error = self._gone()
        if error is not None:
            raise error

    def _stop_intake(self) -> None:
        """Stop the watchdog and the input pool (queued inputs are cancelled)."""
        if self._stop_watchdog is not None:
            self._stop_watchdog.set()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _health(self, stopped: bool) -> EngineHealth:
        """``dead``, ``stopped`` (when ``stopped``), ``stalled`` (watchdog) or ``ok``."""
        if self._dead is not None:
            return EngineHealth("dead", str(self._dead))
        if stopped:
            return EngineHealth("stopped", "the engine has been shut down")
        if self.watchdog is not None and self.watchdog.stalled_for is not None:
            return EngineHealth("stalled", f"no engine step completed for {self.watchdog.stalled_for:.0f} s "
                                           f"while requests are waiting")
        return EngineHealth("ok")

    def _busy(self) -> bool:
        with self._requests_lock:
            return bool(self._requests)

    # ---- intake --------------------------------------------------------------------------------
    def _submit(self, make_prompt: Callable[[], ProcessedPrompt], params: SamplingParams | None,
                request_id: str | None, priority: int, incremental: bool) -> RequestStream:
        self._check_alive()
        stream = RequestStream(request_id or f"req-{uuid.uuid4().hex[:12]}")
        with self._requests_lock:
            duplicate = stream.request_id in self._requests
            if not duplicate:
                self._requests[stream.request_id] = stream
        if duplicate:
            stream.fail(InvalidRequestError(f"request id {stream.request_id!r} is already in use"))
            return stream
        try:
            self._pool.submit(self._prepare, stream, make_prompt, params, priority, incremental)
        except RuntimeError:  # the pool was shut down meanwhile
            self._end(stream, EngineDeadError("the engine has been shut down"))
        return stream

    def _prepare(self, stream: RequestStream, make_prompt: Callable[[], ProcessedPrompt], params: Any,
                 priority: int, incremental: bool) -> None:
        """Input pool: validate and tokenize, then dispatch; a request dispatched after the engine went
        away is failed here (the engine side fails what it had queued when it stops)."""
        try:
            checked = self.inputs.check_params(params)
            prompt = make_prompt()
        except Exception as exc:
            self._end(stream, exc)
            return
        stream.prompt_text = prompt.text
        self._dispatch(stream, prompt, checked, priority, incremental)
        error = self._gone()
        if error is not None:
            self._end(stream, error)

    # ---- public API ----------------------------------------------------------------------------
    def submit(self, prompt: str | list[int] | ProcessedPrompt, params: SamplingParams | None = None, *,
               request_id: str | None = None, priority: int = 0, stream: bool = True) -> RequestStream:
        """Queue one request; returns its stream at once (iterate it sync or async).

        Validation and tokenization run in the input pool; their errors (`InvalidRequestError`,
        `PromptTooLongError`) come out of the stream. ``stream=False``: the stream carries only the
        final output (less work per step). Raises `EngineDeadError` when the engine is gone.
        """
        return self._submit(lambda: self.inputs.process(prompt), params, request_id, priority, stream)

    def chat(self, messages: list[dict[str, Any]], params: SamplingParams | None = None, *,
             chat_template_kwargs: dict[str, Any] | None = None, request_id: str | None = None,
             priority: int = 0, stream: bool = True) -> RequestStream:
        """Apply the model's chat template (in the input pool) and stream the reply."""
        return self._submit(lambda: self.inputs.process_chat(messages, chat_template_kwargs), params, request_id,
                            priority, stream)

    def process_inputs(self, function: Callable[..., T], *args: Any) -> "Future[T]":
        """Run ``function(*args)`` in the input worker pool (tokenizing, chat templates)."""
        self._check_alive()
        return self._pool.submit(function, *args)

    def _fail_requests(self, error: SageLLMError) -> None:
        """Fail every request in the table with ``error``."""
        for stream in self._take_requests():
            stream.fail(error)
