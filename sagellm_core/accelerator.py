"""Building blocks for accelerator backend plugins whose torch extension mirrors ``torch.cuda``
(``torch.npu`` from torch_npu, ``torch.mlu`` from torch_mlu, ``torch.cuda`` itself under CUDA or HIP):
side-effect-free probes, and a backend whose memory query, synchronisation and dtype go through
that namespace."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable, ClassVar

from sagellm_core.backend import Backend, BackendSpec, PagedAttentionOp, ProbeResult

if TYPE_CHECKING:
    import torch

    from sagellm_core.config import BackendConfig


def module_available(name: str) -> bool:
    """Whether ``name`` can be imported, without importing it (a module in sys.modules counts)."""
    if name in sys.modules:
        return sys.modules[name] is not None
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def torch_module() -> ModuleType:
    import torch

    return torch


def probe_namespace(torch: Any, namespace: str, vendor_module: str, label: str, unit: str) -> ProbeResult:
    """Answer from ``torch.<namespace>`` (added by ``vendor_module``): is any device visible?

    ``is_available()`` and ``device_count()`` ask the driver for a device count; they do not set a
    device, create a context or allocate memory.
    """
    devices = getattr(torch, namespace, None)
    if devices is None:
        return ProbeResult(False, f"{vendor_module} imported but torch.{namespace} is missing")
    if not devices.is_available():
        return ProbeResult(False, f"{vendor_module} present, 0 {unit}")
    count = int(devices.device_count())
    return ProbeResult(True, f"{count} x {label}", device_count=count)


def probe_vendor_extension(vendor_module: str, namespace: str, label: str, unit: str,
                           get_torch: Callable[[], Any] = torch_module) -> ProbeResult:
    """Is ``vendor_module`` installed, does it import, and does ``torch.<namespace>`` see a device?

    ``get_torch`` is the plugin's own seam for the torch module (simulations hand each plugin a
    different stand-in)."""
    if not module_available(vendor_module):
        return ProbeResult(False, f"{vendor_module} not installed")
    try:
        importlib.import_module(vendor_module)
    except Exception as exc:  # a broken vendor stack is "not available", with the reason
        return ProbeResult(False, f"{vendor_module} failed to import: {type(exc).__name__}: {exc}")
    return probe_namespace(get_torch(), namespace, vendor_module, label, unit)


def preferred_dtype(torch: Any, devices: Any) -> Any:
    """bfloat16 when the device namespace says it is supported, else float16."""
    supported = getattr(devices, "is_bf16_supported", None)
    return torch.bfloat16 if supported is not None and supported() else torch.float16


class TorchNamespaceBackend(Backend):
    """A backend driven through ``torch.<namespace>`` (``cuda``, ``npu``, ``mlu``); importing
    ``vendor_module`` (if set) registers that namespace. Subclasses set ``name``, ``device_type``,
    ``dist_backend`` and, unless it is ``torch.cuda``, ``namespace``.

    Device ``<device_type>:<backend.device_index>``; dtype bfloat16 where the namespace says it is
    supported, else float16; memory from ``mem_get_info``; the plain-torch reference paged
    attention (override `attention_op` with a device kernel).
    """

    namespace: ClassVar[str] = "cuda"
    """The ``torch`` attribute that drives the device; ``cuda`` also serves ROCm/HIP builds."""
    vendor_module: ClassVar[str | None] = None

    def __init__(self, config: BackendConfig | None = None, options: Any = None) -> None:
        super().__init__(config, options)
        if self.vendor_module:
            importlib.import_module(self.vendor_module)

    @property
    def devices(self) -> Any:
        """``torch.<namespace>``."""
        return getattr(torch_module(), self.namespace)

    def device(self) -> torch.device:
        return torch_module().device(self.device_type, self.device_index)

    def default_dtype(self) -> torch.dtype:
        return preferred_dtype(torch_module(), self.devices)

    def memory_info(self) -> tuple[int, int]:
        free, total = self.devices.mem_get_info(self.device())
        return int(free), int(total)

    def synchronize(self) -> None:
        self.devices.synchronize(self.device())

    def attention_op(self) -> PagedAttentionOp:
        """The plain-torch reference op (correct on any device; vendors override with a kernel)."""
        from sagellm_core.attention.reference import reference_paged_attention

        return reference_paged_attention


def backend_spec(backend: type[Backend], priority: int, probe: Callable[[], ProbeResult],
                 description: str, options: type | None = None) -> BackendSpec:
    """The `BackendSpec` of a backend class, from its class attributes (the class is the factory:
    ``create(config)``, or ``create(config, options)`` with an options class)."""
    return BackendSpec(
        name=backend.name, priority=priority, probe=probe, create=backend, device_type=backend.device_type,
        dist_backend=backend.dist_backend, visible_devices_env=backend.visible_devices_env,
        description=description, options=options,
    )
