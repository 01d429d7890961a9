"""How many front-end processes `sagellm serve` runs when ``--api-server-count`` is not given (derived
like the scheduler budgets in `sagellm_core.engine.budgets`: from the backend and the host).

Measured on an H200 host (16 cores; Qwen3-0.6B shape, 256 requests at rate inf): one front end
streams about 11,600 tok/s with its process saturated (0.48x the offline engine); two give
22,200 tok/s (0.92x), each about 80% busy while the engine process is about 94% busy. So on an
accelerator each engine replica gets ``FRONTENDS_PER_REPLICA`` front ends, as many as the host's
cores allow after one core per engine process and ``RESERVED_CORES`` for everything else (the
launcher, clients on the same host, the OS). On the CPU backend the cores run the model: one front
end (the engine's steps are far slower than the front end's per-token work there). Without the
engine process (``--no-engine-process``) there is one process, so one front end. An explicit
``--api-server-count`` always wins.
"""

from __future__ import annotations

import os

import attrs

from sagellm_core.config import EngineConfig

FRONTENDS_PER_REPLICA = 2
RESERVED_CORES = 1


@attrs.frozen
class FrontendCount:
    """The number of front-end processes and where it came from (``option`` or ``derived``), with the why."""

    count: int
    source: str
    reason: str


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def derived_frontends(device_type: str, data_parallel_size: int, cores: int) -> FrontendCount:
    """The derived count for engines on ``device_type`` (``cpu``, ``cuda``, ...) on a host of ``cores``."""
    if device_type == "cpu":
        return FrontendCount(1, "derived", "CPU backend: the cores run the model")
    wanted = FRONTENDS_PER_REPLICA * data_parallel_size
    spare = cores - data_parallel_size - RESERVED_CORES
    count = max(1, min(wanted, spare))
    return FrontendCount(count, "derived", f"{device_type} backend: {FRONTENDS_PER_REPLICA} per engine process "
                                           f"({data_parallel_size}), within {cores} cores less one per engine "
                                           f"process and {RESERVED_CORES} reserved")


def backend_device_type(config: EngineConfig) -> str:
    """The device type of the backend the engine will select for ``config`` (probes only, no device work)."""
    from sagellm_core.backend_selection import select_backend
    from sagellm_core.plugin_manager import create_plugin_manager

    return select_backend(create_plugin_manager(), config.backend.name).spec.device_type


def resolve_frontends(requested: int | None, config: EngineConfig, *, engine_process: bool,
                      cores: int | None = None, device_type: str | None = None) -> FrontendCount:
    """``requested`` when given, else the derived count (``device_type`` / ``cores`` default to this host's)."""
    if requested is not None:
        return FrontendCount(requested, "option", "--api-server-count")
    if not engine_process:
        return FrontendCount(1, "derived", "the engine runs in the server's process")
    return derived_frontends(device_type or backend_device_type(config), config.parallel.data_parallel_size,
                             cores if cores is not None else usable_cores())
