"""Per-request grammar state for constrained requests, and the two calls the engine makes:

* `StructuredOutputs.apply(logits, requests)` before sampling: computes the token bitmask of every
  constrained row on the host (llguidance, in parallel threads, GIL released) and applies all of
  them on the logits' device in one batched op. On a GPU the host work overlaps the forward pass
  already queued on the device.
* `StructuredOutputs.on_token(request, token_id)` when a sampled token is accepted: advances the
  request's matcher and says whether the grammar is complete (the request then finishes).

A request's mask depends on its previous token, so the engine does not pipeline (async scheduling)
a step that samples a constrained request; unconstrained batches keep pipelining.
"""

from __future__ import annotations

import logging
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
            eos = sorted(self.eos_token_ids) or None
            self._lltokenizer = llguidance.hf.from_tokenizer(self.tokenizer, n_vocab=n_vocab, eos_token=eos)
            self._executor = llguidance.LLExecutor(num_threads=2)
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
        """``logits`` with the rows of constrained ``requests`` (row i belongs to ``requests[i]``) masked."""
        rows = [i for i, r in enumerate(requests) if r.params.structured_outputs is not None]
        if not rows:
            return logits
        tick = time.perf_counter()
        words = bitmask_words(self._llg_tokenizer().vocab_size)
        bitmask = torch.zeros((len(rows), words), dtype=torch.int32)
        matchers = [(self._matcher(requests[i]), k) for k, i in enumerate(rows)]
        assert self._executor is not None
        self._executor.unsafe_compute_mask_ptr(matchers, bitmask.data_ptr(), words * 4, len(rows))
        tock = time.perf_counter()
        logits = apply_bitmask(logits, bitmask, rows)
        stats = self.stats
        stats.mask_seconds += tock - tick
        stats.apply_seconds += time.perf_counter() - tock
        stats.masked_rows += len(rows)
        stats.masked_steps += 1
        return logits

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
