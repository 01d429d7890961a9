"""The engine core in a process of its own (`sagellm serve`'s default): scheduler, KV cache, model
runner and sampler, with no HTTP, tokenization or text in the way of its step loop.

    handle = EngineProcess.start(config, frontend_addresses)   # spawns, returns at once
    info = handle.wait_ready()                                 # EngineInfo, or the build error
    ...
    handle.stop()

The loop: take every message the front ends sent (add, abort, stop at a stop string, calls), run one
step, send each front end one message with all of that step's outputs for its requests (`TokenDelta`
tuples: new token ids, logprobs, finish reasons; `sagellm_core.engine.token_output`). Front ends push to this process's
``PULL`` socket; it pushes to one ``PULL`` socket per front end. The process exits when its parent
(the launcher) dies, on SIGTERM, or when the loop raises (the front ends see the connection drop).
Sends never block on a slow front end (no high-water mark); one that stays unreachable for
``SEND_TIMEOUT_MS`` (its process is gone) has its outputs dropped.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing
import os
import signal
import tempfile
import time
import uuid
from multiprocessing.connection import Connection
from typing import Any, Callable

import attrs

from sagellm_core.config import EngineConfig
from sagellm_core.engine.codec import Kind, decode, encode, encode_error
from sagellm_core.engine.info import EngineInfo
from sagellm_core.errors import EngineDeadError, SageLLMError
from sagellm_core.engine.token_output import TokenDelta

log = logging.getLogger("sagellm.engine")
IDLE_POLL_MS = 1000
PROGRESS_INTERVAL_S = 1.0
SEND_TIMEOUT_MS = 5000  # a front end that stays unreachable this long is gone: its outputs are dropped


def ipc_address(directory: str, name: str) -> str:
    """A ``ipc://`` address in ``directory`` (a private temporary directory of the launcher)."""
    return f"ipc://{os.path.join(directory, name)}"


def new_ipc_directory() -> str:
    """A directory only this user can enter, for the sockets of one server."""
    return tempfile.mkdtemp(prefix="sagellm-ipc-")


@attrs.frozen
class EngineAddresses:
    """Where engine ``rank`` listens, and where each front end listens for outputs."""

    engine_input: str
    frontend_outputs: tuple[str, ...]


class EngineCoreLoop:
    """The engine process's loop around one `LLMEngine` in token mode."""

    def __init__(self, engine: Any, addresses: EngineAddresses, parent_pid: int) -> None:
        import zmq

        self.engine = engine
        self.parent_pid = parent_pid
        self.context = zmq.Context()
        self.input = self.context.socket(zmq.PULL)
        self.input.bind(addresses.engine_input)
        self.outputs = []
        for address in addresses.frontend_outputs:
            socket = self.context.socket(zmq.PUSH)
            socket.setsockopt(zmq.LINGER, 0)
            socket.setsockopt(zmq.SNDHWM, 0)  # never drop or block on a slow front end
            socket.setsockopt(zmq.SNDTIMEO, SEND_TIMEOUT_MS)
            socket.connect(address)
            self.outputs.append(socket)
        self.owner: dict[str, int] = {}  # request id -> front end index
        self.stopping = False
        self.last_progress_sent = 0.0
        self.handlers: dict[str, Callable[..., None]] = {Kind.ADD: self._add, Kind.ABORT: self._abort,
                                                         Kind.STOP: self._stop, Kind.CALL: self._call}

    # ---- loop ----------------------------------------------------------------------------------
    def run(self) -> None:
        while not self.stopping:
            busy = self.engine.has_unfinished()
            if self.input.poll(0 if busy else IDLE_POLL_MS):
                self._drain_input()
            if os.getppid() != self.parent_pid:
                log.warning("the launcher (pid %d) is gone: the engine process exits", self.parent_pid)
                return
            if self.engine.has_unfinished():
                self._step()

    def _drain_input(self) -> None:
        import zmq

        while True:
            try:
                frame = self.input.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            message = decode(frame.buffer)
            self.handlers[message[0]](*message[1:])

    def _step(self) -> None:
        try:
            self.engine.step()
        except Exception as exc:  # fail the requests in flight, keep serving new ones (as `LLM` does)
            log.exception("engine step failed")
            self._fail_all(exc)
            return
        deltas = self.engine.take_deltas()
        if deltas:
            self._send_outputs(deltas)
        elif time.monotonic() - self.last_progress_sent >= PROGRESS_INTERVAL_S:
            self._broadcast((Kind.PROGRESS, self.engine.step_counter))

    def _send_outputs(self, deltas: list[TokenDelta]) -> None:
        by_frontend: dict[int, list[TokenDelta]] = {}
        for delta in deltas:
            request_id, finished = delta[0], delta[1]
            frontend = self.owner.get(request_id)
            if frontend is None:
                continue
            by_frontend.setdefault(frontend, []).append(delta)
            if finished:
                del self.owner[request_id]
        step = self.engine.step_counter
        for frontend, batch in by_frontend.items():
            self._send(frontend, (Kind.OUTPUTS, step, batch))
        self.last_progress_sent = time.monotonic()

    def _send(self, frontend: int, message: tuple[Any, ...]) -> None:
        import zmq

        try:
            self.outputs[frontend].send(encode(message), copy=False)
        except zmq.Again:
            log.warning("front end %d unreachable for %d ms: a %s message was dropped", frontend,
                        SEND_TIMEOUT_MS, message[0])

    def _broadcast(self, message: tuple[Any, ...]) -> None:
        for frontend in range(len(self.outputs)):
            self._send(frontend, message)
        self.last_progress_sent = time.monotonic()

    def _fail_all(self, exc: Exception) -> None:
        error = exc if isinstance(exc, SageLLMError) else EngineDeadError(
            f"engine step failed: {type(exc).__name__}: {exc}")
        self.engine.abort_all()
        frontends = set(self.owner.values())
        self.owner.clear()
        for frontend in frontends:
            self._send(frontend, (Kind.FAILED, encode_error(error)))

    # ---- messages ------------------------------------------------------------------------------
    def _add(self, frontend: int, request_id: str, token_ids: list[int], params: Any, priority: int,
             stream: bool) -> None:
        try:
            self.engine.add_request(token_ids, params, request_id=request_id, priority=priority, stream=stream)
        except Exception as exc:
            self._send(frontend, (Kind.REJECTED, request_id, encode_error(exc)))
            return
        self.owner[request_id] = frontend

    def _abort(self, request_ids: list[str]) -> None:
        for request_id in request_ids:
            self.engine.abort(request_id)

    def _stop(self, request_id: str, stop_reason: str) -> None:
        self.engine.finish_stopped(request_id, stop_reason)

    def _call(self, frontend: int, call_id: int, name: str) -> None:
        try:
            result: Any = (True, ENGINE_CALLS[name](self.engine))
        except Exception as exc:
            result = (False, encode_error(exc))
        self._send(frontend, (Kind.RESULT, call_id, *result))

    def close(self) -> None:
        for socket in (self.input, *self.outputs):
            socket.close(linger=0)
        self.context.term()


def _metrics(engine: Any) -> bytes | None:
    sink = engine.metric_sinks.get("prometheus")
    return sink.exposition() if sink is not None else None


ENGINE_CALLS: dict[str, Callable[[Any], Any]] = {
    "stats": lambda engine: engine.get_stats(),
    "metrics": _metrics,
}


def run_engine_process(config: EngineConfig, addresses: EngineAddresses, ready: Connection, parent_pid: int) -> None:
    """The engine process's entry point: build the engine, report ready (or the error), serve."""
    from sagellm_core.engine import LLMEngine

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the launcher decides when the engine stops
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s[engine %(process)d]: %(message)s")
    try:
        engine = LLMEngine(config, detokenize=False)
        gc.collect()
        gc.freeze()  # the start-up objects leave the GC's generations (per-step collections stay cheap)
        loop = EngineCoreLoop(engine, addresses, parent_pid)
    except BaseException as exc:
        ready.send(("error", _picklable(exc)))
        return
    signal.signal(signal.SIGTERM, lambda *_: setattr(loop, "stopping", True))
    ready.send(("ready", EngineInfo.of(engine)))
    ready.close()
    try:
        loop.run()
    finally:
        loop.close()
        engine.release()


def _picklable(exc: BaseException) -> BaseException:
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return SageLLMError(f"{type(exc).__name__}: {exc}")


class EngineProcess:
    """The launcher's handle of one engine process."""

    def __init__(self, process: Any, ready: Connection, addresses: EngineAddresses) -> None:
        self.process = process
        self.ready = ready
        self.addresses = addresses
        self.info: EngineInfo | None = None

    @classmethod
    def start(cls, config: EngineConfig, addresses: EngineAddresses, name: str = "sagellm-engine") -> "EngineProcess":
        """Spawn the engine process (a fresh interpreter: no state inherited from this one)."""
        context = multiprocessing.get_context("spawn")
        receiver, sender = context.Pipe(duplex=False)
        process = context.Process(target=run_engine_process, args=(config, addresses, sender, os.getpid()),
                                  name=name, daemon=False)
        process.start()
        sender.close()
        return cls(process, receiver, addresses)

    def wait_ready(self) -> EngineInfo:
        """Block until the engine is built; raise its build error, or `EngineDeadError` if it died."""
        try:
            kind, value = self.ready.recv()
        except EOFError:
            self.process.join(timeout=5)
            raise EngineDeadError(f"the engine process exited while starting (exit code {self.process.exitcode})"
                                  ) from None
        finally:
            self.ready.close()
        if kind == "error":
            self.process.join(timeout=30)
            raise value
        self.info = value
        return value

    @property
    def pid(self) -> int | None:
        return self.process.pid

    def stop(self, timeout_s: float = 30.0) -> None:
        """SIGTERM (the loop ends and releases the device), then SIGKILL after ``timeout_s``."""
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout_s)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()


def engine_addresses(directory: str, num_engines: int, num_frontends: int) -> tuple[list[str], list[str]]:
    """(input address of each engine, output address of each front end) in ``directory``."""
    tag = uuid.uuid4().hex[:8]
    return ([ipc_address(directory, f"{tag}-engine-{i}") for i in range(num_engines)],
            [ipc_address(directory, f"{tag}-frontend-{i}") for i in range(num_frontends)])
