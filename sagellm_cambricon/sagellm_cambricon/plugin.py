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


SPEC = backend_spec(CambriconBackend, PRIORITY, probe, "Cambricon MLUs via torch_mlu")


@hookimpl
def sagellm_register_backends(register: Any) -> None:
    """Register the ``cambricon`` backend."""
    register(SPEC)
