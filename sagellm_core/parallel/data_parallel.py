"""Data-parallel replicas behind one `LLM`-shaped front: N engines (each on its own device where the
backend has several), requests routed with prefix-cache affinity (`PrefixAffinityRouter`)."""

from __future__ import annotations

import threading
from typing import Any, Sequence

from sagellm_core.errors import InvalidRequestError
from sagellm_core.llm import LLM, Prompt, build_config
from sagellm_core.outputs import RequestOutput
from sagellm_core.parallel.router import PrefixAffinityRouter, RouteDecision
from sagellm_core.sampling_params import SamplingParams
from sagellm_core.streams import RequestStream


class DataParallelLLM:
    """``data_parallel_size`` engine replicas; `submit` routes each request, the rest fans out.

    Replica ``i`` runs on device ``backend.device_index + i`` (all on the one CPU for the CPU
    backend). Each replica has its own KV pool and prefix cache, so routing decides the hit rate.
    """

    def __init__(self, model: str | None = None, *, data_parallel_size: int = 2, config: Any = None,
                 **sections: Any) -> None:
        if data_parallel_size < 1:
            raise ValueError("data_parallel_size must be >= 1")
        base = build_config(model, config, **sections)
        self.replicas: list[LLM] = []
        try:
            for index in range(data_parallel_size):
                device = {"device_index": base.backend.device_index + index} if base.backend.name != "cpu" else {}
                self.replicas.append(LLM(config=base.evolve(backend=device) if device else base))
        except BaseException:
            self.shutdown()
            raise
        self.config = base
        self.tokenizer = self.replicas[0].tokenizer
        self.router = PrefixAffinityRouter(data_parallel_size, base.kv_cache.block_size)
        self._lock = threading.Lock()
        self._outstanding: dict[str, tuple[int, RequestStream]] = {}

    def route(self, token_ids: Sequence[int]) -> RouteDecision:
        with self._lock:
            self._prune()
            return self.router.route(token_ids)

    def submit(self, prompt: Prompt, params: SamplingParams | None = None, **kwargs: Any) -> RequestStream:
        """Tokenize (if text), route, and queue on the chosen replica; returns its stream."""
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise InvalidRequestError("this model has no tokenizer: pass prompt_token_ids")
            token_ids = list(self.tokenizer(prompt).input_ids)
        else:
            token_ids = list(prompt)
        decision = self.route(token_ids)
        stream = self.replicas[decision.replica].submit(token_ids, params, **kwargs)
        with self._lock:
            self._outstanding[stream.request_id] = (decision.replica, stream)
        return stream

    def generate(self, prompts: Sequence[Prompt], params: SamplingParams | None = None) -> list[RequestOutput]:
        """Run ``prompts`` to completion across the replicas; outputs in prompt order."""
        streams = [self.submit(prompt, params, stream=False) for prompt in prompts]
        results = []
        for stream in streams:
            for _ in stream:
                pass
            assert stream.final is not None
            results.append(stream.final)
        return results

    def abort(self, request_id: str) -> None:
        with self._lock:
            entry = self._outstanding.get(request_id)
        if entry is not None:
            self.replicas[entry[0]].abort(request_id)

    def get_stats(self) -> dict[str, Any]:
        """Per-replica engine stats plus the router's counters and predicted hit rate."""
        stats = self.router.stats
        return {
            "replicas": [replica.get_stats() for replica in self.replicas],
            "router": {"requests": stats.requests, "affinity_routed": stats.affinity_routed,
                       "predicted_hit_rate": stats.predicted_hit_rate, "load": list(self.router.load)},
        }

    def shutdown(self) -> None:
        for replica in self.replicas:
            replica.shutdown()

    def __enter__(self) -> "DataParallelLLM":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.shutdown()

    def _prune(self) -> None:
        """Requests that finished no longer count towards their replica's load."""
        for request_id, (replica, stream) in list(self._outstanding.items()):
            if stream.final is not None:
                del self._outstanding[request_id]
                self.router.finished(replica)
