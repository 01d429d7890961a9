"""Built-in schedulers: FCFS, priority, and the PD scheduler."""

from __future__ import annotations

from typing import Any

from sagellm_core.hookspecs import hookimpl
from sagellm_core.request import Request
from sagellm_core.schedulers.base import PolicyScheduler
from sagellm_core.schedulers.pd import PDOptions, PDScheduler


class FCFSScheduler(PolicyScheduler):
    """First come, first served; the latest arrival is preempted first."""


class PriorityScheduler(PolicyScheduler):
    """Lower ``priority`` value runs first (ties by arrival); the lowest-priority request is preempted."""

    def waiting_key(self, request: Request) -> Any:
        return (request.priority, request.arrival_order)


@hookimpl
def sagellm_register_schedulers(register: Any) -> None:
    register("fcfs", FCFSScheduler)
    register("priority", PriorityScheduler)
    register("pd", PDScheduler, options=PDOptions)
