"""Per-request grammar state for constrained requests, and the two calls the engine makes:

* `StructuredOutputs.apply(logits, requests)` before sampling: computes the token bitmask of every
  constrained row on the host (llguidance, GIL released: in the calling thread for small batches or
  few cores, where a thread pool's wake-ups cost more than the masks, about 20 us a row; in
  llguidance's pool otherwise) and applies all of them on the logits' device in one batched op.
  On a GPU the host work overlaps the forward pass already queued on the device.
* `StructuredOutputs.on_token(request, token_id)` when a sampled token is accepted: advances the
  request's matcher and says whether the grammar is complete (the request then finishes).

A request's mask depends on its previous token: under async scheduling the engine queues the
forward pass of step N+1, then reads step N's tokens (the grammars take them), then computes the
masks and queues step N+1's sampling, so the mask work hides behind the forward pass.
"""

from __future__ import annotations

import logging
import os
import time
from collections import OrderedDict
from typing import Any

import attrs
import llguidance
import llguidance.hf
import torch

from sagellm_core.errors import InvalidRequestError
from sagellm_core.request import Request
from sagellm_core.sampling_params import SamplingParams
from sagellm_core.structured.bitmask import apply_bitmask, bitmask_words
from sagellm_core.structured.grammar import compile_grammar
from sagellm_core.structured.params import StructuredOutputsParams

log = logging.getLogger("sagellm")
CACHE_SIZE = 128
PARALLEL_MIN_ROWS = 32  # fewer constrained rows than this: masks in the calling thread
MAX_THREADS = 8


def mask_threads() -> int:
    """llguidance's pool size: half the cores this process may use (at most `MAX_THREADS`); 1 means
    no pool (on a 2-core machine the pool's threads fought torch's and cost 10x the masks)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(MAX_THREADS, cores // 2))


@attrs.define
class StructuredStats:
    """Host seconds spent computing masks and applying them, constrained rows, steps with a mask."""

    mask_seconds: float = 0.0
    apply_seconds: float = 0.0
    masked_rows: int = 0
    masked_steps: int = 0


class StructuredOutputs:
    """Grammar matchers of the engine's constrained requests (built lazily: the llguidance view of the
    tokenizer costs about a second, paid by the first constrained request)."""

    def __init__(self, tokenizer: Any, vocab_size: int, eos_token_ids: frozenset[int]) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.eos_token_ids = eos_token_ids
        self.stats = StructuredStats()
        self._lltokenizer: llguidance.LLTokenizer | None = None
        self._executor: llguidance.LLExecutor | None = None
        self._prototypes: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._matchers: dict[str, llguidance.LLMatcher] = {}
        self._bitmask = torch.empty((0, 0), dtype=torch.int32)

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
    def apply(self, logits: torch.Tensor, requests: list[Request]) -> torch.Tensor:
        """``logits`` with the rows of constrained ``requests`` (row i belongs to ``requests[i]``) masked.
        Rows of requests that finished since the step was planned (their token will be dropped) are
        left as they are."""
        rows = [i for i, r in enumerate(requests) if r.params.structured_outputs is not None and not r.is_finished]
        if not rows:
            return logits
        tick = time.perf_counter()
        words = bitmask_words(self._llg_tokenizer().vocab_size)
        if logits.device.type == "cpu":
            bitmask = self._host_bitmask(len(rows), words)
        else:  # copied to the device asynchronously: the next step must not overwrite it
            bitmask = torch.empty((len(rows), words), dtype=torch.int32)
        self._fill([(self._matcher(requests[i]), k) for k, i in enumerate(rows)], bitmask)
        tock = time.perf_counter()
        logits = apply_bitmask(logits, bitmask, rows)
        stats = self.stats
        stats.mask_seconds += tock - tick
        stats.apply_seconds += time.perf_counter() - tock
        stats.masked_rows += len(rows)
        stats.masked_steps += 1
        return logits

    def _host_bitmask(self, rows: int, words: int) -> torch.Tensor:
        """A [rows, words] int32 buffer reused between CPU steps (llguidance writes every word)."""
        if self._bitmask.shape[0] < rows or self._bitmask.shape[1] != words:
            self._bitmask = torch.empty((max(rows, 2 * self._bitmask.shape[0]), words), dtype=torch.int32)
        return self._bitmask[:rows]

    def _fill(self, matchers: list[tuple[llguidance.LLMatcher, int]], bitmask: torch.Tensor) -> None:
        row_bytes = bitmask.shape[1] * 4
        if self._executor is None or len(matchers) < PARALLEL_MIN_ROWS:
            for matcher, k in matchers:
                matcher.unsafe_compute_mask_ptr(bitmask[k].data_ptr(), row_bytes)
        else:
            self._executor.unsafe_compute_mask_ptr(matchers, bitmask.data_ptr(), row_bytes, len(matchers))

    def on_token(self, request: Request, token_id: int) -> bool:
        """Advance ``request``'s grammar by an accepted token; True when the grammar is complete
        (nothing but EOS may follow) or the token broke it (then the request must stop)."""
        if request.params.structured_outputs is None:
            return False
        matcher = self._matcher(request)
        if not matcher.consume_token(token_id):
            log.warning("request %s: token %d rejected by its grammar (%s); stopping it",
                        request.request_id, token_id, matcher.get_error())
            return True
        return matcher.is_stopped()

    def forget(self, request_id: str) -> None:
        """Drop a finished request's matcher."""
        self._matchers.pop(request_id, None)
