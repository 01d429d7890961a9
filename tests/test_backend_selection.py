"""Backend selection over the real vendor plugins with simulated devices: priority for every subset
of present devices, explicit choice by config name or ``SAGELLM_BACKEND``, and loud failures.

Each vendor plugin probes through its own ``_import_torch``; the simulation hands each plugin a torch
stand-in on which its device is present or absent, so CUDA (needs a non-HIP torch) and Hygon (needs a
HIP torch) can be present at once.
"""

from __future__ import annotations

import importlib.machinery
import itertools
import sys
import types
from typing import Any, Callable

import attrs
import pytest

import sagellm_ascend.plugin as ascend
import sagellm_cambricon.plugin as cambricon
import sagellm_cuda.plugin as cuda
import sagellm_hygon.plugin as hygon
from sagellm_core.backend import BackendSpec, ProbeResult
from sagellm_core.backend_selection import select_backend
from sagellm_core.config import EngineConfig
from sagellm_core.errors import BackendUnavailableError
from sagellm_core.hookspecs import hookimpl
from sagellm_core.plugin_manager import SageLLMPluginManager, create_plugin_manager

VENDORS = ("cuda", "ascend", "cambricon", "hygon")
PLUGINS = {"cuda": cuda, "ascend": ascend, "cambricon": cambricon, "hygon": hygon}
PRIORITY = {"cuda": 100, "ascend": 90, "cambricon": 80, "hygon": 70, "cpu": 0}


class FakeAccelerator:
    """A ``torch.cuda``-like namespace seeing ``count`` devices of ``arch``/``name``."""

    def __init__(self, count: int, arch: str = "", name: str = "") -> None:
        self.count, self.props = count, types.SimpleNamespace(gcnArchName=arch, name=name)

    def is_available(self) -> bool:
        return self.count > 0

    def device_count(self) -> int:
        return self.count

    def get_device_properties(self, index: int) -> Any:
        return self.props


def fake_torch(*, hip: str | None = None, **namespaces: FakeAccelerator) -> types.SimpleNamespace:
    version = types.SimpleNamespace(hip=hip, cuda=None if hip else "12.8")
    return types.SimpleNamespace(__version__="2.9.0", version=version, **namespaces)


def _vendor_module(monkeypatch: pytest.MonkeyPatch, name: str, installed: bool) -> None:
    if installed:
        module = types.ModuleType(name)
        module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)
        monkeypatch.setitem(sys.modules, name, module)
    else:
        monkeypatch.setitem(sys.modules, name, None)  # find_spec -> None: "not installed"


def simulate_vendor_modules_absent(monkeypatch: pytest.MonkeyPatch) -> None:
    _vendor_module(monkeypatch, "torch_npu", False)
    _vendor_module(monkeypatch, "torch_mlu", False)


def simulate(monkeypatch: pytest.MonkeyPatch, present: set[str]) -> None:
    """Make exactly the vendors in ``present`` find one device each (as seen by their own plugin)."""
    torches: dict[str, Callable[[bool], types.SimpleNamespace]] = {
        "cuda": lambda on: fake_torch(cuda=FakeAccelerator(int(on))),
        "ascend": lambda on: fake_torch(npu=FakeAccelerator(int(on))),
        "cambricon": lambda on: fake_torch(mlu=FakeAccelerator(int(on))),
        "hygon": lambda on: fake_torch(hip="5.7", cuda=FakeAccelerator(int(on), "gfx928", "K100_AI")),
    }
    for vendor, make in torches.items():
        torch_view = make(vendor in present)
        monkeypatch.setattr(PLUGINS[vendor], "_import_torch", lambda t=torch_view: t)
    _vendor_module(monkeypatch, "torch_npu", "ascend" in present)
    _vendor_module(monkeypatch, "torch_mlu", "cambricon" in present)


def manager_with(**extra: Any) -> SageLLMPluginManager:
    """Built-ins plus the four vendor plugins (in-process: independent of what is pip-installed)."""
    return create_plugin_manager(entry_points=False, extra={**PLUGINS, **extra})


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("SAGELLM_PLUGINS", "SAGELLM_BLOCK_PLUGINS", "SAGELLM_BACKEND"):
        monkeypatch.delenv(name, raising=False)


SUBSETS = [set(c) for r in range(len(VENDORS) + 1) for c in itertools.combinations(VENDORS, r)]


@pytest.mark.parametrize("present", SUBSETS, ids=lambda s: "+".join(sorted(s)) or "none")
def test_highest_priority_present_backend_wins(monkeypatch: pytest.MonkeyPatch, present: set[str]) -> None:
    simulate(monkeypatch, present)
    choice = select_backend(manager_with())
    expected = max(present | {"cpu"}, key=PRIORITY.__getitem__)
    assert choice.spec.name == expected
    assert choice.reason == f"highest priority available (priority {PRIORITY[expected]})"
    assert [(p.name, p.priority, p.result.available) for p in choice.probes] == \
        [(name, PRIORITY[name], name in present | {"cpu"}) for name in (*VENDORS, "cpu")]


def test_subsets_cover_every_combination() -> None:
    assert len(SUBSETS) == 16 and len({frozenset(s) for s in SUBSETS}) == 16


def test_hygon_selected_on_dcu_machine_with_real_torch_semantics(monkeypatch: pytest.MonkeyPatch) -> None:
    """One torch for both plugins: a DTK build with DCUs goes to hygon, never to cuda."""
    dtk = fake_torch(hip="5.7", cuda=FakeAccelerator(8, "gfx936", "BW1000"))
    monkeypatch.setattr(cuda, "_import_torch", lambda: dtk)
    monkeypatch.setattr(hygon, "_import_torch", lambda: dtk)
    simulate_vendor_modules_absent(monkeypatch)
    choice = select_backend(manager_with())
    assert choice.spec.name == "hygon"
    assert {p.name: p.result.detail for p in choice.probes}["hygon"] == "8 x BW1000 (gfx936)"


def test_plain_amd_gpu_machine_falls_back_to_cpu(monkeypatch: pytest.MonkeyPatch) -> None:
    rocm = fake_torch(hip="6.2", cuda=FakeAccelerator(4, "gfx90a:sramecc+:xnack-", "AMD Instinct MI250X"))
    monkeypatch.setattr(cuda, "_import_torch", lambda: rocm)
    monkeypatch.setattr(hygon, "_import_torch", lambda: rocm)
    simulate_vendor_modules_absent(monkeypatch)
    assert select_backend(manager_with()).spec.name == "cpu"


# ---- explicit choice ------------------------------------------------------------------------------
def _requested(config: EngineConfig) -> str | None:
    """How the engine passes the config's backend name (``auto`` -> None)."""
    return None if config.backend.name == "auto" else config.backend.name


def test_config_name_overrides_priority(monkeypatch: pytest.MonkeyPatch) -> None:
    simulate(monkeypatch, {"cuda", "cambricon"})
    config = EngineConfig.from_dict({"backend": {"name": "cambricon"}})
    choice = select_backend(manager_with(), _requested(config))
    assert (choice.spec.name, choice.reason) == ("cambricon", "chosen explicitly")


def test_env_var_overrides_priority(monkeypatch: pytest.MonkeyPatch) -> None:
    simulate(monkeypatch, {"cuda", "ascend"})
    monkeypatch.setenv("SAGELLM_BACKEND", "cpu")
    choice = select_backend(manager_with(), _requested(EngineConfig()))
    assert (choice.spec.name, choice.reason) == ("cpu", "chosen explicitly")


def test_config_name_beats_env_var(monkeypatch: pytest.MonkeyPatch) -> None:
    simulate(monkeypatch, {"ascend", "hygon"})
    monkeypatch.setenv("SAGELLM_BACKEND", "ascend")
    assert select_backend(manager_with(), "hygon").spec.name == "hygon"


def test_env_var_auto_means_priority(monkeypatch: pytest.MonkeyPatch) -> None:
    simulate(monkeypatch, {"ascend"})
    monkeypatch.setenv("SAGELLM_BACKEND", "auto")
    assert select_backend(manager_with()).spec.name == "ascend"


@pytest.mark.parametrize("via", ["config", "env"])
@pytest.mark.parametrize(("missing", "detail"), [
    ("cuda", "torch CUDA 12.8: no CUDA device visible"),
    ("ascend", "torch_npu not installed"),
    ("cambricon", "torch_mlu not installed"),
    ("hygon", "ROCm/DTK torch (hip 5.7): no HIP device visible"),
])
def test_explicit_missing_backend_raises_naming_what_was_probed(monkeypatch: pytest.MonkeyPatch, via: str,
                                                                missing: str, detail: str) -> None:
    simulate(monkeypatch, set(VENDORS) - {missing})
    requested = missing if via == "config" else None
    if via == "env":
        monkeypatch.setenv("SAGELLM_BACKEND", missing)
    with pytest.raises(BackendUnavailableError) as info:
        select_backend(manager_with(), requested)
    message = str(info.value)
    assert message.startswith(f"backend {missing!r} found no device ({detail}). Probed:")
    for name in set(VENDORS) - {missing}:
        assert f"  {name}: found (" in message
    assert f"  {missing}: not found ({detail})" in message
    assert "  cpu: found (" in message


def test_unknown_backend_name_lists_probes_and_failed_plugins(monkeypatch: pytest.MonkeyPatch) -> None:
    simulate(monkeypatch, set())

    class BrokenBackendPlugin:
        @hookimpl
        def sagellm_register_backends(self, register: Any) -> None:
            raise RuntimeError("driver library not found")

    with pytest.raises(BackendUnavailableError) as info:
        select_backend(manager_with(tpu=BrokenBackendPlugin()), "tpu")
    message = str(info.value)
    assert message.startswith("backend 'tpu' is not installed or failed to load. Probed:")
    assert "  ascend: not found (torch_npu not installed)" in message
    assert "  plugin tpu: failed to load (sagellm_register_backends raised RuntimeError: driver library not found)" \
        in message


def test_no_backend_at_all(monkeypatch: pytest.MonkeyPatch) -> None:
    simulate(monkeypatch, set())
    monkeypatch.setenv("SAGELLM_BLOCK_PLUGINS", "cpu")
    with pytest.raises(BackendUnavailableError, match=r"^no backend found a device\. Probed:\n  cuda: not found"):
        select_backend(manager_with())


def test_probe_that_raises_counts_as_absent(monkeypatch: pytest.MonkeyPatch) -> None:
    simulate(monkeypatch, {"ascend"})

    def exploding() -> ProbeResult:
        raise RuntimeError("NVML driver mismatch")

    class Exploding:
        @hookimpl
        def sagellm_register_backends(self, register: Any) -> None:
            register(BackendSpec("xpu", 1000, exploding, lambda config: None, "xpu", "ccl"))

    choice = select_backend(manager_with(xpu=Exploding()))
    assert choice.spec.name == "ascend"
    assert choice.probes[0].result == ProbeResult(False, "probe raised RuntimeError: NVML driver mismatch")


# ---- the Backend contract ------------------------------------------------------------------------
def test_backend_base_class_is_an_abstract_contract() -> None:
    from sagellm_core.backend import Backend

    class Incomplete(Backend):
        name, device_type, dist_backend = "incomplete", "cpu", "gloo"

        def device(self) -> Any:
            return "cpu"

    with pytest.raises(TypeError, match="abstract"):
        Incomplete()  # type: ignore[abstract]

    class Nameless(Backend):
        def device(self) -> Any: ...
        def default_dtype(self) -> Any: ...
        def memory_info(self) -> tuple[int, int]: return (0, 0)
        def attention_op(self) -> Any: ...
        def synchronize(self) -> None: ...

    with pytest.raises(TypeError, match="Nameless must set name, device_type, dist_backend"):
        Nameless()


def test_backend_options_are_validated_against_the_spec() -> None:
    from sagellm_core.backend_selection import create_backend
    from sagellm_core.builtin.cpu_backend import SPEC, CPUBackend
    from sagellm_core.config import BackendConfig
    from sagellm_core.errors import ConfigError

    assert isinstance(create_backend(SPEC, BackendConfig()), CPUBackend)
    off = create_backend(SPEC, BackendConfig(options={"lean_decoder": False}))
    assert isinstance(off, CPUBackend) and off.settings.lean_decoder is False
    with pytest.raises(ConfigError, match=r"^backend\.options\.threads: unknown key$"):
        create_backend(SPEC, BackendConfig(options={"threads": 4}))
    without_options = attrs.evolve(SPEC, options=None)
    with pytest.raises(ConfigError, match=r"^backend\.options: this plugin takes no options, got threads$"):
        create_backend(without_options, BackendConfig(options={"threads": 4}))
