"""The engine core: admits requests, runs one scheduled step at a time, turns tokens into outputs.

Single-threaded by design: `LLM` drives it from a background loop thread.

One overlap mechanism, a pipeline of depth 0 or 1. Depth 1 (async scheduling; ``auto`` turns it
on for backends whose host copies are asynchronous, i.e. CUDA): step N+1 is planned and queued on
the device before step N's sampled tokens are read; the plan holds placeholders for them and the
runner feeds them from device memory, so planning, input preparation and text processing hide
behind device work. Every sampling parameter (penalties, bans, logit_bias, filters, seeds,
logprobs) is device work read with the tokens, so no step drains the pipeline for it. A step with
constrained (structured-output) requests stays at depth 1 with the sampling split off: its forward
pass is queued, then step N's tokens are read (the grammars take them), then its masks are computed
and its sampling queued. On a backend with captured graphs, a step that must run eagerly (prefill)
is not launched behind a step in flight: that call hands out the in-flight step's outputs and the
next call launches the planned step (TTFT). Outputs arrive one step later at depth 1, and a request
that ends on EOS or a stop has one more token computed and dropped.
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import Any, Callable, Sequence

import attrs
import torch

from sagellm_core.config import EngineConfig
from sagellm_core.engine.admission import Admission
from sagellm_core.engine.builder import build_engine
from sagellm_core.engine.events import EngineEvents
from sagellm_core.engine.output import OutputProcessor
from sagellm_core.engine.token_output import TokenDelta, TokenOutputProcessor
from sagellm_core.errors import InvalidRequestError, PluginError
from sagellm_core.models.token_feed import TokenFeed
from sagellm_core.outputs import RequestOutput
from sagellm_core.plan import StepPlan
from sagellm_core.plugin_manager import SageLLMPluginManager, create_plugin_manager
from sagellm_core.request import Request, RequestStatus
from sagellm_core.request_state import CompletionState, RequestGroup
from sagellm_core.sampling import Logprobs, PendingSample
from sagellm_core.sampling_params import SamplingParams
from sagellm_core.structured.manager import StructuredOutputs

_request_counter = itertools.count()
log = logging.getLogger("sagellm")


@attrs.define
class PlannedStep:
    """A plan and the in-flight step that feeds its placeholders (if any)."""

    plan: StepPlan
    feed: TokenFeed | None
    requests: list[Request]  # of the sampling chunks, in order
    grammar: bool  # it samples constrained requests: read the previous step before sampling


@attrs.define
class InflightStep:
    """A launched step whose sampled tokens the host has not read yet."""

    plan: StepPlan
    sample: PendingSample
    feed: TokenFeed
    read: Callable[[], tuple[list[int], list[Logprobs | None]]]


class LLMEngine:
    """Build with an `EngineConfig`; call `add_request` and `step` until `has_unfinished` is False.

    ``detokenize=False`` (token mode, the engine process's): `step` returns no `RequestOutput`; the
    step's changes are taken with `take_deltas` as `TokenDelta`s (new token ids, logprobs, finish
    reasons; no text), and stop strings are left to the caller, which ends a sequence that hit one
    with `finish_stopped` (`sagellm_core.engine.token_output`).

    For a watchdog: ``last_progress_time`` (``time.monotonic()`` of the last step that ran or
    delivered something) and ``step_counter``; work is queued while `has_unfinished` is True.
    """

    def __init__(self, config: EngineConfig | None = None, *,
                 plugin_manager: SageLLMPluginManager | None = None, detokenize: bool = True) -> None:
        self.config = config = config or EngineConfig()
        self.plugins = plugin_manager or create_plugin_manager()
        parts = build_engine(config, self.plugins)
        self.config, self.budgets = parts.config, parts.budgets  # budgets resolved from the device
        self.graph_capture_seconds = parts.graph_capture_seconds
        self.backend_choice, self.backend, self.dtype = parts.backend_choice, parts.backend, parts.dtype
        self.model_name, self.tokenizer, self.model = parts.model_name, parts.tokenizer, parts.model
        self.quantization, self.kv_dtype = parts.quantization, parts.kv_dtype
        self.vocab_size, self.max_model_len = parts.vocab_size, parts.max_model_len
        self.eos_token_ids = parts.eos_token_ids
        self.scheduler, self.kv_pools, self.runner = parts.scheduler, parts.kv_pools, parts.runner
        self.sampler, self.async_scheduling = parts.sampler, parts.async_scheduling
        self.metric_sinks = parts.metric_sinks
        self.structured = StructuredOutputs(self.tokenizer, self.vocab_size, self.eos_token_ids,
                                            bitmask_op=self.backend.bitmask_op())
        self.sampler.logits_processors.append(self.structured)
        block_size = config.kv_cache.block_size
        self.admission = Admission(self.tokenizer, self.vocab_size, self.max_model_len,
                                   min(p.num_blocks for p in self.kv_pools) * block_size, block_size,
                                   config.scheduler.max_waiting)
        self.events = EngineEvents(self.metric_sinks, self.scheduler, self.kv_pools)
        # detokenize=False: token mode, outputs are deltas without text (the engine process's front end
        # detokenizes and applies stop strings; see engine/token_output.py)
        output_processor = OutputProcessor if detokenize else TokenOutputProcessor
        self.outputs = output_processor(self.tokenizer, self.scheduler, self._on_finished)
        self._inflight: InflightStep | None = None
        self._planned: PlannedStep | None = None
        self.last_progress_time = time.monotonic()
        self.phase_seconds = {"schedule": 0.0, "execute": 0.0, "sample": 0.0, "update": 0.0}

    @property
    def step_counter(self) -> int:
        return self.events.step_counter

    @property
    def groups(self) -> dict[str, RequestGroup]:
        """Requests not finished and reported yet, by id."""
        return self.outputs.groups

    # ---- requests ------------------------------------------------------------------------------
    def encode(self, prompt: str) -> list[int]:
        return self.admission.encode(prompt)

    def add_request(self, prompt: str | list[int] | None, params: SamplingParams | None = None, *,
                    request_id: str | None = None, priority: int = 0, stream: bool = True) -> str:
        """Check the prompt against the context and queue; returns its id. Raises `InvalidRequestError`
        subclasses. ``params`` were validated when they were built (`SamplingParams` checks every
        field on construction and assignment); a request that fails later fails alone.

        ``prompt``: text (tokenized here) or token ids (used as they are). With ``stream=False``
        the request's output is reported only once, when it finishes.
        """
        params = params or SamplingParams()
        self.structured.check(params)
        text, token_ids = self.admission.prompt_ids(prompt)
        bad_token_ids = self.admission.check_token_params(params)
        max_tokens = self.admission.max_tokens(len(token_ids), params)
        self.admission.check_queue(len(self.scheduler.waiting), params.n)
        request_id = request_id or f"req-{next(_request_counter)}"
        if request_id in self.outputs.groups:
            raise InvalidRequestError(f"request id {request_id!r} is already in use")
        group = self.admission.new_group(request_id, text, token_ids, params, max_tokens, priority, stream,
                                         self.eos_token_ids, bad_token_ids)
        self.outputs.add(group)
        for state in group.completions:
            self.scheduler.add(state.request)
        return request_id

    def abort(self, request_id: str) -> bool:
        """Stop a request now and free its KV blocks; its final output reports ``abort``."""
        group = self.outputs.groups.get(request_id)
        if group is None:
            return False
        for state in group.completions:
            self.outputs.end(group, state, RequestStatus.FINISHED_ABORTED)
        return True

    def take_deltas(self) -> list[TokenDelta]:
        """Token mode: the changes of the steps since the last call, one `TokenDelta` per request."""
        if not isinstance(self.outputs, TokenOutputProcessor):
            raise TypeError("take_deltas needs an engine built with detokenize=False")
        return self.outputs.take_deltas()

    def finish_stopped(self, request_id: str, stop_reason: str) -> bool:
        """End one sequence (a child id when ``n`` > 1) as stopped at ``stop_reason``, a stop string
        its caller found in the text (token mode); False if it is unknown or ended already."""
        entry = self.outputs.states.get(request_id)
        if entry is None or entry[1].finish_reason is not None:
            return False
        self.outputs.end(*entry, RequestStatus.FINISHED_STOPPED, stop_reason)
        return True

    def abort_all(self) -> None:
        """Abort every request and forget them (after a failed step)."""
        for request_id in list(self.outputs.groups):
            self.abort(request_id)
        self._inflight = None
        self._planned = None
        self.structured.settle()
        self.outputs.take_outputs()

    def release(self) -> None:
        """Write the cached KV blocks to the persistent tier (if any), then drop the KV pool tensors
        and captured graphs (device memory); the engine cannot step after this."""
        if self.runner.kv_caches:
            try:
                self.kv_pools[0].persist()
            except Exception as exc:  # the cache is an optimisation: shutting down must not fail on it
                log.warning("KV tiers: could not persist the cached blocks: %s: %s", type(exc).__name__, exc)
        tiers = self.kv_pools[0].tiers
        if tiers is not None:
            tiers.close()
        self.runner.release()

    def has_unfinished(self) -> bool:
        return (bool(self.outputs.groups) or bool(self.outputs.changed)
                or self._inflight is not None or self._planned is not None)

    # ---- the step ------------------------------------------------------------------------------
    def step(self) -> list[RequestOutput]:
        """Plan, run the model once, sample, update requests; return the outputs that changed."""
        start = time.monotonic()
        planned, self._planned = self._planned or self._plan(start), None
        plan = planned.plan
        if plan.is_empty:
            outputs = self._drain() + self.outputs.take_outputs()
            self._progress(bool(outputs))
            self.events.step(plan, start, time.monotonic(), idle=not outputs and not plan.preempted)
            return outputs
        replay = self.runner.replays_graph(plan)
        if self._inflight is not None and self.runner.captures_graphs and not replay:
            self._planned = planned  # an eager launch keeps the host busy: hand out the step in flight first
            outputs = self._drain()
            self._progress(True)
            self.events.step(StepPlan(), start, time.monotonic())
            return outputs
        synchronous = not self.async_scheduling
        waited = plan if synchronous else self._inflight.plan if self._inflight is not None else None
        outputs = self._drain() if synchronous else []
        logits = self._execute(planned, replay)
        for pool in self.kv_pools:
            pool.step_launched()
        if planned.grammar:  # the masks of this step need the previous step's tokens
            outputs += self._drain(masks_for=planned.requests, device=logits.device)
        launched = self._launch_sampling(planned, logits)
        outputs += self._drain()  # the previous step, processed while the device runs this one
        self._inflight = launched
        if synchronous:
            outputs += self._drain()
        self._progress(True)
        end = time.monotonic()
        self.events.step(plan, start, end)
        self._observe_prefill(waited, end - start)
        return outputs

    def _observe_prefill(self, plan: StepPlan | None, seconds: float) -> None:
        """The KV tiers' load gate learns what a prefill token costs from a step's wall time and the
        plan whose device work that time waited for: this step's when synchronous, the step before's
        under async scheduling (its tokens are read here while this one runs; None: nothing was waited
        for). Paired with this step's tokens instead, a prefill step got the time of the decode step
        before it: the fit saw prefill as nearly free and the gate turned even the host tier down."""
        tiers = self.kv_pools[0].tiers if self.kv_pools else None
        if tiers is not None and plan is not None:
            total = plan.num_tokens
            tiers.gate.observe_step(total - plan.num_decode_tokens, total, seconds)

    def _progress(self, made: bool) -> None:
        if made:
            self.last_progress_time = time.monotonic()

    def _plan(self, now: float) -> PlannedStep:
        tick = time.perf_counter()
        try:
            plan = self.scheduler.plan_step()
        except Exception as exc:
            raise PluginError(f"scheduler {self.config.scheduler.name!r} raised {type(exc).__name__}: {exc}") from exc
        for chunk in plan.chunks:
            group = self.outputs.group_of(chunk.request_id)
            if group is not None and group.metrics.first_scheduled_time is None:
                group.metrics.first_scheduled_time = now
        requests = [self.scheduler.requests[c.request_id] for c in plan.sampled]
        grammar = any(r.params.structured_outputs is not None for r in requests)
        self.phase_seconds["schedule"] += time.perf_counter() - tick
        feed = self._inflight.feed if self._inflight is not None else None
        return PlannedStep(plan, feed, requests, grammar)

    def _execute(self, planned: PlannedStep, replay: bool) -> Any:
        """Queue the step's forward pass on the device; its logits."""
        tick = time.perf_counter()
        logits = self.runner.execute(planned.plan, planned.feed, replay=replay)
        self.phase_seconds["execute"] += time.perf_counter() - tick
        return logits

    def _launch_sampling(self, planned: PlannedStep, logits: Any) -> InflightStep:
        """Queue the step's sampling on the device; nothing waits for it."""
        tick = time.perf_counter()
        plan, requests = planned.plan, planned.requests
        sample, failed = self.sampler.launch_each(logits, requests)
        for request, error in failed:
            entry = self.outputs.states.get(request.request_id)
            if entry is not None:
                self.outputs.fail(*entry, error)
        for request in requests:
            if request.is_finished:  # ended since it was planned: its token will be dropped
                self.sampler.forget(request.request_id)
        self.scheduler.on_launched(plan)
        rows = {r.request_id: row for row, r in enumerate(sample.requests)}
        self.phase_seconds["execute"] += time.perf_counter() - tick
        return InflightStep(plan, sample, TokenFeed(sample.token_ids, rows),
                            sample.start_host_copy(self.backend.start_host_copy))

    def _drain(self, masks_for: list[Request] | None = None, device: torch.device | None = None
               ) -> list[RequestOutput]:
        """Read the step in flight (waits for the device), accept its tokens, return the outputs.

        ``masks_for``: the rows of the step about to sample (on ``device``); once the grammars have
        taken the tokens read here (before the scheduler does), its masks start filling on the
        structured outputs' helper thread while this thread updates the requests and processes the
        outputs."""
        inflight, self._inflight = self._inflight, None
        if inflight is None:
            return []
        tick = time.perf_counter()
        token_ids, logprobs = inflight.read()
        tock = time.perf_counter()
        self.phase_seconds["sample"] += tock - tick
        request_ids = [r.request_id for r in inflight.sample.requests]
        complete = self._advance_grammars(inflight.sample.requests, token_ids)
        if masks_for is not None and device is not None:
            self.structured.prepare(masks_for, device)
        updates = self.scheduler.update_from_output(inflight.plan, token_ids, request_ids)
        for request in complete:
            if not request.is_finished:
                self.scheduler.finish(request, RequestStatus.FINISHED_STOPPED)
        self.outputs.process(updates, dict(zip(request_ids, logprobs)), time.monotonic())
        self.events.tokens_since_step += len(updates)
        outputs = self.outputs.take_outputs()
        self.phase_seconds["update"] += time.perf_counter() - tock
        return outputs

    def _advance_grammars(self, requests: list[Request], token_ids: Sequence[int]) -> list[Request]:
        """Constrained requests that accept their token (as `update_from_output` will): the grammar
        takes it; returns those whose grammar is now complete (or broken), which must end once the
        scheduler has their token."""
        accepted = [(request, int(token_id)) for request, token_id in zip(requests, token_ids)
                    if request.params.structured_outputs is not None
                    and self.scheduler.awaiting_token(request.request_id) is request]
        return self.structured.on_tokens(accepted) if accepted else []

    def _on_finished(self, group: RequestGroup, state: CompletionState) -> None:
        self.sampler.forget(state.request.request_id)
        self.structured.forget(state.request.request_id)
        self.events.request_finished(group, state, time.monotonic())

    def reset_prefix_cache(self) -> int:
        """Forget the device pools' cached prefix blocks that no request holds (vLLM's
        ``reset_prefix_cache``: e.g. before a timed run); the number forgotten."""
        return sum(pool.reset_prefix_cache() for pool in self.kv_pools)

    # ---- metrics -------------------------------------------------------------------------------
    def get_stats(self) -> dict[str, Any]:
        """Metric snapshots, KV-pool statistics, scheduler counters and queue sizes."""
        stats: dict[str, Any] = {name: sink.snapshot() for name, sink in self.metric_sinks.items()}
        stats["kv_pools"] = [pool.stats() for pool in self.kv_pools]
        stats["kv_tiers"] = [tier.as_dict() for tier in self.events.tier_stats()]
        stats["num_waiting"] = len(self.scheduler.waiting)
        stats["num_running"] = len(self.scheduler.running)
        stats["num_preemptions"] = self.scheduler.num_preemptions
        stats["forward_tokens"] = self.runner.num_forward_tokens
        stats["steps"] = self.step_counter
        stats["last_progress_time"] = self.last_progress_time
        stats["phase_seconds"] = dict(self.phase_seconds)
        stats["scheduler"] = self.scheduler.stats()
        stats["budgets"] = self.budgets.as_dict()
        graphs = self.runner.graphs if hasattr(self.runner, "graphs") else None
        stats["graph_capture"] = {"graphs": len(graphs.graphs) if graphs is not None else 0,
                                  "seconds": self.graph_capture_seconds}
        return stats
