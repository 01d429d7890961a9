"""The four vendor backend plugins on a CPU machine: detection with simulated vendor stacks (fake
``torch_npu`` / ``torch_mlu`` modules and ``torch.npu`` / ``torch.mlu`` namespaces, patched
``torch.version`` and device properties) and the device wiring of each created backend."""

from __future__ import annotations

import importlib.machinery
import sys
import types
from typing import Any

import attrs
import pytest
import torch
from packaging.specifiers import SpecifierSet

import sagellm_ascend.plugin as ascend
import sagellm_cambricon.plugin as cambricon
import sagellm_cuda.plugin as cuda
import sagellm_hygon.plugin as hygon
from sagellm_core import PLUGIN_API_VERSION
from sagellm_core.attention.reference import reference_paged_attention
from sagellm_core.config import BackendConfig
from sagellm_core.plugin_manager import create_plugin_manager

PLUGINS = {"cuda": cuda, "ascend": ascend, "cambricon": cambricon, "hygon": hygon}


# ---- fakes ----------------------------------------------------------------------------------------
def _initialising(name: str) -> Any:
    def call(*_: Any, **__: Any) -> None:
        raise AssertionError(f"the probe must not call {name} (it initialises the device)")
    return call


class FakeAccelerator:
    """What ``torch_npu`` / ``torch_mlu`` add as ``torch.npu`` / ``torch.mlu``: a ``torch.cuda`` look-alike.

    Calls that would initialise the device raise, so a probe that touches them fails the test.
    """

    def __init__(self, count: int, *, memory: tuple[int, int] = (3 << 30, 8 << 30), bf16: bool | None = True):
        self.count = count
        self.memory = memory
        self.calls: list[tuple[str, Any]] = []
        if bf16 is not None:
            self.is_bf16_supported = lambda: bf16
        for name in ("init", "set_device", "get_device_name", "get_device_properties", "current_device"):
            setattr(self, name, _initialising(name))

    def is_available(self) -> bool:
        return self.count > 0

    def device_count(self) -> int:
        return self.count

    def mem_get_info(self, device: Any = None) -> tuple[int, int]:
        self.calls.append(("mem_get_info", device))
        return self.memory

    def synchronize(self, device: Any = None) -> None:
        self.calls.append(("synchronize", device))


@attrs.frozen
class FakeDevice:
    """``torch.device`` for a vendor type the CPU build of torch does not know ("npu", "mlu")."""

    type: str
    index: int | None = None

    def __str__(self) -> str:
        return self.type if self.index is None else f"{self.type}:{self.index}"


@attrs.frozen
class VendorCase:
    plugin: types.ModuleType
    module: str  # the vendor torch extension
    attr: str  # what it adds to torch
    unit: str  # as the probe's detail words it
    label: str
    dist_backend: str
    visible_env: str


VENDOR_CASES = [
    VendorCase(ascend, "torch_npu", "npu", "NPUs", "Ascend NPU", "hccl", "ASCEND_RT_VISIBLE_DEVICES"),
    VendorCase(cambricon, "torch_mlu", "mlu", "MLUs", "Cambricon MLU", "cncl", "MLU_VISIBLE_DEVICES"),
]


def install_fake_module(monkeypatch: pytest.MonkeyPatch, name: str) -> types.ModuleType:
    """Put an importable stand-in for a vendor module into sys.modules (find_spec sees it too)."""
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)
    monkeypatch.setitem(sys.modules, name, module)
    return module


def simulate_vendor(monkeypatch: pytest.MonkeyPatch, case: VendorCase, count: int | None,
                    **accelerator: Any) -> FakeAccelerator | None:
    """``count`` None: vendor module not installed; else installed and seeing ``count`` devices."""
    if count is None:
        monkeypatch.setitem(sys.modules, case.module, None)  # find_spec answers None: "not installed"
        return None
    install_fake_module(monkeypatch, case.module)
    fake = FakeAccelerator(count, **accelerator)
    monkeypatch.setattr(torch, case.attr, fake, raising=False)
    return fake


def simulate_torch_cuda(monkeypatch: pytest.MonkeyPatch, *, hip: str | None, cuda_version: str | None,
                        devices: list[tuple[str, str]]) -> None:
    """Patch the real torch: build flavour and the (arch, name) of each visible ``torch.cuda`` device."""
    monkeypatch.setattr(torch.version, "hip", hip)
    monkeypatch.setattr(torch.version, "cuda", cuda_version)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: bool(devices))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(devices))
    props = [types.SimpleNamespace(gcnArchName=arch, name=name, total_memory=64 << 30) for arch, name in devices]
    if hip:
        monkeypatch.setattr(torch.cuda, "get_device_properties", lambda index: props[index])
    else:  # the CUDA probe must answer without touching anything that creates a context
        for name in ("get_device_properties", "get_device_name", "init", "_lazy_init", "set_device", "mem_get_info"):
            monkeypatch.setattr(torch.cuda, name, _initialising(name))


K100_AI = ("gfx928:sramecc+:xnack-", "K100_AI")
MI250X = ("gfx90a:sramecc+:xnack-", "AMD Instinct MI250X")


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SAGELLM_PLUGINS", "SAGELLM_BLOCK_PLUGINS", "SAGELLM_BACKEND"):
        monkeypatch.delenv(name, raising=False)


# ---- registration ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("name", "priority", "device_type"),
                         [("cuda", 100, "cuda"), ("ascend", 90, "npu"), ("cambricon", 80, "mlu"),
                          ("hygon", 70, "cuda")])
def test_plugin_registers_its_spec(name: str, priority: int, device_type: str) -> None:
    plugin = PLUGINS[name]
    assert PLUGIN_API_VERSION in SpecifierSet(plugin.SAGELLM_PLUGIN_API)
    manager = create_plugin_manager(entry_points=False, extra={name: plugin})
    record = manager.records[name]
    assert (record.status, record.error, record.hooks) == ("loaded", "", ["sagellm_register_backends"])
    spec = manager.registry.get("backend", name).spec
    assert (spec.name, spec.priority, spec.device_type) == (name, priority, device_type)


def test_entry_points_of_installed_distributions() -> None:
    from importlib import metadata

    found = {ep.name: (ep.value, ep.dist.name if ep.dist else None)
             for ep in metadata.entry_points(group="sagellm.plugins") if ep.name in PLUGINS}
    assert found == {name: (f"sagellm_{name}.plugin", f"sagellm-{name}") for name in PLUGINS}


# ---- CUDA detection -------------------------------------------------------------------------------
def test_cuda_probe_cpu_only_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    simulate_torch_cuda(monkeypatch, hip=None, cuda_version=None, devices=[])
    result = cuda.probe()
    assert not result.available and "has no CUDA support" in result.detail


def test_cuda_probe_cuda_build_without_device(monkeypatch: pytest.MonkeyPatch) -> None:
    simulate_torch_cuda(monkeypatch, hip=None, cuda_version="12.8", devices=[])
    assert cuda.probe() == cuda.ProbeResult(False, "torch CUDA 12.8: no CUDA device visible")


def test_cuda_probe_finds_gpus_without_initialising(monkeypatch: pytest.MonkeyPatch) -> None:
    simulate_torch_cuda(monkeypatch, hip=None, cuda_version="12.8", devices=[("", "NVIDIA H100")] * 2)
    assert cuda.probe() == cuda.ProbeResult(True, "2 x CUDA device (CUDA 12.8)", device_count=2)


@pytest.mark.parametrize("devices", [[K100_AI], [MI250X]], ids=["hygon-dcu", "amd-gpu"])
def test_cuda_never_claims_a_hip_build(monkeypatch: pytest.MonkeyPatch, devices: list[tuple[str, str]]) -> None:
    simulate_torch_cuda(monkeypatch, hip="6.2.41134", cuda_version=None, devices=devices)
    result = cuda.probe()
    assert not result.available and "ROCm/HIP build" in result.detail


# ---- Hygon detection ------------------------------------------------------------------------------
@pytest.mark.parametrize(("arch", "name", "expected"), [
    ("gfx928:sramecc+:xnack-", "K100_AI", True),
    ("gfx936", "BW1000", True),
    ("gfx938", "", True),
    ("gfx926", "K100", True),
    ("gfx906", "Z100L", True),  # first DCU generation shares gfx906 with AMD MI50: known by name
    ("", "Hygon DCU", True),
    ("gfx906:sramecc+:xnack-", "DCU Z100", True),
    ("gfx90a:sramecc+:xnack-", "AMD Instinct MI250X", False),
    ("gfx906:sramecc-:xnack-", "AMD Instinct MI50", False),
    ("gfx942", "AMD Instinct MI300X", False),
    ("gfx1100", "Radeon RX 7900 XTX", False),
    ("", "", False),
])
def test_is_hygon_dcu(arch: str, name: str, expected: bool) -> None:
    assert hygon.is_hygon_dcu(arch, name) is expected


def test_hygon_probe_finds_dcus(monkeypatch: pytest.MonkeyPatch) -> None:
    simulate_torch_cuda(monkeypatch, hip="5.7.24164", cuda_version=None, devices=[K100_AI, K100_AI])
    assert hygon.probe() == hygon.ProbeResult(True, "2 x K100_AI (gfx928)", device_count=2)


def test_hygon_probe_refuses_plain_amd_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    simulate_torch_cuda(monkeypatch, hip="6.2.41134", cuda_version=None, devices=[MI250X])
    assert hygon.probe() == hygon.ProbeResult(
        False, "HIP devices are not Hygon DCUs: 1 x AMD Instinct MI250X (gfx90a)")


def test_hygon_probe_hip_build_without_device_reads_no_properties(monkeypatch: pytest.MonkeyPatch) -> None:
    simulate_torch_cuda(monkeypatch, hip="6.2", cuda_version=None, devices=[])
    monkeypatch.setattr(torch.cuda, "get_device_properties", _initialising("get_device_properties"))
    assert hygon.probe() == hygon.ProbeResult(False, "ROCm/DTK torch (hip 6.2): no HIP device visible")


def test_hygon_probe_on_cuda_build(monkeypatch: pytest.MonkeyPatch) -> None:
    simulate_torch_cuda(monkeypatch, hip=None, cuda_version="12.8", devices=[("", "NVIDIA H100")])
    result = hygon.probe()
    assert not result.available and "torch.version.hip is None" in result.detail


def test_describe_devices_groups_models() -> None:
    devices = [K100_AI, ("gfx936", "BW1000"), K100_AI]
    assert hygon.describe_devices(devices) == "2 x K100_AI (gfx928), 1 x BW1000 (gfx936)"


# ---- Ascend / Cambricon detection -----------------------------------------------------------------
@pytest.mark.parametrize("case", VENDOR_CASES, ids=lambda c: c.plugin.NAME)
def test_vendor_module_not_installed(monkeypatch: pytest.MonkeyPatch, case: VendorCase) -> None:
    simulate_vendor(monkeypatch, case, None)
    assert case.plugin.probe() == case.plugin.ProbeResult(False, f"{case.module} not installed")


@pytest.mark.parametrize("case", VENDOR_CASES, ids=lambda c: c.plugin.NAME)
def test_vendor_module_without_devices(monkeypatch: pytest.MonkeyPatch, case: VendorCase) -> None:
    simulate_vendor(monkeypatch, case, 0)
    assert case.plugin.probe() == case.plugin.ProbeResult(False, f"{case.module} present, 0 {case.unit}")


@pytest.mark.parametrize("case", VENDOR_CASES, ids=lambda c: c.plugin.NAME)
def test_vendor_devices_found_without_initialising(monkeypatch: pytest.MonkeyPatch, case: VendorCase) -> None:
    simulate_vendor(monkeypatch, case, 2)  # the fake raises on any initialising call
    assert case.plugin.probe() == case.plugin.ProbeResult(True, f"2 x {case.label}", device_count=2)


@pytest.mark.parametrize("case", VENDOR_CASES, ids=lambda c: c.plugin.NAME)
def test_vendor_module_import_error_is_reported(monkeypatch: pytest.MonkeyPatch, tmp_path: Any,
                                                case: VendorCase) -> None:
    (tmp_path / f"{case.module}.py").write_text("raise OSError('libascend_hal.so: cannot open shared object')\n")
    monkeypatch.delitem(sys.modules, case.module, raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    result = case.plugin.probe()
    assert not result.available
    assert result.detail == f"{case.module} failed to import: OSError: libascend_hal.so: cannot open shared object"


@pytest.mark.parametrize("case", VENDOR_CASES, ids=lambda c: c.plugin.NAME)
def test_vendor_module_that_adds_no_namespace(monkeypatch: pytest.MonkeyPatch, case: VendorCase) -> None:
    install_fake_module(monkeypatch, case.module)
    monkeypatch.delattr(torch, case.attr, raising=False)
    expected = f"{case.module} imported but torch.{case.attr} is missing"
    assert case.plugin.probe() == case.plugin.ProbeResult(False, expected)


# ---- device wiring --------------------------------------------------------------------------------
@pytest.mark.parametrize("case", VENDOR_CASES, ids=lambda c: c.plugin.NAME)
def test_vendor_backend_wiring(monkeypatch: pytest.MonkeyPatch, case: VendorCase) -> None:
    fake = simulate_vendor(monkeypatch, case, 2, memory=(5 << 30, 32 << 30))
    assert fake is not None
    monkeypatch.setattr(torch, "device", FakeDevice)  # what importing the real vendor module enables
    monkeypatch.setenv(case.visible_env, "4,5")
    backend = case.plugin.SPEC.create(BackendConfig(device_index=1))
    expected_device = FakeDevice(case.attr, 1)
    assert str(backend.device()) == f"{case.attr}:1"
    assert backend.dist_backend == case.plugin.SPEC.dist_backend == case.dist_backend
    assert backend.visible_devices_env == case.plugin.SPEC.visible_devices_env == case.visible_env
    assert backend.visible_devices() == "4,5"
    assert backend.memory_info() == (5 << 30, 32 << 30)
    backend.synchronize()
    assert fake.calls == [("mem_get_info", expected_device), ("synchronize", expected_device)]
    assert backend.describe() == {"name": case.plugin.NAME, "device": f"{case.attr}:1",
                                  "dist_backend": case.dist_backend, "visible_devices_env": case.visible_env,
                                  "visible_devices": "4,5"}


@pytest.mark.parametrize("case", VENDOR_CASES, ids=lambda c: c.plugin.NAME)
@pytest.mark.parametrize(("bf16", "expected"), [(True, torch.bfloat16), (False, torch.float16), (None, torch.float16)])
def test_vendor_default_dtype(monkeypatch: pytest.MonkeyPatch, case: VendorCase, bf16: bool | None,
                              expected: torch.dtype) -> None:
    simulate_vendor(monkeypatch, case, 1, bf16=bf16)
    assert case.plugin.SPEC.create(BackendConfig()).default_dtype() is expected


def _record(calls: list[tuple[str, Any]], name: str, result: Any = None) -> Any:
    def call(device: Any = None) -> Any:
        calls.append((name, device))
        return result
    return call


@pytest.mark.parametrize(("plugin", "env"), [(cuda, "CUDA_VISIBLE_DEVICES"), (hygon, "HIP_VISIBLE_DEVICES")])
def test_cuda_like_backend_wiring(monkeypatch: pytest.MonkeyPatch, plugin: types.ModuleType, env: str) -> None:
    calls: list[tuple[str, Any]] = []
    monkeypatch.setattr(torch.cuda, "mem_get_info", _record(calls, "mem_get_info", (7 << 30, 80 << 30)))
    monkeypatch.setattr(torch.cuda, "synchronize", _record(calls, "synchronize"))
    monkeypatch.setenv(env, "0,3")
    backend = plugin.SPEC.create(BackendConfig(device_index=1))
    assert str(backend.device()) == "cuda:1"
    assert (backend.dist_backend, backend.visible_devices_env, backend.visible_devices()) == ("nccl", env, "0,3")
    assert plugin.SPEC.visible_devices_env == env and plugin.SPEC.dist_backend == "nccl"
    assert backend.memory_info() == (7 << 30, 80 << 30)
    backend.synchronize()
    assert calls == [("mem_get_info", torch.device("cuda", 1)), ("synchronize", torch.device("cuda", 1))]


@pytest.mark.parametrize("plugin", [cuda, hygon])
@pytest.mark.parametrize(("bf16", "expected"), [(True, torch.bfloat16), (False, torch.float16)])
def test_cuda_like_default_dtype(monkeypatch: pytest.MonkeyPatch, plugin: types.ModuleType, bf16: bool,
                                 expected: torch.dtype) -> None:
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)
    assert plugin.SPEC.create(BackendConfig()).default_dtype() is expected


# ---- CUDA attention op ----------------------------------------------------------------------------
def test_cuda_attention_falls_back_without_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "triton", None)
    backend = cuda.SPEC.create(BackendConfig())
    assert backend.attention_op() is reference_paged_attention
    assert backend.describe()["attention"] == "reference (triton not installed)"


def test_cuda_attention_uses_triton_op(monkeypatch: pytest.MonkeyPatch) -> None:
    install_fake_module(monkeypatch, "triton")
    kernels = install_fake_module(monkeypatch, "sagellm_cuda.attention")
    kernels.triton_paged_attention = lambda *args, **kwargs: "triton result"
    backend = cuda.SPEC.create(BackendConfig())
    assert backend.attention_op() is kernels.triton_paged_attention
    assert backend.describe()["attention"] == "triton"


def test_cuda_attention_falls_back_when_kernels_fail_to_import(monkeypatch: pytest.MonkeyPatch) -> None:
    install_fake_module(monkeypatch, "triton")
    install_fake_module(monkeypatch, "sagellm_cuda.attention")  # without the op: "cannot import name"
    backend = cuda.SPEC.create(BackendConfig())
    assert backend.attention_op() is reference_paged_attention
    assert backend.describe()["attention"].startswith("reference (Triton attention failed to import: ImportError")


def test_triton_op_signature_matches_reference() -> None:
    """The real kernel module (when Triton is installed) keeps the reference op's signature."""
    import inspect

    pytest.importorskip("triton")
    from sagellm_cuda.attention import triton_paged_attention

    assert list(inspect.signature(triton_paged_attention).parameters) == \
        list(inspect.signature(reference_paged_attention).parameters)


# ---- CUDA graph capture ---------------------------------------------------------------------------
def test_cuda_graph_capture_needs_the_triton_op(monkeypatch: pytest.MonkeyPatch) -> None:
    """The reference op syncs to the host while planning, which graph capture forbids."""
    monkeypatch.setitem(sys.modules, "triton", None)
    assert cuda.SPEC.create(BackendConfig()).graph_capture() is None


def test_cuda_graph_capture_with_triton(monkeypatch: pytest.MonkeyPatch) -> None:
    install_fake_module(monkeypatch, "triton")
    install_fake_module(monkeypatch, "sagellm_cuda.attention").triton_paged_attention = lambda *a, **k: None
    graphs = install_fake_module(monkeypatch, "sagellm_cuda.graphs")
    graphs.CUDAGraphCapture = lambda device: ("capture", device)
    assert cuda.SPEC.create(BackendConfig(device_index=2)).graph_capture() == ("capture", torch.device("cuda", 2))


@pytest.mark.parametrize("plugin", [ascend, cambricon, hygon])
def test_other_backends_offer_no_graph_capture(monkeypatch: pytest.MonkeyPatch, plugin: types.ModuleType) -> None:
    for case in VENDOR_CASES:
        simulate_vendor(monkeypatch, case, 1)
    assert plugin.SPEC.create(BackendConfig()).graph_capture() is None


# ---- structured outputs' fused token mask ----------------------------------------------------------
def test_cuda_bitmask_op_is_the_triton_kernel_unless_off_or_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    install_fake_module(monkeypatch, "triton")
    kernel = install_fake_module(monkeypatch, "sagellm_cuda.bitmask")
    kernel.apply_token_bitmask = lambda logits, words: logits
    assert cuda.SPEC.create(BackendConfig()).bitmask_op() is kernel.apply_token_bitmask
    monkeypatch.setenv("SAGELLM_FUSED_BITMASK", "0")
    assert cuda.SPEC.create(BackendConfig()).bitmask_op() is None
    monkeypatch.delenv("SAGELLM_FUSED_BITMASK")
    monkeypatch.setitem(sys.modules, "triton", None)
    assert cuda.SPEC.create(BackendConfig()).bitmask_op() is None  # torch's mask_logits then
