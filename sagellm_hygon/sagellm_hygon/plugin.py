"""The ``hygon`` backend plugin: Hygon DCUs through a ROCm/DTK build of torch.

Priority 70. DTK torch exposes DCUs as ``torch.cuda`` devices (HIP underneath), exactly like AMD
GPUs under ROCm torch, so presence alone is not enough: the probe claims only devices that identify
as Hygon DCUs (by GCN architecture or device name) and leaves plain AMD GPUs alone. The ``cuda``
backend in turn refuses every HIP build, so the two never claim the same device.
"""

from __future__ import annotations

import re
from collections import Counter
from types import ModuleType
from typing import Any, Iterable

from sagellm_core.accelerator import TorchNamespaceBackend, backend_spec
from sagellm_core.backend import ProbeResult
from sagellm_core.hookspecs import hookimpl

SAGELLM_PLUGIN_API = ">=1.0,<2"

NAME = "hygon"
PRIORITY = 70
DEVICE_TYPE = "cuda"
DIST_BACKEND = "nccl"  # RCCL under the NCCL name in ROCm/DTK torch
VISIBLE_DEVICES_ENV = "HIP_VISIBLE_DEVICES"

# NOTE: only architectures no AMD product uses. The first DCU generation (Z100, gfx906) shares its
# architecture with AMD's MI50/MI60, so it is recognised by name instead.
HYGON_ARCH_PREFIXES = ("gfx926", "gfx928", "gfx936", "gfx938")
_HYGON_NAME = re.compile(r"hygon|dcu|^(?:z100|k100|bw\d)", re.IGNORECASE)


def _import_torch() -> ModuleType:
    import torch

    return torch


# ---- vendor detection (pure functions, fed fakes by the tests) ------------------------------------
def base_arch(gcn_arch_name: str) -> str:
    """``"gfx928:sramecc+:xnack-"`` -> ``"gfx928"``."""
    return gcn_arch_name.split(":", 1)[0].strip().lower()


def is_hygon_dcu(gcn_arch_name: str, device_name: str) -> bool:
    """True for a Hygon DCU architecture (gfx926/928/936/938) or a DCU device name."""
    if base_arch(gcn_arch_name).startswith(HYGON_ARCH_PREFIXES):
        return True
    return bool(_HYGON_NAME.search(device_name.strip()))


def device_identity(properties: Any) -> tuple[str, str]:
    """(gcnArchName, name) of a ``torch.cuda.get_device_properties`` result; blanks when absent."""
    return str(getattr(properties, "gcnArchName", "") or ""), str(getattr(properties, "name", "") or "")


def describe_devices(devices: Iterable[tuple[str, str]]) -> str:
    """``[("gfx928", "K100_AI")] * 2`` -> ``"2 x K100_AI (gfx928)"``."""
    counts = Counter(f"{name or '?'} ({base_arch(arch) or '?'})" for arch, name in devices)
    return ", ".join(f"{count} x {label}" for label, count in counts.items())


def probe_hygon(torch: Any) -> ProbeResult:
    """Answer from a torch module: a HIP build whose visible devices include Hygon DCUs.

    Side effects: none until ``torch.cuda.is_available()`` (a device count, no context) says HIP
    devices exist. Only then are device properties read with ``torch.cuda.get_device_properties``,
    which initialises torch's HIP runtime state (no memory is allocated, no device is selected) —
    the unavoidable price of telling a DCU from an AMD GPU through torch.
    """
    hip = getattr(torch.version, "hip", None)
    if not hip:
        return ProbeResult(False, "torch is not a ROCm/DTK build (torch.version.hip is None)")
    if not torch.cuda.is_available():
        return ProbeResult(False, f"ROCm/DTK torch (hip {hip}): no HIP device visible")
    devices = [device_identity(torch.cuda.get_device_properties(i)) for i in range(torch.cuda.device_count())]
    dcus = [device for device in devices if is_hygon_dcu(*device)]
    if not dcus:
        return ProbeResult(False, f"HIP devices are not Hygon DCUs: {describe_devices(devices)}")
    return ProbeResult(True, describe_devices(dcus), device_count=len(dcus))


def probe() -> ProbeResult:
    """Presence check of Hygon DCUs; see `probe_hygon` for what it touches."""
    return probe_hygon(_import_torch())


class HygonBackend(TorchNamespaceBackend):
    """A selected Hygon DCU: ``cuda:<device_index>`` under HIP, RCCL, reference paged attention."""

    name = NAME
    device_type = DEVICE_TYPE
    dist_backend = DIST_BACKEND
    visible_devices_env = VISIBLE_DEVICES_ENV

    QUANTIZED_GEMMS = {
        "int8": "hipBLASLt int8 GEMM through torch._int_mm after per-token activation quantization (W8A8)",
        "int4": "lightop / DTK's AWQ-GPTQ int4 kernels (W4A16, group-wise)",
        "fp8": "hipBLASLt FP8 via torch._scaled_mm on DCUs that have FP8 (BW1000); others none",
    }
    """What this backend would call per format; none is wired (no hardware to verify on)."""

    def quantized_linear(self, kind: str) -> Any:
        """None for every format: quantized layers run de-quantized in the model dtype. With hardware
        to verify on, `QUANTIZED_GEMMS` names the kernels that would serve each format."""
        return None



SPEC = backend_spec(HygonBackend, PRIORITY, probe, "Hygon DCUs via ROCm/DTK torch")


@hookimpl
def sagellm_register_backends(register: Any) -> None:
    """Register the ``hygon`` backend."""
    register(SPEC)
