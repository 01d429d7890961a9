"""Whether a prefix block found below the device pool is worth loading, or cheaper to recompute.

A load pays the tier's read (disk, a plugin's store) and the copy up; a recompute pays prefill
compute. Which is cheaper depends on the model and the hardware: on the CPU prefill is slow and
every tier wins; a small model on a GPU prefills a block in microseconds while a disk read of the
same block takes tens. The gate measures both as the engine runs (the marginal seconds of a prefill
token: the slope of step time over step tokens fitted to prefill-heavy steps, so a step's fixed cost
-- launches, planning -- is not charged to its tokens, trusted only where it fits the steps well and
never below a share of the mean; seconds per block from each tier's own load statistics) and stops a prefix
chain at the first block whose tier costs more than recomputing it, or, for a tier read on a reader
thread, more than `LOAD_ALLOWANCE` times: such a read runs beside the compute and delays only its own
request, while a recompute takes device time from every request in the batch. A host block's copy
is awaited by the step that admits its request (`TierStore.poll` with ``order``), so it must be
cheaper than the recompute it replaces (on an H100 a Qwen3-0.6B block recomputes in 12.5 us and
copies up in 47 us). A tier the gate turned down
is still tried on one lookup in `PROBE_EVERY`, so its figure follows the hardware (a warm page
cache, a quieter disk). Before both figures exist every tier is tried.
"""

from __future__ import annotations

from typing import Sequence

import attrs

from sagellm_core.kv.tiers.base import KVTier
from sagellm_core.kv.tiers.host import HostTier

PROBE_EVERY = 32
LOAD_ALLOWANCE = 4.0  # a read beside the compute may take this many times the recompute of its block
MIN_PREFILL_SHARE = 0.5  # steps with less prefill than this share of their tokens say little about prefill
MIN_STEP_TOKENS = 256
DECAY = 0.9  # weight of the earlier steps in the running prefill fit
MIN_SIZE_SPREAD = 0.25  # step sizes must vary by this share of their mean before a slope is trusted
MIN_FIT_R2 = 0.5  # a slope is trusted only where step size explains this share of the step times' variance
MIN_SLOPE_SHARE = 0.25
"""The marginal cost of a token is taken as at least this share of the mean seconds per token: a step's
fixed cost (launches, planning) is not charged to its tokens, but a noisy fit cannot call prefill
free (a load of microseconds then looked dearer than recomputing its block)."""


@attrs.define
class StepFit:
    """A least-squares line ``seconds = fixed + per_token * tokens`` over decayed step observations."""

    weight: float = 0.0
    tokens: float = 0.0
    seconds: float = 0.0
    tokens_squared: float = 0.0
    tokens_seconds: float = 0.0
    seconds_squared: float = 0.0

    def add(self, tokens: float, seconds: float) -> None:
        """Fold in one step of ``tokens`` that took ``seconds`` (earlier steps weigh ``DECAY`` less)."""
        self.weight = DECAY * self.weight + 1.0
        self.tokens = DECAY * self.tokens + tokens
        self.seconds = DECAY * self.seconds + seconds
        self.tokens_squared = DECAY * self.tokens_squared + tokens * tokens
        self.tokens_seconds = DECAY * self.tokens_seconds + tokens * seconds
        self.seconds_squared = DECAY * self.seconds_squared + seconds * seconds

    def per_token(self) -> float | None:
        """Marginal seconds per token: the slope where it is a good fit (sizes spread, positive, step
        size explaining `MIN_FIT_R2` of the times' variance), at least `MIN_SLOPE_SHARE` of the mean
        seconds per token; else the mean; None before any step."""
        if self.tokens <= 0:
            return None
        mean = self.seconds / self.tokens
        slope = self.slope()
        return mean if slope is None else max(slope, MIN_SLOPE_SHARE * mean)

    def slope(self) -> float | None:
        """The fitted seconds per token, or None where the fit says little (see `per_token`)."""
        spread = self.weight * self.tokens_squared - self.tokens * self.tokens
        if spread <= (MIN_SIZE_SPREAD * self.tokens) ** 2:
            return None
        covariance = self.weight * self.tokens_seconds - self.tokens * self.seconds
        variance = self.weight * self.seconds_squared - self.seconds * self.seconds
        if covariance <= 0 or variance <= 0 or covariance * covariance < MIN_FIT_R2 * spread * variance:
            return None
        return covariance / spread


@attrs.define
class LoadGate:
    """Running prefill cost and the per-tier load-or-recompute decision (``enabled`` False: always load)."""

    enabled: bool = True
    _fit: StepFit = attrs.field(factory=StepFit)
    _turned_down: dict[int, int] = attrs.field(factory=dict)
    _block_size: int = 0  # tokens per block, from the lookups

    def observe_step(self, prefill_tokens: int, step_tokens: int, seconds: float) -> None:
        """Fold in one engine step (its prefill and total forward tokens, its wall time)."""
        if step_tokens < MIN_STEP_TOKENS or prefill_tokens < MIN_PREFILL_SHARE * step_tokens or seconds <= 0:
            return
        self._fit.add(step_tokens, seconds)

    def token_seconds(self) -> float | None:
        """Marginal seconds per prefill token, once a prefill-heavy step was seen."""
        return self._fit.per_token()

    def declines(self, level: int, tiers: Sequence[KVTier]) -> bool:
        """Whether the last lookup of a block on tier ``level`` was turned down and the figures
        still say so: blocks moving down skip that tier meanwhile (writes nobody loads would only
        take the engine's time; once prefill gets dearer, the writes resume)."""
        return (self.enabled and level in self._turned_down
                and not self._cheap_enough(level, tiers, self._block_size))

    def worth_loading(self, level: int, tiers: Sequence[KVTier], block_size: int) -> bool:
        """Whether a block on ``tiers[level]`` should be loaded rather than recomputed."""
        self._block_size = block_size
        if not self.enabled or self._cheap_enough(level, tiers, block_size):
            self._turned_down.pop(level, None)
            return True
        count = self._turned_down[level] = self._turned_down.get(level, 0) + 1
        probe = count % PROBE_EVERY == 0
        if not probe:
            tiers[level].stats.turned_down += 1
        return probe

    def _cheap_enough(self, level: int, tiers: Sequence[KVTier], block_size: int) -> bool:
        """A block load from ``tiers[level]`` within its allowance of the recompute (or either figure
        not measured yet)."""
        recompute = self.token_seconds()
        load = block_load_seconds(level, tiers)
        allowance = 1.0 if isinstance(tiers[level], HostTier) else LOAD_ALLOWANCE
        return recompute is None or load is None or load <= allowance * recompute * block_size


def block_load_seconds(level: int, tiers: Sequence[KVTier]) -> float | None:
    """Measured seconds to bring one block from ``tiers[level]`` into the device pool: the load time
    per byte of every tier from the top down to it (a block read from below is copied up through the
    top tier's path, whose figure counts every block copied up; a lower tier's is its throughput with
    its reader threads together, `TierStats.load_seconds`), times a block's bytes; None until each
    of them has loaded something."""
    per_byte = 0.0
    for tier in tiers[: level + 1]:
        stats = tier.stats
        if stats.load_bytes <= 0 or stats.load_seconds <= 0:
            return None
        per_byte += stats.load_seconds / stats.load_bytes
    return per_byte * tiers[0].context.block_bytes
