"""The ``cambricon`` backend plugin: Cambricon MLUs through ``torch_mlu``.

Priority 80. ``torch_mlu`` adds ``torch.mlu`` (mirroring ``torch.cuda``) and the ``mlu`` device type
when imported; the probe imports it only when it is installed.
"""

from __future__ import annotations

from typing import Any

from sagellm_core.accelerator import TorchNamespaceBackend, backend_spec, probe_vendor_extension
from sagellm_core.backend import ProbeResult
from sagellm_core.hookspecs import hookimpl

SAGELLM_PLUGIN_API = ">=1.0,<2"

NAME = "cambricon"
PRIORITY = 80
VENDOR_MODULE = "torch_mlu"


def _import_torch() -> Any:
    import torch

    return torch


def probe() -> ProbeResult:
    """Side-effect-free presence check: is ``torch_mlu`` installed and does it see an MLU?"""
    return probe_vendor_extension(VENDOR_MODULE, "mlu", "Cambricon MLU", "MLUs", _import_torch)


class CambriconBackend(TorchNamespaceBackend):
    """A selected Cambricon MLU: ``mlu:<device_index>``, CNCL, reference paged attention."""

    name = NAME
    device_type = "mlu"
    dist_backend = "cncl"
    visible_devices_env = "MLU_VISIBLE_DEVICES"
    namespace = "mlu"
    vendor_module = VENDOR_MODULE

    QUANTIZED_GEMMS = {
        "int8": "torch_mlu_ops.weight_only_quant_matmul (W8A16, per-channel scales)",
        "int4": "torch_mlu_ops.weight_only_quant_matmul with int4 weights (W4A16, group-wise)",
        "fp8": "torch_mlu_ops.smooth_quant_matmul in int8 (MLU370/590 have no FP8 GEMM)",
    }
    """What this backend would call per format; none is wired (no hardware to verify on)."""

    def quantized_linear(self, kind: str) -> Any:
        """None for every format: quantized layers run de-quantized in the model dtype. With hardware
        to verify on, `QUANTIZED_GEMMS` names the torch_mlu_ops kernels that would serve each format."""
        return None


SPEC = backend_spec(CambriconBackend, PRIORITY, probe, "Cambricon MLUs via torch_mlu")


@hookimpl
def sagellm_register_backends(register: Any) -> None:
    """Register the ``cambricon`` backend."""
    register(SPEC)
