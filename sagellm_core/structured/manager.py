"""Per-request grammar state for constrained requests, and the calls the engine makes:

* `StructuredOutputs.on_tokens(accepted)` with a step's accepted tokens: advances the requests'
  matchers (in llguidance's pool for many rows) and says which grammars are complete (those requests
  then finish).
* `StructuredOutputs.prepare(requests, device)` (optional) once the grammars have taken the previous
  step's tokens: starts computing this step's masks on a helper thread (llguidance's pool, GIL
  released), so they fill while the engine's thread processes the previous step's outputs.
* `StructuredOutputs.apply(logits, requests)` before sampling: the masks of every constrained row
  (the prepared ones, or computed now: llguidance in the calling thread for small batches or few
  cores, where a pool's wake-ups cost more than the masks, about 20 us a row; in its pool otherwise),
  applied on the logits' device in one batched op (`sagellm_core.structured.bitmask`).

A request's mask depends on its previous token: under async scheduling the engine queues the
forward pass of step N+1, then reads step N's tokens (the grammars take them), then computes the
masks and queues step N+1's sampling, so the mask work hides behind the forward pass. A mask is
never computed from a stale grammar: each matcher counts the tokens it took, and a row whose count
is not its request's number of outputs before the token being sampled (a token still in flight)
raises `StaleGrammarError` instead of masking with the wrong state.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import attrs
import llguidance
import llguidance.hf
import torch

from sagellm_core.errors import InvalidRequestError
from sagellm_core.request import PENDING_TOKEN, Request
from sagellm_core.sampling_params import SamplingParams
from sagellm_core.structured.bitmask import (BitmaskOp, BitmaskStaging, apply_bitmask_host, bitmask_words,
                                             fill_free_rows, mask_logits)
from sagellm_core.structured.grammar import compile_grammar
from sagellm_core.structured.params import StructuredOutputsParams

log = logging.getLogger("sagellm")
CACHE_SIZE = 128
PARALLEL_MIN_ROWS = 32  # fewer constrained rows than this: masks in the calling thread
MAX_THREADS = 2  # 256 rows on a 16-core H100 host: 1.09 ms with 2 threads, 1.44 with 4, 1.84 with 8


class StaleGrammarError(RuntimeError):
    """A mask was asked for a request whose grammar has not taken all its earlier tokens (a step's
    tokens still in flight): masking with that state would constrain the wrong position."""


def mask_threads() -> int:
    """llguidance's pool size: half the cores this process may use (at most `MAX_THREADS`); 1 means
    no pool (on a 2-core machine the pool's threads fought torch's and cost 10x the masks)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(MAX_THREADS, cores // 2))


def prior_outputs(request: Request) -> int:
    """Output tokens before the one being sampled now, counting placeholders of earlier steps."""
    tokens = request.output_token_ids
    return len(tokens) - (1 if tokens and tokens[-1] == PENDING_TOKEN else 0)


@attrs.define
class StructuredStats:
    """Host seconds spent computing masks (on whichever thread; ``helper_seconds`` of them on the
    helper thread, hidden behind the engine thread's work except for ``wait_seconds``, the time
    `apply` waited for them) and applying them; constrained rows; steps with a mask."""

    mask_seconds: float = 0.0
    helper_seconds: float = 0.0  # the part of mask_seconds spent on the helper thread
    wait_seconds: float = 0.0
    apply_seconds: float = 0.0
    masked_rows: int = 0
    masked_steps: int = 0


@attrs.define
class StepMasks:
    """The masks of one step's constrained rows: ``bitmask`` has a row per logits row on an
    accelerator (free rows all ones), or a row per constrained row on the CPU."""

    requests: list[Request]
    rows: list[int]
    matchers: list[tuple[llguidance.LLMatcher, int]]  # each constrained row's matcher and bitmask row
    bitmask: torch.Tensor
    device: torch.device
    filled: Future[float] | None = None  # a fill running on the helper thread (its seconds)
    started: threading.Event = attrs.field(factory=threading.Event)  # the helper thread holds it


class StructuredOutputs:
    """Grammar matchers of the engine's constrained requests (built lazily: the llguidance view of the
    tokenizer costs about a second, paid by the first constrained request). ``bitmask_op``: the
    backend's fused mask (`Backend.bitmask_op`); None: `mask_logits` in torch."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: frozenset[int],
                 bitmask_op: BitmaskOp | None = None) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.bitmask_op: BitmaskOp = bitmask_op or mask_logits
        self.stats = StructuredStats()
        self._lltokenizer: llguidance.LLTokenizer | None = None
        self._executor: llguidance.LLExecutor | None = None
        self._helper: ThreadPoolExecutor | None = None
        self._prototypes: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._matchers: dict[str, llguidance.LLMatcher] = {}
        self._consumed: dict[str, int] = {}  # tokens each matcher has taken
        self._staging = BitmaskStaging()
        self._prepared: StepMasks | None = None

    # ---- admission -----------------------------------------------------------------------------
    def check(self, params: SamplingParams) -> None:
        """Compile ``params``' constraint (cached); `InvalidRequestError` names what is wrong."""
        constraint = params.structured_outputs
        if constraint is not None:
            self._prototype(constraint)

    def _llg_tokenizer(self) -> llguidance.LLTokenizer:
        if self._lltokenizer is None:
            if self.tokenizer is None or not getattr(self.tokenizer, "is_fast", False):
                raise InvalidRequestError("structured outputs need the model's fast (tokenizers) tokenizer")
            n_vocab = max(self.vocab_size, len(self.tokenizer))
            eos = sorted(i for i in self.eos_token_ids if i < len(self.tokenizer)) or None  # llguidance's range
            self._lltokenizer = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=n_vocab, eos_token=eos)
            threads = mask_threads()
            self._executor = llguidance.LLExecutor(num_threads=threads) if threads > 1 else None
        return self._lltokenizer

    def _prototype(self, constraint: StructuredOutputsParams) -> llguidance.LLMatcher:
        key = constraint.cache_key()
        prototype = self._prototypes.get(key)
        if prototype is not None:
            self._prototypes.move_to_end(key)
            return prototype
        grammar = compile_grammar(constraint)
        prototype = llguidance.LLMatcher(self._llg_tokenizer(), grammar, log_level=0)
        if prototype.is_error():
            raise InvalidRequestError(f"structured_outputs.{constraint.kind}: {prototype.get_error()}")
        self._prototypes[key] = prototype
        if len(self._prototypes) > CACHE_SIZE:
            self._prototypes.popitem(last=False)
        return prototype

    def _matcher(self, request: Request) -> llguidance.LLMatcher:
        matcher = self._matchers.get(request.request_id)
        if matcher is None:
            constraint = request.params.structured_outputs
            assert constraint is not None  # only constrained requests get a matcher
            matcher = self._prototype(constraint).deep_copy()
            self._matchers[request.request_id] = matcher
        return matcher

    # ---- the engine's calls --------------------------------------------------------------------
    def prepare(self, requests: list[Request], device: torch.device) -> None:
        """Start computing the masks of a step whose rows are ``requests`` (their grammars have taken
        every earlier token) on the helper thread; `apply` with the same list picks them up. Does
        nothing with one core for masks or fewer than `PARALLEL_MIN_ROWS` constrained rows (the
        thread hand-off would cost about what the masks do): `apply` then computes them."""
        self.settle()
        if self._executor is None:
            return
        try:
            masks = self._new_masks(requests, device)
        except Exception:  # noqa: BLE001 - `apply` raises it again, in the sampler, where a failing row fails alone
            return
        if masks is not None and len(masks.rows) >= PARALLEL_MIN_ROWS:
            if self._helper is None:
                self._helper = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sagellm-masks")
            masks.filled = self._helper.submit(self._fill_started, masks)
            self._prepared = masks
            # NOTE: waiting here hands the GIL to the helper thread at once; otherwise it could wait up
            # to the interpreter's switch interval (5 ms) while this thread runs Python
            masks.started.wait()

    def _fill_started(self, masks: StepMasks) -> float:
        """`_fill_timed` on the helper thread, first telling the engine's thread it has begun."""
        masks.started.set()
        return self._fill_timed(masks)

    def settle(self) -> None:
        """Wait for and drop masks prepared but not applied (a failed step): no matcher may advance
        and no buffer may be refilled while the helper thread reads them."""
        prepared, self._prepared = self._prepared, None
        if prepared is not None and prepared.filled is not None:
            prepared.filled.exception()

    def apply(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """``logits`` with the rows of constrained ``requests`` (row i belongs to ``requests[i]``) masked.
        Rows of requests that finished since the step was planned (their token will be dropped) are
        left as they are (with prepared masks: those finished before `prepare`; a row finished in
        between keeps its mask, which changes nothing since its token is dropped)."""
        masks = self._take_prepared(requests, logits.device)
        if masks is None:
            masks = self._new_masks(requests, logits.device)
            if masks is None:
                return logits
            self.stats.mask_seconds += self._fill_timed(masks)
        tick = time.perf_counter()
        if masks.device.type == "cpu":
            logits = apply_bitmask_host(logits, masks.bitmask, masks.rows)
        else:
            logits = self.bitmask_op(logits, self._staging.to_device(masks.bitmask, masks.device))
        stats = self.stats
        stats.apply_seconds += time.perf_counter() - tick
        stats.masked_rows += len(masks.rows)
        stats.masked_steps += 1
        return logits

    def _take_prepared(self, requests: list[Request], device: torch.device) -> StepMasks | None:
        """The prepared masks of this step, once filled (None if none were prepared for it)."""
        masks, self._prepared = self._prepared, None
        if masks is None:
            return None
        tick = time.perf_counter()
        assert masks.filled is not None
        seconds = masks.filled.result()  # raises what the fill raised
        self.stats.wait_seconds += time.perf_counter() - tick
        self.stats.mask_seconds += seconds
        self.stats.helper_seconds += seconds
        return masks if masks.requests is requests and masks.device == device else None

    def _new_masks(self, requests: list[Request], device: torch.device) -> StepMasks | None:
        """The constrained rows of ``requests`` and a host buffer for their masks (not filled yet);
        None when no row is constrained. Raises `StaleGrammarError` for a grammar behind its request."""
        rows = [i for i, r in enumerate(requests) if r.params.structured_outputs is not None and not r.is_finished]
        if not rows:
            return None
        for i in rows:
            request = requests[i]
            if self._consumed.get(request.request_id, 0) != prior_outputs(request):
                raise StaleGrammarError(f"request {request.request_id}: its grammar has taken "
                                        f"{self._consumed.get(request.request_id, 0)} tokens, "
                                        f"{prior_outputs(request)} precede the one being sampled")
        words = bitmask_words(self._llg_tokenizer().vocab_size)
        if device.type == "cpu":  # one row per constrained row
            bitmask = self._staging.take(len(rows), words, device)
            matchers = [(self._matcher(requests[i]), k) for k, i in enumerate(rows)]
        else:  # one row per logits row
            bitmask = self._staging.take(len(requests), words, device)
            fill_free_rows(bitmask, rows)
            matchers = [(self._matcher(requests[i]), i) for i in rows]
        return StepMasks(requests, rows, matchers, bitmask, device)

    def _fill_timed(self, masks: StepMasks) -> float:
        """Compute the masks of ``masks``' rows into its buffer; the seconds it took."""
        tick = time.perf_counter()
        self._fill(masks.matchers, masks.bitmask)
        return time.perf_counter() - tick

    def _fill(self, matchers: list[tuple[llguidance.LLMatcher, int]], bitmask: torch.Tensor) -> None:
        row_bytes = bitmask.shape[1] * 4
        if self._executor is None or len(matchers) < PARALLEL_MIN_ROWS:
            for matcher, k in matchers:
                matcher.unsafe_compute_mask_ptr(bitmask[k].data_ptr(), row_bytes)
        else:
            self._executor.unsafe_compute_mask_ptr(matchers, bitmask.data_ptr(), row_bytes, bitmask.shape[0])

    def on_tokens(self, accepted: list[tuple[Request, int]]) -> list[Request]:
        """Advance the grammars of the constrained requests among ``accepted`` (request, token) pairs;
        the requests that must stop (grammar complete: nothing but EOS may follow, or the token broke
        it)."""
        rows = [(request, token) for request, token in accepted if request.params.structured_outputs is not None]
        if not rows:
            return []
        self.settle()
        matchers = [(self._matcher(request), token) for request, token in rows]
        # serially: llguidance's pool took 2-3x longer for 256 rows on a 16-core H100 host (bench/mask_threads.py)
        taken = [matcher.consume_token(token) for matcher, token in matchers]
        stopping = []
        for (request, token), (matcher, _), ok in zip(rows, matchers, taken):
            if not ok:
                log.warning("request %s: token %d rejected by its grammar (%s); stopping it",
                            request.request_id, token, matcher.get_error())
                stopping.append(request)
                continue
            self._consumed[request.request_id] = self._consumed.get(request.request_id, 0) + 1
            if matcher.is_stopped():
                stopping.append(request)
        return stopping

    def forget(self, request_id: str) -> None:
        """Drop a finished request's matcher."""
        self._matchers.pop(request_id, None)
        self._consumed.pop(request_id, None)
