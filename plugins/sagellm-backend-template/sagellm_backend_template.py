"""sageLLM backend plugin template ``template``: what a vendor copies to bring a device to sageLLM.

It drives the host CPU — so it runs anywhere — but implements every method of the
`sagellm_core.backend.Backend` contract itself, with a comment on what a real device does there.
It counts the attention calls it serves, and its options choose the attention op and the memory it
reports. Priority -10: ``backend.name: auto`` never picks it over the built-in ``cpu`` backend;
select it by name (``backend: {name: template}``, ``--backend template`` or ``SAGELLM_BACKEND``).

For a device whose torch extension mirrors ``torch.cuda`` (``torch.npu``, ``torch.mlu``), subclass
`sagellm_core.accelerator.TorchNamespaceBackend` instead: it already implements device, dtype,
memory and synchronisation through that namespace (see the sagellm-ascend distribution).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import attrs

from sagellm_core.backend import Backend, BackendSpec, PagedAttentionOp, ProbeResult
from sagellm_core.hookspecs import RegisterBackend, hookimpl
from sagellm_core.options import at_least, one_of

if TYPE_CHECKING:
    import torch

    from sagellm_core.config import BackendConfig

SAGELLM_PLUGIN_API = ">=1.0,<2"

NAME = "template"
PRIORITY = -10  # higher wins under ``auto``; real accelerators use 70-100, the CPU 0


@attrs.frozen
class TemplateOptions:
    """``backend.options`` of the ``template`` backend."""

    attention: str = attrs.field(default="cpu", validator=one_of("cpu", "reference"))
    """``cpu``: the built-in vectorised CPU op; ``reference``: the plain-torch oracle."""
    memory_bytes: int | None = attrs.field(default=None, validator=at_least(1 << 20))
    """What `memory_info` reports as total (and free) memory; None: the host's physical memory."""


def probe() -> ProbeResult:
    """Is the device here? Must not initialise it or allocate memory (a real backend asks its driver
    for a device count; see sagellm-cuda's probe)."""
    return ProbeResult(True, "the host CPU, as a template device", device_count=1)


class CountingOp:
    """Wraps a paged-attention op and counts its calls (one per layer per step)."""

    def __init__(self, op: PagedAttentionOp) -> None:
        self.op = op
        self.calls = 0

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        self.calls += 1
        return self.op(*args, **kwargs)


class TemplateBackend(Backend):
    """The host CPU under the name ``template``; every contract method spelled out."""

    name = NAME
    device_type = "cpu"       # a real device: its torch device type ("npu", "mlu", ...)
    dist_backend = "gloo"     # a real device: its collective library ("hccl", "cncl", ...)
    visible_devices_env = None  # a real device: e.g. "ASCEND_RT_VISIBLE_DEVICES"

    def __init__(self, config: BackendConfig | None = None, options: TemplateOptions | None = None) -> None:
        super().__init__(config, options)
        self.settings = options or TemplateOptions()
        self.ops: list[CountingOp] = []

    @property
    def attention_calls(self) -> int:
        """Attention calls served so far, over every op this backend handed out."""
        return sum(op.calls for op in self.ops)

    def device(self) -> torch.device:
        import torch

        return torch.device("cpu")  # a real device: torch.device(self.device_type, self.device_index)

    def default_dtype(self) -> torch.dtype:
        import torch

        return torch.float32  # a real device: bfloat16 where supported

    def memory_info(self) -> tuple[int, int]:
        if self.settings.memory_bytes is not None:
            return self.settings.memory_bytes, self.settings.memory_bytes
        page = os.sysconf("SC_PAGE_SIZE")  # a real device: its driver's (free, total) query
        return os.sysconf("SC_AVPHYS_PAGES") * page, os.sysconf("SC_PHYS_PAGES") * page

    def attention_op(self) -> PagedAttentionOp:
        if self.settings.attention == "reference":
            from sagellm_core.attention.reference import reference_paged_attention as op
        else:
            from sagellm_core.attention.cpu import CPUPagedAttention

            op = CPUPagedAttention()  # a real device: its paged-attention kernel
        counting = CountingOp(op)
        self.ops.append(counting)
        return counting

    def synchronize(self) -> None:
        """CPU work is done when the call returns (a real device: wait for its queue)."""

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "attention": self.settings.attention, "attention_calls": self.attention_calls}


SPEC = BackendSpec(
    name=NAME,
    priority=PRIORITY,
    probe=probe,
    create=TemplateBackend,
    device_type=TemplateBackend.device_type,
    dist_backend=TemplateBackend.dist_backend,
    visible_devices_env=TemplateBackend.visible_devices_env,
    description="template: the host CPU under another name (copy this to add a device)",
    options=TemplateOptions,
)


@hookimpl
def sagellm_register_backends(register: RegisterBackend) -> None:
    """Register the ``template`` backend."""
    register(SPEC)
