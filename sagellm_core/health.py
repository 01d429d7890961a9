"""Engine health as the front end sees it: serving, stalled (watchdog), dead, or shut down."""

from __future__ import annotations

import threading
import time
from typing import Any, Callable

import attrs


@attrs.frozen
class EngineHealth:
    """``status``: ``ok``, ``stalled`` (no step progress while work is queued), ``dead`` (the engine
    thread died) or ``stopped`` (shut down). ``detail`` says why when not ok."""

    status: str
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def progress_marker(engine: Any) -> int:
    """A value that changes whenever the engine completes a step."""
    return engine.step_counter


class StallWatchdog:
    """Flags a stall when the progress marker has not changed for ``timeout_s`` while work is queued.

    `observe` is the whole logic and takes the time as an argument (tests drive it directly); the
    optional background thread only calls it every ``interval_s``.
    """

    def __init__(self, timeout_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.timeout_s = timeout_s
        self.clock = clock
        self._marker: Any = None
        self._since = clock()
        self.stalled_for: float | None = None

    def observe(self, marker: Any, busy: bool, now: float | None = None) -> bool:
        """Record the marker; True while stalled (busy and no change for ``timeout_s``)."""
        now = self.clock() if now is None else now
        if marker != self._marker or not busy:
            self._marker = marker
            self._since = now
        waited = now - self._since
        self.stalled_for = waited if busy and waited >= self.timeout_s else None
        return self.stalled_for is not None

    def start(self, sample: Callable[[], tuple[Any, bool]], interval_s: float) -> threading.Event:
        """Observe ``sample()`` every ``interval_s`` on a daemon thread; set the returned event to stop."""
        stop = threading.Event()

        def run() -> None:
            while not stop.wait(interval_s):
                marker, busy = sample()
                self.observe(marker, busy)

        threading.Thread(target=run, name="sagellm-watchdog", daemon=True).start()
        return stop
