"""`EngineClient`: the front end of engine processes, with the part of `LLM`'s API the server uses
(`submit`, `abort`, `inputs`, `process_inputs`, `health`, `get_stats`, `info`, `metrics_exposition`,
`shutdown`).

Requests are validated and tokenized in the input pool (as `LLM` does), routed to an engine process
(one, or data-parallel replicas by prefix affinity), and their outputs come back as one message per
engine step; a receiver thread detokenizes them (`FrontendOutputs`) and fills the request streams.
The engine's death (its connection drops: killed, crashed) fails every request in flight at once and
turns `health()` to ``dead``.
"""

from __future__ import annotations

import itertools
import logging
import threading
from concurrent.futures import Future
from typing import Any, Sequence

from sagellm_core.config import EngineConfig
from sagellm_core.engine.codec import Kind, decode, decode_error, encode
from sagellm_core.engine.frontend_output import FrontendOutputs
from sagellm_core.engine.info import EngineInfo
from sagellm_core.engine.process import EngineProcess
from sagellm_core.errors import EngineDeadError, SageLLMError
from sagellm_core.health import EngineHealth
from sagellm_core.inputs import InputProcessor, ProcessedPrompt
from sagellm_core.intake import RequestIntake
from sagellm_core.engine.token_output import TokenDelta
from sagellm_core.parallel.router import PrefixAffinityRouter
from sagellm_core.sampling_params import SamplingParams
from sagellm_core.streams import RequestStream

log = logging.getLogger("sagellm")
CALL_TIMEOUT_S = 60.0
SEND_TIMEOUT_MS = 1000


class EngineClient(RequestIntake):
    """A front end of ``len(engine_inputs)`` engine processes (data-parallel replicas when more than one).

    ``output_address``: where this front end receives outputs (the engines connect to it).
    ``frontend_index``: this front end's place in the engines' list of front ends. ``processes``:
    engine processes this client stops on `shutdown` (the launcher's, when it is also the front end).
    """

    def __init__(self, config: EngineConfig, infos: Sequence[EngineInfo], engine_inputs: Sequence[str],
                 output_address: str, *, frontend_index: int = 0, input_workers: int = 2,
                 stall_timeout_s: float | None = 120.0, processes: Sequence[EngineProcess] = ()) -> None:
        import zmq

        from sagellm_core.models import loader

        self.config = config
        self.infos = list(infos)
        self.info = self.infos[0].merged(self.infos[1:])
        self.frontend_index = frontend_index
        self.processes = list(processes)
        self._init_requests()
        self.tokenizer = loader.load_tokenizer(loader.resolve(config.model.path, config.model.gguf_file),
                                               config.model.tokenizer)
        self.inputs = InputProcessor(self.tokenizer, self.info.vocab_size, self.info.max_model_len,
                                     config.scheduler.max_waiting)
        self.outputs = FrontendOutputs(self.tokenizer, self.info.eos_token_ids)
        self.router = PrefixAffinityRouter(len(engine_inputs), self.info.block_size)
        self._replica_of: dict[str, int] = {}
        self._lock = threading.Lock()  # the router and the replica of each request
        self._calls: dict[int, Future] = {}
        self._call_ids = itertools.count()
        self._messages = 0  # engine messages received: the watchdog's progress marker
        self._dead: EngineDeadError | None = None
        self._stopped = False
        self._context = zmq.Context()
        self._receiver = self._context.socket(zmq.PULL)
        self._monitor = self._receiver.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_ACCEPTED)
        self._receiver.bind(output_address)
        self._senders = []
        for address in engine_inputs:
            sender = self._context.socket(zmq.PUSH)
            sender.setsockopt(zmq.LINGER, 0)
            sender.setsockopt(zmq.SNDHWM, 0)
            sender.setsockopt(zmq.SNDTIMEO, SEND_TIMEOUT_MS)  # the event loop never waits on a dead engine
            sender.connect(address)
            self._senders.append(sender)
        self._send_lock = threading.Lock()
        self._start_intake(input_workers, stall_timeout_s)
        self._thread = threading.Thread(target=self._receive, name="sagellm-frontend", daemon=True)
        self._thread.start()

    # ---- sending -------------------------------------------------------------------------------
    def _send(self, replica: int, message: tuple[Any, ...]) -> None:
        import zmq

        with self._send_lock:
            if self._stopped or self._dead is not None:
                return
            try:
                self._senders[replica].send(encode(message))
            except zmq.Again:  # the engine is unreachable: its death is being reported
                log.warning("engine %d unreachable: a %s message was dropped", replica, message[0])

    # ---- receiving (one thread) ----------------------------------------------------------------
    def _receive(self) -> None:
        import zmq
        import zmq.utils.monitor

        poller = zmq.Poller()
        poller.register(self._receiver, zmq.POLLIN)
        poller.register(self._monitor, zmq.POLLIN)
        connected = 0
        try:
            while not self._stopped:
                ready = dict(poller.poll(500))
                if self._monitor in ready:
                    event = zmq.utils.monitor.recv_monitor_message(self._monitor)
                    if event["event"] == zmq.EVENT_ACCEPTED:
                        connected += 1
                    elif event["event"] == zmq.EVENT_DISCONNECTED and not self._stopped:
                        self._die(EngineDeadError("the engine process exited (its connection dropped)"))
                        return
                if self._receiver in ready:
                    while True:
                        try:
                            frame = self._receiver.recv(zmq.NOBLOCK, copy=False)
                        except zmq.Again:
                            break
                        self._handle(decode(frame.buffer))
        except zmq.ContextTerminated:
            return
        except BaseException as exc:  # a bug here must not leave requests hanging
            log.critical("the front end's receiver died: %s: %s", type(exc).__name__, exc, exc_info=exc)
            self._die(EngineDeadError(f"the front end's receiver stopped: {type(exc).__name__}: {exc}"))

    def _handle(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        if kind == Kind.OUTPUTS:
            self._on_outputs(message[1], message[2])
        elif kind == Kind.PROGRESS:
            self._messages += 1
        elif kind == Kind.REJECTED:
            self._end_request(message[1], decode_error(message[2]))
        elif kind == Kind.FAILED:
            self._fail_replica(decode_error(message[1]))
        elif kind == Kind.RESULT:
            self._on_result(*message[1:])

    def _on_outputs(self, step: int, batch: list[TokenDelta]) -> None:
        self._messages += 1
        for delta in batch:
            request_id = delta[0]
            output, stops = self.outputs.apply(delta)
            for sequence_id, stop_string in stops:
                self._send(self._replica_of.get(request_id, 0), (Kind.STOP, sequence_id, stop_string))
            if output is None:
                continue
            stream = self._requests.get(request_id)
            if stream is None:
                continue
            stream.put(output)
            if output.finished:
                stream.put_end()
                self._forget(request_id)

    def _on_result(self, call_id: int, ok: bool, value: Any) -> None:
        future = self._calls.pop(call_id, None)
        if future is None:
            return
        if ok:
            future.set_result(value)
        else:
            future.set_exception(decode_error(value))

    def _fail_replica(self, error: SageLLMError) -> None:
        """A step failed in an engine: its requests of this front end failed (the engine goes on)."""
        with self._requests_lock:
            request_ids = list(self._requests)
        for request_id in request_ids:
            self._end_request(request_id, error)

    def _die(self, error: EngineDeadError) -> None:
        """An engine is gone: fail every request and every pending call, now and later."""
        self._dead = error
        log.error("%s", error)
        self._fail_requests(error)
        for future in list(self._calls.values()):
            if not future.done():
                future.set_exception(error)
        self._calls.clear()

    def _forget(self, request_id: str) -> RequestStream | None:
        stream = super()._forget(request_id)
        with self._lock:
            replica = self._replica_of.pop(request_id, None)
        if replica is not None:
            self.router.finished(replica)
        return stream

    def _end(self, stream: RequestStream, error: BaseException) -> None:
        self._end_request(stream.request_id, error)

    def _end_request(self, request_id: str, error: BaseException) -> None:
        """Fail the request ``request_id`` (if this front end still has it) and forget its text state."""
        self.outputs.drop(request_id)
        stream = self._forget(request_id)
        if stream is not None:
            stream.fail(error)

    # ---- input pool ----------------------------------------------------------------------------
    def _dispatch(self, stream: RequestStream, prompt: ProcessedPrompt, params: SamplingParams, priority: int,
                  incremental: bool) -> None:
        """Input pool: route the request to a replica and send it there."""
        request_id = stream.request_id
        with self._lock:
            replica = self.router.route(prompt.token_ids).replica
            self._replica_of[request_id] = replica
        self.outputs.add(request_id, prompt.text, prompt.token_ids, params, incremental)
        self._send(replica, (Kind.ADD, self.frontend_index, request_id, prompt.token_ids, params, priority,
                             self.outputs.engine_stream(params, incremental)))
        if stream.abort_requested:  # aborted while its input was being processed
            self._send(replica, (Kind.ABORT, [request_id]))

    # ---- public API (as `LLM`'s) ---------------------------------------------------------------
    def abort(self, request_id: str) -> None:
        """Abort a request; its stream ends with ``finish_reason == "abort"``."""
        stream = self._request(request_id)
        if stream is not None:
            stream.abort_requested = True
        with self._lock:
            replica = self._replica_of.get(request_id)
        if replica is not None:
            self._send(replica, (Kind.ABORT, [request_id]))

    def call(self, name: str, replica: int = 0) -> Any:
        """Run the engine call ``name`` (`sagellm_core.engine.process.ENGINE_CALLS`) between two steps."""
        self._check_alive()
        future: Future = Future()
        call_id = next(self._call_ids)
        self._calls[call_id] = future
        self._send(replica, (Kind.CALL, self.frontend_index, call_id, name))
        if self._dead is not None and not future.done():
            future.set_exception(self._dead)
        return future.result(timeout=CALL_TIMEOUT_S)

    def get_stats(self) -> dict[str, Any]:
        """The engine's `get_stats()`; with replicas, ``{"replicas": [...], "router": {...}}``."""
        if len(self._senders) == 1:
            return self.call("stats")
        stats = self.router.stats
        return {"replicas": [self.call("stats", replica) for replica in range(len(self._senders))],
                "router": {"requests": stats.requests, "affinity_routed": stats.affinity_routed,
                           "predicted_hit_rate": stats.predicted_hit_rate, "load": list(self.router.load)}}

    def metrics_exposition(self) -> bytes | None:
        """The engines' Prometheus text (replicas labelled ``engine="i"``); None without the sink."""
        from sagellm_core.metrics.relabel import merge_expositions

        texts = [self.call("metrics", replica) for replica in range(len(self._senders))]
        if any(text is None for text in texts):
            return None
        return texts[0] if len(texts) == 1 else merge_expositions(texts, "engine")

    def health(self) -> EngineHealth:
        """``ok``, ``stalled`` (watchdog), ``dead`` (an engine process is gone) or ``stopped``."""
        return self._health(self._stopped)

    def _progress_sample(self) -> tuple[Any, bool]:
        return self._messages, self._busy()

    @property
    def is_running(self) -> bool:
        return not self._stopped and self._dead is None

    def shutdown(self) -> None:
        """Fail what is unfinished, close the sockets, and stop the engine processes this client owns."""
        if self._stopped:
            return
        self._stopped = True
        self._stop_intake()
        self._fail_requests(EngineDeadError("the engine was shut down"))
        self._thread.join(timeout=5)
        with self._send_lock:
            for socket in (*self._senders, self._receiver, self._monitor):
                socket.close(linger=0)
        self._context.term()
        for process in self.processes:
            process.stop()
