"""The ``ascend`` backend plugin: Huawei Ascend NPUs through ``torch_npu``.

Priority 90. ``torch_npu`` adds ``torch.npu`` (mirroring ``torch.cuda``) and the ``npu`` device type
when imported; the probe imports it only when it is installed.
"""

from __future__ import annotations

from typing import Any

from sagellm_core.accelerator import TorchNamespaceBackend, backend_spec, probe_vendor_extension
from sagellm_core.backend import ProbeResult
from sagellm_core.hookspecs import hookimpl

SAGELLM_PLUGIN_API = ">=1.0,<2"

NAME = "ascend"
PRIORITY = 90
VENDOR_MODULE = "torch_npu"


def _import_torch() -> Any:
    import torch

    return torch


def probe() -> ProbeResult:
    """Side-effect-free presence check: is ``torch_npu`` installed and does it see an NPU?"""
    return probe_vendor_extension(VENDOR_MODULE, "npu", "Ascend NPU", "NPUs", _import_torch)


class AscendBackend(TorchNamespaceBackend):
    """A selected Ascend NPU: ``npu:<device_index>``, HCCL, reference paged attention."""

    name = NAME
    device_type = "npu"
    dist_backend = "hccl"
    visible_devices_env = "ASCEND_RT_VISIBLE_DEVICES"
    namespace = "npu"
    vendor_module = VENDOR_MODULE

    QUANTIZED_GEMMS = {
        "int8": "torch_npu.npu_weight_quant_batchmatmul (W8A16, per-channel scales)",
        "int4": "torch_npu.npu_weight_quant_batchmatmul with int4 packed weights (W4A16, group-wise)",
        "fp8": "none on Atlas A2 (no FP8 cube units); would run W8A8 torch_npu.npu_quant_matmul instead",
    }
    """What this backend would call per format; none is wired (no hardware to verify on)."""

    def quantized_linear(self, kind: str) -> Any:
        """None for every format: quantized layers run de-quantized in the model dtype. With hardware
        to verify on, `QUANTIZED_GEMMS` names the torch_npu kernels that would serve each format."""
        return None


SPEC = backend_spec(AscendBackend, PRIORITY, probe, "Huawei Ascend NPUs via torch_npu")


@hookimpl
def sagellm_register_backends(register: Any) -> None:
    """Register the ``ascend`` backend."""
    register(SPEC)
