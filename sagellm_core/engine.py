"""The engine core: admits requests, runs one scheduled step at a time, turns tokens into outputs.

Single-threaded by design: `LLM` drives it from a background loop thread.
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import Any, Callable

import attrs
import torch

from sagellm_core.backend_selection import BackendChoice, select_backend
from sagellm_core.config import EngineConfig, structure_options
from sagellm_core.detokenizer import IncrementalDetokenizer
from sagellm_core.errors import (
    EngineOverloadedError,
    InvalidRequestError,
    PluginError,
    PromptTooLongError,
)
from sagellm_core.kv.manager import KVCacheManager
from sagellm_core.metrics.base import RequestEvent, StepEvent
from sagellm_core.models import loader
from sagellm_core.models.runner import ModelRunner, kv_bytes_per_block, text_config
from sagellm_core.models.token_feed import TokenFeed
from sagellm_core.outputs import RequestMetrics, RequestOutput
from sagellm_core.plugin_manager import SageLLMPluginManager, create_plugin_manager
from sagellm_core.quant import kv_cache_dtype, quantize_loaded_model
from sagellm_core.request import PENDING_TOKEN, Request, RequestStatus
from sagellm_core.request_state import (
    CompletionState,
    RequestGroup,
    SampledToken,
    find_stop_string,
    finish,
    token_logprob,
)
from sagellm_core.sampler import PendingSample, Sampler
from sagellm_core.sampling_params import SamplingParams
from sagellm_core.schedulers.base import SchedulerOutput

log = logging.getLogger("sagellm")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_request_counter = itertools.count()
OVERLAP_MIN_BATCH = 8


@attrs.define
class InflightStep:
    """A step queued on the device whose sampled tokens the host has not read yet."""

    requests: list[Request]
    feed: TokenFeed
    read: Callable[[], list[int]]


class LLMEngine:
    """Build with an `EngineConfig`; call `add_request` and `step` until `has_unfinished` is False."""

    def __init__(self, config: EngineConfig | None = None, *,
                 plugin_manager: SageLLMPluginManager | None = None) -> None:
        self.config = config = config or EngineConfig()
        self.plugins = plugin_manager or create_plugin_manager()
        registry = self.plugins.registry
        requested = None if config.backend.name == "auto" else config.backend.name
        self.backend_choice: BackendChoice = select_backend(self.plugins, requested)
        self.backend = self.backend_choice.spec.create(config.backend)
        self.plugins.configure(config)

        self.dtype = self.backend.default_dtype() if config.model.dtype == "auto" else DTYPES[config.model.dtype]
        source = loader.resolve(config.model.path, config.model.gguf_file)
        self.model_name = source.name
        self.tokenizer = loader.load_tokenizer(source, config.model.tokenizer)
        self.model = loader.load_model(source, self.dtype, self.backend.device(), config.model.load_format)
        self.quantization = quantize_loaded_model(self.model, config.model, self.backend, self.dtype, source)
        self.kv_dtype = kv_cache_dtype(config.kv_cache.dtype, self.dtype)
        model_config = text_config(self.model)
        self.vocab_size = model_config.vocab_size
        self.max_model_len = config.model.max_model_len or getattr(model_config, "max_position_embeddings", 2048)
        self.eos_token_ids = self._eos_ids()

        scheduler_reg = registry.get("scheduler", config.scheduler.name)
        scheduler_options = structure_options(scheduler_reg.options, config.scheduler.options, "scheduler.options")
        self.scheduler = scheduler_reg.factory(config.scheduler, scheduler_options)
        policy_reg = registry.get("kv_policy", config.kv_cache.policy)
        policy_options = structure_options(policy_reg.options, config.kv_cache.policy_options,
                                           "kv_cache.policy_options")
        pool_blocks = self._pool_sizes(self.scheduler.num_kv_pools)
        self.kv_pools = [KVCacheManager(n, config.kv_cache.block_size, policy_reg.factory(policy_options))
                         for n in pool_blocks]
        self.scheduler.bind(self.kv_pools)
        graph_batch = min(config.backend.max_graph_batch_size, config.scheduler.max_num_seqs)
        self.runner = ModelRunner(self.model, self.backend, config.kv_cache.block_size, pool_blocks, self.dtype,
                                  cache_dtype=self.kv_dtype, max_model_len=self.max_model_len,
                                  graph_batch_size=graph_batch if config.backend.cuda_graphs else 0)
        self.sampler = Sampler(config.model.seed, fused=self.backend.fused_sampler())
        self.metric_sinks = {name: registry.get("metric", name).factory(config.metrics)
                             for name in config.metrics.enabled}
        self.groups: dict[str, RequestGroup] = {}
        self.overlap_output = config.scheduler.overlap_output
        mode = config.scheduler.async_scheduling
        self.async_scheduling = mode == "on" or (mode == "auto" and self.backend.async_output)
        self._inflight: InflightStep | None = None
        self._carried: tuple[SchedulerOutput, list[list[int]]] | None = None
        self._tokens_since_step = 0  # tokens accepted since the last StepEvent
        self._deferred: list[SampledToken] = []
        self._by_request: dict[str, tuple[RequestGroup, CompletionState]] = {}
        self._pending: dict[str, RequestGroup] = {}
        self.step_counter = 0
        self.phase_seconds = {"schedule": 0.0, "execute": 0.0, "sample": 0.0, "update": 0.0}

    # ---- set-up helpers ------------------------------------------------------------------------
    def _eos_ids(self) -> frozenset[int]:
        ids: set[int] = set()
        generation = getattr(self.model, "generation_config", None)
        for source in (getattr(generation, "eos_token_id", None), getattr(self.tokenizer, "eos_token_id", None)):
            if isinstance(source, int):
                ids.add(source)
            elif isinstance(source, (list, tuple)):
                ids.update(int(x) for x in source)
        return frozenset(ids)

    def _pool_sizes(self, num_pools: int) -> list[int]:
        kv = self.config.kv_cache
        total = kv.num_blocks
        if total is None:
            per_block = kv_bytes_per_block(self.model, kv.block_size, self.kv_dtype)
            if self.backend.device_type == "cpu":
                budget = kv.cpu_memory_bytes
            else:
                free, device_total = self.backend.memory_info()
                budget = int(free - device_total * (1.0 - kv.memory_utilization))
            total = max(budget // per_block, 2 * num_pools)
        sizes = [max(1, int(total * f)) for f in self.scheduler.kv_pool_fractions()]
        return sizes

    # ---- requests ------------------------------------------------------------------------------
    def encode(self, prompt: str) -> list[int]:
        if self.tokenizer is None:
            raise InvalidRequestError("this model has no tokenizer: pass prompt_token_ids")
        return list(self.tokenizer(prompt).input_ids)

    def add_request(self, prompt: str | list[int] | None, params: SamplingParams | None = None, *,
                    request_id: str | None = None, priority: int = 0, stream: bool = True) -> str:
        """Validate and queue a request; returns its id. Raises `InvalidRequestError` subclasses.

        With ``stream=False`` the request's output is reported only once, when it finishes.
        """
        params = params or SamplingParams()
        params.validate()
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt must not be empty")
            text, token_ids = prompt, self.encode(prompt)
        else:
            text, token_ids = None, list(prompt or [])
        if not token_ids:
            raise InvalidRequestError("prompt must contain at least one token")
        if any(not (0 <= t < self.vocab_size) for t in token_ids):
            raise InvalidRequestError(f"prompt token ids must be in [0, {self.vocab_size})")
        if len(token_ids) >= self.max_model_len:
            raise PromptTooLongError(
                f"prompt has {len(token_ids)} tokens; the context is {self.max_model_len} "
                f"(at most {self.max_model_len - 1} prompt tokens leave room for one generated token)"
            )
        smallest_pool = min(p.num_blocks for p in self.kv_pools)
        if self.kv_pools[0].blocks_needed(len(token_ids) + 1) > smallest_pool:
            raise PromptTooLongError(f"prompt of {len(token_ids)} tokens does not fit the KV cache "
                                     f"({smallest_pool} blocks of {self.config.kv_cache.block_size})")
        if len(self.scheduler.waiting) + params.n > self.config.scheduler.max_waiting:
            raise EngineOverloadedError(f"waiting queue is full ({self.config.scheduler.max_waiting} requests)")
        request_id = request_id or f"req-{next(_request_counter)}"
        if request_id in self.groups:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        room = self.max_model_len - len(token_ids)
        max_tokens = min(params.max_tokens or room, room)
        now = time.monotonic()
        completions = []
        for index in range(params.n):
            child_id = request_id if params.n == 1 else f"{request_id}#{index}"
            request = Request(child_id, token_ids, params, max_tokens, eos_token_ids=self.eos_token_ids,
                              priority=priority, arrival_time=now, parent_id=request_id, index=index)
            detok = IncrementalDetokenizer(self.tokenizer, token_ids, params.skip_special_tokens)
            completions.append(CompletionState(request, detok, logprobs=[] if params.logprobs is not None else None))
        group = RequestGroup(request_id, text, token_ids, params, completions, RequestMetrics(arrival_time=now),
                             stream=stream)
        self.groups[request_id] = group
        for state in completions:
            self._by_request[state.request.request_id] = (group, state)
            self.scheduler.add(state.request)
        return request_id

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its KV blocks; its final output reports ``abort``."""
        group = self.groups.get(request_id)
        if group is None:
            return False
        for state in group.completions:
            if state.finish_reason is None:
                state.request.drop_pending_token()  # its step is in flight; the token is dropped
                finish(state, RequestStatus.FINISHED_ABORTED)
                self._release(group, state)
        self._pending[request_id] = group
        return True

    def abort_all(self) -> None:
        """Abort every request and forget them (after a failed step)."""
        for request_id in list(self.groups):
            self.abort(request_id)
        self._deferred = []
        self._inflight = None
        self._carried = None
        self._finalize(dict(self._pending))
        self._pending.clear()

    def release(self) -> None:
        """Drop the KV pool tensors and captured graphs (device memory); the engine cannot step after this."""
        self.runner.kv_caches = []
        self.runner.graphs = None

    def has_unfinished(self) -> bool:
        return (bool(self.groups) or bool(self._pending) or bool(self._deferred)
                or self._inflight is not None or self._carried is not None)

    # ---- the step ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Schedule, run the model once, sample, update requests; return outputs that changed.

        A step has a fast half (append the sampled tokens, finish on EOS / stop ids / length, free
        KV: everything the next schedule needs) and a slow half (detokenize, stop strings,
        logprobs, outputs, metrics).

        With async scheduling the step is queued on the device with placeholders for its sampled
        tokens (`PENDING_TOKEN`), and the *previous* step's tokens are read and processed while
        the device computes; the next step's inputs take those tokens from device memory. Without
        it, ``scheduler.overlap_output`` and a batch of at least ``OVERLAP_MIN_BATCH`` sequences
        defer the slow half to the next step instead. Either way outputs arrive one step later,
        and a request that ends meanwhile has the token computed for it dropped. On a backend with
        captured graphs, a step that must run eagerly (prefill) is not launched behind a step in
        flight: that call returns the in-flight step's outputs and the next call runs the plan.
        """
        start = time.monotonic()
        phases = self.phase_seconds
        tick = time.perf_counter()
        if self._carried is not None:
            plan, block_ids = self._carried
            self._carried = None
        else:
            try:
                plan = self.scheduler.schedule()
            except Exception as exc:
                raise PluginError(
                    f"scheduler {self.config.scheduler.name!r} raised {type(exc).__name__}: {exc}") from exc
            # before any read below frees the blocks of a request that turns out finished
            block_ids = [self.kv_pools[plan.pool].block_ids(c.request.request_id) for c in plan.chunks]
        tock = time.perf_counter()
        phases["schedule"] += tock - tick
        replay = not plan.is_empty and self.runner.replays_graph(plan, block_ids)
        if self._inflight is not None and not plan.is_empty and self.runner.graphs is not None and not replay:
            # Launching an eager step (prefill) keeps the host busy for milliseconds: hand out the
            # step in flight first and run this plan in the next call.
            self._carried = (plan, block_ids)
            return self._read_inflight()
        samplers = [c.request for c in plan.chunks
                    if c.request.num_computed_tokens + c.num_tokens == c.request.num_tokens]
        pipelined = self.async_scheduling and not plan.is_empty and not any(
            r.params.needs_penalties or r.params.logprobs is not None for r in samplers)
        outputs = [] if pipelined else self._read_inflight()
        if plan.is_empty:
            touched = self._render(self._take_deferred())
            if touched:  # aborts or finishes changed the queues: let gauges see it
                self._emit_step(plan, start, time.monotonic())
            return outputs + self._finalize(touched)
        feed = self._inflight.feed if self._inflight is not None else None
        pending = self.sampler.launch(self.runner.execute(plan, block_ids, feed, replay=replay), samplers)
        tick = time.perf_counter()
        phases["execute"] += tick - tock
        # the device is busy with this step: process the previous one meanwhile
        outputs += self._read_inflight() if self._inflight is not None else self._finalize(
            self._render(self._take_deferred()))
        tock = time.perf_counter()
        phases["update"] += tock - tick
        for chunk in plan.chunks:
            chunk.request.num_computed_tokens += chunk.num_tokens
            group = self._by_request.get(chunk.request.request_id, (None,))[0]
            if group is not None and group.metrics.first_scheduled_time is None:
                group.metrics.first_scheduled_time = start
        self.scheduler.after_step(plan)
        if pipelined:
            self._inflight = self._hold(pending)
            self._emit_step(plan, start, time.monotonic())
            return outputs
        result = self.sampler.collect(pending)  # waits for the device
        tick = time.perf_counter()
        phases["sample"] += tick - tock
        now = time.monotonic()
        accepted = self._accept_all(samplers, result.token_ids, result.logprobs, now)
        self._emit_step(plan, start, now)
        if self.overlap_output and len(accepted) >= OVERLAP_MIN_BATCH:
            self._deferred = accepted
        else:
            outputs += self._finalize(self._render(accepted))
        phases["update"] += time.perf_counter() - tick
        return outputs

    def _hold(self, pending: PendingSample) -> InflightStep:
        """Leave a launched step in flight: placeholders for its tokens, a host copy under way."""
        rows = {}
        for row, request in enumerate(pending.requests):
            if not request.is_finished:  # ended while it was being launched: its token is dropped
                request.output_token_ids.append(PENDING_TOKEN)
                rows[request.request_id] = row
        return InflightStep(pending.requests, TokenFeed(pending.token_ids, rows),
                            self.backend.start_host_copy(pending.token_ids))

    def _read_inflight(self) -> list[RequestOutput]:
        """Wait for the step in flight, put its tokens in place of the placeholders, process them."""
        inflight, self._inflight = self._inflight, None
        if inflight is None:
            return []
        tick = time.perf_counter()
        token_ids = inflight.read()
        self.phase_seconds["sample"] += time.perf_counter() - tick
        accepted = self._accept_all(inflight.requests, token_ids, [None] * len(token_ids), time.monotonic())
        return self._finalize(self._render(self._take_deferred() + accepted))

    def _accept_all(self, requests: list[Request], token_ids: list[int], logprobs: list[Any], now: float
                    ) -> list[SampledToken]:
        """The fast half for each sampled request that is still known to the engine."""
        accepted = []
        for request, token_id, logprob in zip(requests, token_ids, logprobs):
            entry = self._by_request.get(request.request_id)
            if entry is None:  # finished and reported while this step ran (late stop string)
                request.drop_pending_token()
                continue
            item = self._accept_token(entry[0], entry[1], token_id, logprob, now)
            if item is not None:
                accepted.append(item)
        return accepted

    def _take_deferred(self) -> list[SampledToken]:
        items, self._deferred = self._deferred, []
        return items

    def _accept_token(self, group: RequestGroup, state: CompletionState, token_id: int, logprob: Any,
                      now: float) -> SampledToken | None:
        """Fast half: record the token (in place of its placeholder under async scheduling) and finish
        on what needs no text (EOS, stop ids, length)."""
        request, params = state.request, group.params
        if state.finish_reason is not None:  # ended meanwhile (abort, or a stop string one step late): drop
            request.drop_pending_token()
            return None
        if request.has_pending_token:
            request.output_token_ids[-1] = token_id
        else:
            request.output_token_ids.append(token_id)
        self._tokens_since_step += 1
        state.token_times.append(now)
        if group.metrics.first_token_time is None:
            group.metrics.first_token_time = now
        group.metrics.last_token_time = now
        may_stop = request.num_output_tokens >= params.min_tokens
        visible = True
        if may_stop and not params.ignore_eos and token_id in request.eos_token_ids:
            finish(state, RequestStatus.FINISHED_STOPPED)
            visible = False
        elif may_stop and token_id in params.stop_token_ids:
            finish(state, RequestStatus.FINISHED_STOPPED, token_id)
            visible = False
        elif request.num_output_tokens >= request.max_tokens or request.num_tokens >= self.max_model_len:
            finish(state, RequestStatus.FINISHED_LENGTH)
        if state.finish_reason is not None:
            self._release(group, state)
        return SampledToken(group, state, token_id, logprob, visible, may_stop)

    def _render(self, items: list[SampledToken]) -> dict[str, RequestGroup]:
        """Slow half: logprobs, text, stop strings; returns the groups whose output changed."""
        touched: dict[str, RequestGroup] = dict(self._pending)
        self._pending.clear()
        for item in items:
            group, state, params = item.group, item.state, item.group.params
            touched[group.request_id] = group
            if state.finish_reason == RequestStatus.FINISHED_ABORTED.value:
                continue
            if state.logprobs is not None and item.logprob is not None:
                state.logprobs.append(token_logprob(self.tokenizer, item.token_id, item.logprob))
            lazy_text = not group.stream and not params.stop  # nobody reads text before the end
            if lazy_text:
                if state.finish_reason is not None:
                    shown = state.request.output_token_ids
                    state.text = state.detokenizer.decode_all(shown if item.visible else shown[:-1])
                continue
            if not item.visible:
                continue
            previous = len(state.text)
            state.text += state.detokenizer.add(item.token_id)
            if state.finish_reason is not None:
                state.text += state.detokenizer.flush()
            hit = find_stop_string(state.text, previous, params.stop) if item.may_stop and params.stop else None
            if hit is not None:
                state.text = state.text[: hit[0]]
                released = state.finish_reason is not None
                finish(state, RequestStatus.FINISHED_STOPPED, hit[1])
                if not released:
                    self._release(group, state)
        return touched

    def _release(self, group: RequestGroup, state: CompletionState) -> None:
        self.scheduler.finish(state.request)
        self.sampler.forget(state.request.request_id)
        now = time.monotonic()
        if group.finished:
            group.metrics.finished_time = now
        group.metrics.num_cached_tokens = max(group.metrics.num_cached_tokens, state.request.num_cached_tokens)
        group.metrics.num_preemptions += state.request.num_preemptions
        event = RequestEvent(
            request_id=state.request.request_id,
            arrival_time=group.metrics.arrival_time,
            first_token_time=state.token_times[0] if state.token_times else None,
            finished_time=now,
            token_times=tuple(state.token_times),
            num_prompt_tokens=len(group.prompt_token_ids),
            num_output_tokens=state.request.num_output_tokens,
            num_cached_tokens=state.request.num_cached_tokens,
            finish_reason=state.finish_reason or "abort",
        )
        self._notify("on_request_finished", event)

    def _finalize(self, touched: dict[str, RequestGroup]) -> list[RequestOutput]:
        outputs = []
        for request_id, group in touched.items():
            if not (group.stream or group.finished):
                continue
            outputs.append(group.output())
            if group.finished:
                self.groups.pop(request_id, None)
                for state in group.completions:
                    self._by_request.pop(state.request.request_id, None)
        return outputs

    # ---- metrics -------------------------------------------------------------------------------
    def _emit_step(self, plan: SchedulerOutput, start: float, end: float) -> None:
        self.step_counter += 1
        num_output_tokens, self._tokens_since_step = self._tokens_since_step, 0
        decode_tokens = sum(1 for c in plan.chunks if c.num_tokens == 1 and c.request.num_output_tokens > 1)
        event = StepEvent(
            step=self.step_counter, start_time=start, end_time=end, num_seqs=len(plan.chunks),
            num_decode_tokens=decode_tokens, num_prefill_tokens=plan.num_tokens - decode_tokens,
            num_output_tokens=num_output_tokens, num_waiting=len(self.scheduler.waiting),
            num_running=len(self.scheduler.running), num_preempted=len(plan.preempted),
            kv=tuple(pool.stats() for pool in self.kv_pools),
        )
        self._notify("on_step", event)

    def _notify(self, method: str, event: Any) -> None:
        for name, sink in list(self.metric_sinks.items()):
            try:
                getattr(sink, method)(event)
            except Exception as exc:  # a broken metric plugin is dropped, the engine keeps serving
                log.error("metric sink %r raised %s: %s; disabling it", name, type(exc).__name__, exc)
                del self.metric_sinks[name]

    def get_stats(self) -> dict[str, Any]:
        """Metric snapshots, KV-pool statistics, scheduler counters and queue sizes."""
        stats: dict[str, Any] = {name: sink.snapshot() for name, sink in self.metric_sinks.items()}
        stats["kv_pools"] = [pool.stats() for pool in self.kv_pools]
        stats["num_waiting"] = len(self.scheduler.waiting)
        stats["num_running"] = len(self.scheduler.running)
        stats["num_preemptions"] = self.scheduler.num_preemptions
        stats["forward_tokens"] = self.runner.num_forward_tokens
        stats["steps"] = self.step_counter
        stats["phase_seconds"] = dict(self.phase_seconds)
        if hasattr(self.scheduler, "stats"):
            stats["scheduler"] = self.scheduler.stats()
        return stats
