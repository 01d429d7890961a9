"""Which engine steps may still be running on the device, so a copy of a block waits for the steps
that used it, not for everything queued.

A block freed now may be read or written by every step planned so far (under async scheduling the
step in flight, and a planned step not yet launched, may hold it), and by no later one until it is
handed out again. So a free is stamped with `mark` (the index of the last step planned), and a copy
into or out of the block waits for the end event of the first launched step at or after the stamp
(`covering_event`): steps complete in stream order. A block freed long ago (the least recently
used, which the pool evicts and hands out first) needs no wait at all, and its copy overlaps the
step in flight instead of starting after it. Where no launched step covers the stamp (a driver that never reports
launches, a step planned but not yet launched), the copy waits for all queued compute, as a copy
without a stamp does.
"""

from __future__ import annotations

from collections import deque
from typing import Any

MAX_PENDING = 64  # launched steps whose events are kept before the oldest are assumed done and dropped


class StepEvents:
    """The planned-step counter and the end events of launched steps not yet known complete."""

    def __init__(self) -> None:
        self.planned = 0
        self.completed_through = -1
        self._pending: deque[tuple[int, Any]] = deque()
        self.waits = {"none": 0, "step": 0, "all": 0}
        """Copies by what they waited for: nothing, one step's event, all queued compute."""

    def mark(self) -> int:
        """The stamp of a block freed now: the index of the last step planned (-1 before any)."""
        return self.planned - 1

    def step_planned(self) -> None:
        """A step was planned (its index: the count before this call)."""
        self.planned += 1

    def step_launched(self, event: Any) -> None:
        """The last planned step's device work is queued; ``event`` was recorded after it."""
        self._pending.append((self.planned - 1, event))
        self._prune()
        while len(self._pending) > MAX_PENDING:
            index, event = self._pending.popleft()
            event.synchronize()
            self.completed_through = max(self.completed_through, index)

    def covering_event(self, mark: int | None) -> tuple[bool, Any]:
        """(covered, event): ``covered`` when the steps up to ``mark`` are accounted for; then
        ``event`` is the end event to wait for (None: they are complete). Not covered: wait for all
        queued compute."""
        if mark is None:
            return False, None
        self._prune()
        if mark <= self.completed_through:
            return True, None
        for index, event in self._pending:
            if index >= mark:
                return True, event
        return False, None

    def count_wait(self, kind: str) -> None:
        """Count a copy by what it waited for (``none``, ``step``, ``all``: see ``waits``)."""
        self.waits[kind] += 1

    def _prune(self) -> None:
        while self._pending and self._pending[0][1].query():
            index, _ = self._pending.popleft()
            self.completed_through = max(self.completed_through, index)
