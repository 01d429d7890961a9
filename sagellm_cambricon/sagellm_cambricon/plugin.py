"""The ``cambricon`` backend plugin: Cambricon MLUs through ``torch_mlu``.

Priority 80. ``torch_mlu`` adds ``torch.mlu`` (mirroring ``torch.cuda``) and the ``mlu`` device type
when imported; the probe imports it only when it is installed.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType
from typing import Any

from sagellm_core.backend import Backend, BackendSpec, ProbeResult
from sagellm_core.hookspecs import hookimpl

SAGELLM_PLUGIN_API = ">=1.0,<2"

NAME = "cambricon"
PRIORITY = 80
DEVICE_TYPE = "mlu"
DIST_BACKEND = "cncl"
VISIBLE_DEVICES_ENV = "MLU_VISIBLE_DEVICES"
VENDOR_MODULE = "torch_mlu"


def module_available(name: str) -> bool:
    """Whether ``name`` can be imported, without importing it (a module in sys.modules counts)."""
    if name in sys.modules:
        return sys.modules[name] is not None
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def _import_torch() -> ModuleType:
    import torch

    return torch


def probe_mlu(torch: Any) -> ProbeResult:
    """Answer from a torch module on which ``torch_mlu`` has been imported.

    ``torch.mlu.is_available()`` and ``device_count()`` query the driver's device count; they do not
    set a device, create a context or allocate memory.
    """
    mlu = getattr(torch, "mlu", None)
    if mlu is None:
        return ProbeResult(False, f"{VENDOR_MODULE} imported but torch.mlu is missing")
    if not mlu.is_available():
        return ProbeResult(False, f"{VENDOR_MODULE} present, 0 MLUs")
    count = int(mlu.device_count())
    return ProbeResult(True, f"{count} x Cambricon MLU", device_count=count)


def probe() -> ProbeResult:
    """Side-effect-free presence check: is ``torch_mlu`` installed and does it see an MLU?"""
    if not module_available(VENDOR_MODULE):
        return ProbeResult(False, f"{VENDOR_MODULE} not installed")
    try:
        importlib.import_module(VENDOR_MODULE)
    except Exception as exc:  # a broken vendor stack is "not available", with the reason
        return ProbeResult(False, f"{VENDOR_MODULE} failed to import: {type(exc).__name__}: {exc}")
    return probe_mlu(_import_torch())


def preferred_dtype(torch: Any, accelerator: Any) -> Any:
    """bfloat16 when the accelerator module says it is supported, else float16 (every MLU has it)."""
    supported = getattr(accelerator, "is_bf16_supported", None)
    return torch.bfloat16 if supported is not None and supported() else torch.float16


class CambriconBackend(Backend):
    """A selected Cambricon MLU: ``mlu:<device_index>``, CNCL, reference paged attention."""

    name = NAME
    device_type = DEVICE_TYPE
    dist_backend = DIST_BACKEND
    visible_devices_env = VISIBLE_DEVICES_ENV

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        importlib.import_module(VENDOR_MODULE)  # registers torch.mlu and the "mlu" device type

    def default_dtype(self) -> Any:
        torch = _import_torch()
        return preferred_dtype(torch, torch.mlu)

    def memory_info(self) -> tuple[int, int]:
        free, total = _import_torch().mlu.mem_get_info(self.device())
        return int(free), int(total)

    def synchronize(self) -> None:
        _import_torch().mlu.synchronize(self.device())


SPEC = BackendSpec(
    name=NAME,
    priority=PRIORITY,
    probe=probe,
    create=CambriconBackend,
    device_type=DEVICE_TYPE,
    dist_backend=DIST_BACKEND,
    visible_devices_env=VISIBLE_DEVICES_ENV,
    description="Cambricon MLUs via torch_mlu",
)


@hookimpl
def sagellm_register_backends(register: Any) -> None:
    """Register the ``cambricon`` backend."""
    register(SPEC)
