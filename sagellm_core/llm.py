"""The library API: `LLM` runs an `LLMEngine` on a background loop thread.

    with LLM(scheduler={"name": "priority"}) as llm:
        outs = llm.generate(["Hello", "Bonjour"], SamplingParams(max_tokens=32))
        for out in llm.generate_stream("Tell me a story"):      # sync iterator
            print(out.outputs[0].delta_text, end="")
        final = await llm.generate_async("Hi")                  # coroutine
        async for out in llm.generate_stream("Hi"):            # async iterator
            ...
"""

from __future__ import annotations

import gc
import logging
import queue
import threading
from concurrent.futures import Future, InvalidStateError
from typing import Any, Callable, Iterable, Sequence, TypeVar, cast

from sagellm_core.config import EngineConfig
from sagellm_core.engine import LLMEngine
from sagellm_core.engine.info import EngineInfo
from sagellm_core.errors import ConfigError, EngineDeadError, SageLLMError
from sagellm_core.health import EngineHealth, progress_marker
from sagellm_core.inputs import InputProcessor, ProcessedPrompt
from sagellm_core.intake import RequestIntake
from sagellm_core.outputs import RequestOutput
from sagellm_core.plugin_manager import SageLLMPluginManager
from sagellm_core.sampling_params import SamplingParams
from sagellm_core.streams import RequestStream

log = logging.getLogger("sagellm")
Prompt = str | list[int]
T = TypeVar("T")


def build_config(model: str | None = None, config: EngineConfig | dict | str | None = None,
                 **sections: Any) -> EngineConfig:
    """An `EngineConfig` from an object, a dict, a YAML path/text, plus section overrides."""
    if isinstance(config, EngineConfig):
        base = config
    elif isinstance(config, dict):
        base = EngineConfig.from_dict(config)
    elif isinstance(config, str):
        base = EngineConfig.from_yaml(config)
    else:
        base = EngineConfig()
    if model is not None:
        sections["model"] = {**sections.get("model", {}), "path": model}
    return base.evolve(**sections) if sections else base


class LLM(RequestIntake):
    """An inference engine you can call from sync code, async code and several threads at once.

    Requests are validated and tokenized in a small worker pool (``input_workers`` threads), never
    on the caller's event loop or the engine's thread: `submit` returns the stream at once and any
    error reaches the stream. If the engine thread dies, every request in flight fails with
    `EngineDeadError`, `submit` refuses, and `health()` says ``dead``. A watchdog marks the engine
    ``stalled`` when no step completes for ``stall_timeout_s`` seconds while work is queued (None: off).
    """

    def __init__(self, model: str | None = None, *, config: EngineConfig | dict | str | None = None,
                 plugin_manager: SageLLMPluginManager | None = None, input_workers: int = 2,
                 stall_timeout_s: float | None = 120.0, **sections: Any) -> None:
        if not isinstance(input_workers, int) or isinstance(input_workers, bool) or input_workers < 1:
            raise ConfigError(f"input_workers must be an integer >= 1, got {input_workers!r}")
        if stall_timeout_s is not None and not stall_timeout_s > 0:
            raise ConfigError(f"stall_timeout_s must be > 0 (or None: no watchdog), got {stall_timeout_s!r}")
        self.config = build_config(model, config, **sections)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}  # engine thread: requests the engine holds
        self._init_requests()
        self._wake = threading.Event()
        self._stopped = False
        self._dead: EngineDeadError | None = None
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(plugin_manager,), name="sagellm-engine",
                                        daemon=True)
        self._thread.start()
        self._started.wait()
        if self._start_error is not None:
            raise self._start_error
        self.tokenizer = self.engine.tokenizer
        self.inputs = InputProcessor(self.tokenizer, self.engine.vocab_size, self.engine.max_model_len,
                                     self.config.scheduler.max_waiting)
        self._start_intake(input_workers, stall_timeout_s)

    # ---- engine loop thread --------------------------------------------------------------------
    def _run(self, plugin_manager: SageLLMPluginManager | None) -> None:
        """Build the engine on this thread, then serve. NOTE: all of the engine's torch work stays on
        one thread: CPU kernels run about 25% slower on a thread other than the one whose OpenMP team
        loaded the model (measured on a 2-core machine)."""
        try:
            self.engine = LLMEngine(self.config, plugin_manager=plugin_manager)
            # Long-lived start-up objects (model, tokenizer, plugins) leave the GC's generations, so
            # the per-step garbage collections stay cheap (as vLLM does).
            gc.collect()
            gc.freeze()
        except BaseException as exc:  # re-raised in the constructor's thread
            self._start_error = exc
            self._stopped = True
            return
        finally:
            self._started.set()
        try:
            self._loop()
        except BaseException as exc:  # SystemExit from a plugin included: nobody may hang on us
            log.critical("the engine thread died: %s: %s", type(exc).__name__, exc, exc_info=exc)
            self._die(EngineDeadError(f"the engine stopped: {type(exc).__name__}: {exc}"))

    def _loop(self) -> None:
        while not self._stopped:
            self._drain_commands()
            if not self.engine.has_unfinished():
                self._wake.wait()
                self._wake.clear()
                continue
            try:
                outputs = self.engine.step()
            except Exception as exc:  # fail the in-flight requests, keep serving new ones
                log.exception("engine step failed")
                self._fail_all(exc)
                continue
            for output in outputs:
                stream = self._streams.get(output.request_id)
                if stream is None:
                    continue
                stream.put(output)
                if output.finished:
                    stream.put_end()
                    self._streams.pop(output.request_id, None)
                    self._forget(stream.request_id)

    def _drain_commands(self) -> None:
        while True:
            try:
                command, args = self._commands.get_nowait()
            except queue.Empty:
                return
            if command == "add":
                self._add(*args)
            elif command == "abort":
                self.engine.abort(args)
            elif command == "call":
                function, future = args
                try:
                    future.set_result(function(self.engine))
                except BaseException as exc:  # delivered to the caller
                    future.set_exception(exc)

    def _add(self, stream: RequestStream, prompt: ProcessedPrompt, params: SamplingParams, priority: int,
             incremental: bool) -> None:
        if stream.ended:  # failed meanwhile (shutdown)
            return
        try:
            self.engine.add_request(prompt.token_ids, params, request_id=stream.request_id, priority=priority,
                                    stream=incremental)
        except Exception as exc:
            self._end(stream, exc)
            return
        self._streams[stream.request_id] = stream
        if stream.abort_requested:  # aborted while its input was being processed
            self.engine.abort(stream.request_id)

    def _fail_all(self, exc: Exception) -> None:
        error = EngineDeadError(f"engine step failed: {type(exc).__name__}: {exc}") if not isinstance(
            exc, SageLLMError) else exc
        self.engine.abort_all()
        for stream in list(self._streams.values()):
            self._end(stream, error)
        self._streams.clear()

    def _die(self, error: EngineDeadError) -> None:
        """The engine thread is gone: fail every request and every pending call, now and later."""
        self._dead = error
        self._streams.clear()
        self._fail_pending(error)

    def _fail_pending(self, error: SageLLMError) -> None:
        self._fail_requests(error)
        while True:
            try:
                command, args = self._commands.get_nowait()
            except queue.Empty:
                break
            if command == "add":
                args[0].fail(error)
            elif command == "call" and not args[1].done():
                args[1].set_exception(error)

    # ---- input worker pool ---------------------------------------------------------------------
    def _dispatch(self, stream: RequestStream, prompt: ProcessedPrompt, params: SamplingParams, priority: int,
                  incremental: bool) -> None:
        """Input pool: hand the request's token ids to the engine thread. NOTE: the engine thread fails
        queued commands when it dies or stops; one queued just after that drain is failed by the intake."""
        self._commands.put(("add", (stream, prompt, params, priority, incremental)))
        self._wake.set()

    # ---- public API ----------------------------------------------------------------------------
    def generate_stream(self, prompt: Prompt, params: SamplingParams | None = None, **kwargs: Any) -> RequestStream:
        """Incremental outputs (``delta_text`` / ``delta_token_ids``) as a sync or async iterator."""
        return self.submit(prompt, params, **kwargs)

    async def generate_async(self, prompt: Prompt, params: SamplingParams | None = None, **kwargs: Any
                             ) -> RequestOutput:
        """Await the final output of one request."""
        final = None
        async for output in self.submit(prompt, params, stream=False, **kwargs):
            final = output
        assert final is not None
        return final

    def generate(self, prompts: Prompt | Sequence[Prompt], params: SamplingParams | Sequence[SamplingParams] | None
                 = None, *, use_tqdm: bool = True, priorities: Iterable[int] | None = None) -> list[RequestOutput]:
        """Run many prompts to completion (continuously batched); outputs in the order of ``prompts``."""
        single = isinstance(prompts, str) or (isinstance(prompts, list) and prompts and isinstance(prompts[0], int))
        batch: list[Prompt] = [cast(Prompt, prompts)] if single else list(cast(Sequence[Prompt], prompts))
        param_list: list[SamplingParams] = (list(params) if isinstance(params, (list, tuple))
                                            else [cast(SamplingParams, params) or SamplingParams()] * len(batch))
        if len(param_list) != len(batch):
            raise ValueError("params must be one SamplingParams or one per prompt")
        prio = list(priorities) if priorities is not None else [0] * len(batch)
        streams = [self.submit(p, sp, priority=pr, stream=False) for p, sp, pr in zip(batch, param_list, prio)]
        results: list[RequestOutput] = []
        progress = _progress(len(streams), use_tqdm)
        try:
            for stream in streams:
                for _ in stream:
                    pass
                results.append(stream.final)  # type: ignore[arg-type]
                progress.update(1)
        finally:
            progress.close()
        return results

    def apply_chat_template(self, messages: list[dict[str, Any]],
                            chat_template_kwargs: dict[str, Any] | None = None) -> list[int]:
        """Token ids of ``messages`` rendered with the chat template (in the calling thread)."""
        return self.inputs.process_chat(messages, chat_template_kwargs).token_ids

    def abort(self, request_id: str) -> None:
        """Abort a request; its stream ends with ``finish_reason == "abort"``."""
        stream = self._request(request_id)
        if stream is not None:
            stream.abort_requested = True
        self._commands.put(("abort", request_id))
        self._wake.set()

    def call(self, function: Callable[[LLMEngine], T]) -> T:
        """Run ``function(engine)`` on the engine's thread between two steps and return its result.

        Safe access to engine state from other threads; also the place for other torch work that
        should share the engine's thread (see `_run`).
        """
        self._check_alive()
        future: Future = Future()
        self._commands.put(("call", (function, future)))
        self._wake.set()
        error = self._dead or (EngineDeadError("the engine has been shut down") if self._stopped else None)
        if error is not None and not self._thread.is_alive():
            try:
                future.set_exception(error)
            except InvalidStateError:  # answered meanwhile
                pass
        return future.result()

    def reset_prefix_cache(self) -> int:
        """Forget the cached prefix blocks no request holds, on the engine's thread (later prompts
        recompute them); the number of blocks forgotten."""
        return self.call(lambda engine: engine.reset_prefix_cache())

    def get_stats(self) -> dict[str, Any]:
        return self.engine.get_stats()

    @property
    def info(self) -> EngineInfo:
        """The engine's facts as plain data (model, context, KV pool, effective config)."""
        return EngineInfo.of(self.engine)

    def metrics_exposition(self) -> bytes | None:
        """The Prometheus sink's text (None when the ``prometheus`` sink does not run)."""
        sink = self.engine.metric_sinks.get("prometheus")
        return sink.exposition() if sink is not None else None

    def health(self) -> EngineHealth:
        """``ok``, ``stalled`` (watchdog), ``dead`` (the engine thread died) or ``stopped``."""
        return self._health(self._stopped or not self._thread.is_alive())

    def _progress_sample(self) -> tuple[Any, bool]:
        return progress_marker(self.engine), self._busy()

    @property
    def is_running(self) -> bool:
        """True while the loop thread serves requests (False once it died or was shut down)."""
        return not self._stopped and self._dead is None and self._thread.is_alive()

    def shutdown(self) -> None:
        """Stop the loop thread, fail unfinished requests, and free the KV pool's device memory."""
        if self._stopped:
            return
        self._stopped = True
        self._stop_intake()
        self._wake.set()
        self._thread.join(timeout=30)
        self._fail_pending(EngineDeadError("the engine was shut down"))
        self._streams.clear()
        if not self._thread.is_alive():
            self.engine.release()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()


class _NoProgress:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _progress(total: int, enabled: bool) -> Any:
    if not enabled or total < 2:
        return _NoProgress()
    from tqdm import tqdm

    return tqdm(total=total, desc="generate", unit="req")
