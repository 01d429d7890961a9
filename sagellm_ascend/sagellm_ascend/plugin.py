"""The ``ascend`` backend plugin: Huawei Ascend NPUs through ``torch_npu``.

Priority 90. ``torch_npu`` adds ``torch.npu`` (mirroring ``torch.cuda``) and the ``npu`` device type
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

NAME = "ascend"
PRIORITY = 90
DEVICE_TYPE = "npu"
DIST_BACKEND = "hccl"
VISIBLE_DEVICES_ENV = "ASCEND_RT_VISIBLE_DEVICES"
VENDOR_MODULE = "torch_npu"


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


def probe_npu(torch: Any) -> ProbeResult:
    """Answer from a torch module on which ``torch_npu`` has been imported.

    ``torch.npu.is_available()`` and ``device_count()`` query the driver's device count; they do not
    set a device, create a context or allocate memory.
    """
    npu = getattr(torch, "npu", None)
    if npu is None:
        return ProbeResult(False, f"{VENDOR_MODULE} imported but torch.npu is missing")
    if not npu.is_available():
        return ProbeResult(False, f"{VENDOR_MODULE} present, 0 NPUs")
    count = int(npu.device_count())
    return ProbeResult(True, f"{count} x Ascend NPU", device_count=count)


def probe() -> ProbeResult:
    """Side-effect-free presence check: is ``torch_npu`` installed and does it see an NPU?"""
    if not module_available(VENDOR_MODULE):
        return ProbeResult(False, f"{VENDOR_MODULE} not installed")
    try:
        importlib.import_module(VENDOR_MODULE)
    except Exception as exc:  # a broken vendor stack is "not available", with the reason
        return ProbeResult(False, f"{VENDOR_MODULE} failed to import: {type(exc).__name__}: {exc}")
    return probe_npu(_import_torch())


def preferred_dtype(torch: Any, accelerator: Any) -> Any:
    """bfloat16 when the accelerator module says it is supported, else float16 (every NPU has it)."""
    supported = getattr(accelerator, "is_bf16_supported", None)
    return torch.bfloat16 if supported is not None and supported() else torch.float16


class AscendBackend(Backend):
    """A selected Ascend NPU: ``npu:<device_index>``, HCCL, reference paged attention."""

    name = NAME
    device_type = DEVICE_TYPE
    dist_backend = DIST_BACKEND
    visible_devices_env = VISIBLE_DEVICES_ENV

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        importlib.import_module(VENDOR_MODULE)  # registers torch.npu and the "npu" device type

    def default_dtype(self) -> Any:
        torch = _import_torch()
        return preferred_dtype(torch, torch.npu)

    def memory_info(self) -> tuple[int, int]:
        free, total = _import_torch().npu.mem_get_info(self.device())
        return int(free), int(total)

    def synchronize(self) -> None:
        _import_torch().npu.synchronize(self.device())


SPEC = BackendSpec(
    name=NAME,
    priority=PRIORITY,
    probe=probe,
    create=AscendBackend,
    device_type=DEVICE_TYPE,
    dist_backend=DIST_BACKEND,
    visible_devices_env=VISIBLE_DEVICES_ENV,
    description="Huawei Ascend NPUs via torch_npu",
)


@hookimpl
def sagellm_register_backends(register: Any) -> None:
    """Register the ``ascend`` backend."""
    register(SPEC)
