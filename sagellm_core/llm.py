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
import uuid
from concurrent.futures import Future
from typing import Any, Callable, Iterable, Sequence, TypeVar

from sagellm_core.config import EngineConfig
from sagellm_core.engine import LLMEngine
from sagellm_core.errors import EngineDeadError, SageLLMError
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


class LLM:
    """An inference engine you can call from sync code, async code and several threads at once."""

    def __init__(self, model: str | None = None, *, config: EngineConfig | dict | str | None = None,
                 plugin_manager: SageLLMPluginManager | None = None, **sections: Any) -> None:
        self.config = build_config(model, config, **sections)
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._streams: dict[str, RequestStream] = {}
        self._wake = threading.Event()
        self._stopped = False
        self._started = threading.Event()
        self._start_error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(plugin_manager,), name="sagellm-engine",
                                        daemon=True)
        self._thread.start()
        self._started.wait()
        if self._start_error is not None:
            raise self._start_error
        self.tokenizer = self.engine.tokenizer

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
        self._loop()

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

    def _drain_commands(self) -> None:
        while True:
            try:
                command, args = self._commands.get_nowait()
            except queue.Empty:
                return
            if command == "add":
                stream, prompt, params, priority, incremental = args
                try:
                    self.engine.add_request(prompt, params, request_id=stream.request_id, priority=priority,
                                            stream=incremental)
                except Exception as exc:
                    stream.put(exc)
                    stream.put_end()
                    continue
                self._streams[stream.request_id] = stream
            elif command == "abort":
                self.engine.abort(args)
            elif command == "call":
                function, future = args
                try:
                    future.set_result(function(self.engine))
                except BaseException as exc:  # delivered to the caller
                    future.set_exception(exc)

    def _fail_all(self, exc: Exception) -> None:
        error = EngineDeadError(f"engine step failed: {type(exc).__name__}: {exc}") if not isinstance(
            exc, SageLLMError) else exc
        self.engine.abort_all()
        for stream in list(self._streams.values()):
            stream.put(error)
            stream.put_end()
        self._streams.clear()

    # ---- public API ----------------------------------------------------------------------------
    def submit(self, prompt: Prompt, params: SamplingParams | None = None, *, request_id: str | None = None,
               priority: int = 0, stream: bool = True) -> RequestStream:
        """Queue one request; returns its stream (iterate it sync or async).

        ``stream=False``: the stream carries only the final output (less work per step).
        """
        if self._stopped:
            raise EngineDeadError("the engine has been shut down")
        params = params or SamplingParams()
        params.validate()
        request_stream = RequestStream(request_id or f"req-{uuid.uuid4().hex[:12]}")
        self._commands.put(("add", (request_stream, prompt, params, priority, stream)))
        self._wake.set()
        return request_stream

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
        batch: list[Prompt] = [prompts] if single else list(prompts)  # type: ignore[list-item]
        param_list = list(params) if isinstance(params, (list, tuple)) else [params or SamplingParams()] * len(batch)
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

    def chat(self, messages: list[dict[str, str]], params: SamplingParams | None = None, **kwargs: Any
             ) -> RequestStream:
        """Apply the model's chat template and stream the reply."""
        return self.submit(self.apply_chat_template(messages), params, **kwargs)

    def apply_chat_template(self, messages: list[dict[str, str]]) -> list[int]:
        from sagellm_core.chat import chat_prompt_ids

        return chat_prompt_ids(self.tokenizer, messages)

    def abort(self, request_id: str) -> None:
        """Abort a request; its stream ends with ``finish_reason == "abort"``."""
        self._commands.put(("abort", request_id))
        self._wake.set()

    def call(self, function: Callable[[LLMEngine], T]) -> T:
        """Run ``function(engine)`` on the engine's thread between two steps and return its result.

        Safe access to engine state from other threads; also the place for other torch work that
        should share the engine's thread (see `_run`).
        """
        if self._stopped:
            raise EngineDeadError("the engine has been shut down")
        future: Future = Future()
        self._commands.put(("call", (function, future)))
        self._wake.set()
        return future.result()

    def get_stats(self) -> dict[str, Any]:
        return self.engine.get_stats()

    @property
    def is_running(self) -> bool:
        """True while the loop thread serves requests."""
        return not self._stopped and self._thread.is_alive()

    def shutdown(self) -> None:
        """Stop the loop thread, fail unfinished requests, and free the KV pool's device memory."""
        if self._stopped:
            return
        self._stopped = True
        self._wake.set()
        self._thread.join(timeout=30)
        pending = list(self._streams.values())
        while True:
            try:
                command, args = self._commands.get_nowait()
            except queue.Empty:
                break
            if command == "add":
                pending.append(args[0])
        for stream in pending:
            stream.put(EngineDeadError("the engine was shut down"))
            stream.put_end()
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
