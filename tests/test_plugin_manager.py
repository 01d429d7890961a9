"""Plugin manager: entry-point discovery, isolation of broken plugins, allow/block lists, hook-name
checks, API-version ranges, idempotent loading and registration failures.

Plugins here are *installed* in the importlib.metadata sense: each test writes a ``.dist-info``
directory with an ``entry_points.txt`` plus the plugin modules into a temporary directory on sys.path.
"""

from __future__ import annotations

import itertools
import sys
import textwrap
from pathlib import Path
from typing import Any, Iterator

import pytest

from sagellm_core.hookspecs import hookimpl
from sagellm_core.plugin_manager import create_plugin_manager

GOOD = """
from sagellm_core.hookspecs import hookimpl

@hookimpl
def sagellm_register_schedulers(register):
    register("{name}_sched", lambda config, options=None: None)
"""

_module_ids = itertools.count()


class FakeSite:
    """A directory on sys.path holding fake distributions (dist-info + plugin modules)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.modules: list[str] = []

    def install(self, dist: str, plugins: dict[str, str], version: str = "1.0") -> None:
        """``plugins``: entry-point name -> module source (``{name}`` is replaced by the entry-point name)."""
        lines = ["[sagellm.plugins]"]
        for name, source in plugins.items():
            module = f"fake_sagellm_plugin_{name}_{next(_module_ids)}"
            (self.root / f"{module}.py").write_text(textwrap.dedent(source.replace("{name}", name)))
            self.modules.append(module)
            lines.append(f"{name} = {module}")
        info = self.root / f"{dist.replace('-', '_')}-{version}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
        (info / "entry_points.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeSite]:
    for name in ("SAGELLM_PLUGINS", "SAGELLM_BLOCK_PLUGINS", "SAGELLM_BACKEND"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.syspath_prepend(str(tmp_path))
    fake = FakeSite(tmp_path)
    yield fake
    for module in fake.modules:
        sys.modules.pop(module, None)


def test_entry_point_plugin_loads_with_distribution_version_and_hooks(site: FakeSite) -> None:
    site.install("sagellm-alpha", {"alpha": GOOD}, version="1.2.3")
    manager = create_plugin_manager()
    record = manager.records["alpha"]
    assert (record.status, record.distribution, record.version, record.hooks, record.builtin) == \
        ("loaded", "sagellm-alpha", "1.2.3", ["sagellm_register_schedulers"], False)
    assert manager.registry.get("scheduler", "alpha_sched").plugin == "alpha"
    assert manager.records["cpu"].builtin and manager.records["cpu"].status == "loaded"


def test_plugin_whose_import_raises_is_failed_and_others_load(site: FakeSite) -> None:
    site.install("sagellm-mixed", {"broken": "raise RuntimeError('CUDA driver too old')\n", "good": GOOD})
    manager = create_plugin_manager()
    assert manager.records["broken"].status == "failed"
    assert manager.records["broken"].error == "RuntimeError: CUDA driver too old"
    assert manager.records["good"].status == "loaded"
    assert "good_sched" in manager.registry.names("scheduler")
    assert [r.name for r in manager.failed()] == ["broken"]


@pytest.mark.parametrize(("allow", "loaded", "not_allowed"), [
    (None, {"a", "b", "c"}, set()),
    ("", set(), {"a", "b", "c"}),
    ("a,b", {"a", "b"}, {"c"}),
    (" a , c ,", {"a", "c"}, {"b"}),
])
def test_allow_list(site: FakeSite, monkeypatch: pytest.MonkeyPatch, allow: str | None, loaded: set[str],
                    not_allowed: set[str]) -> None:
    site.install("sagellm-abc", {"a": GOOD, "b": GOOD, "c": GOOD})
    if allow is not None:
        monkeypatch.setenv("SAGELLM_PLUGINS", allow)
    manager = create_plugin_manager()
    status = {name: manager.records[name].status for name in "abc"}
    assert {n for n, s in status.items() if s == "loaded"} == loaded
    assert {n for n, s in status.items() if s == "not allowed"} == not_allowed
    for name in not_allowed:
        assert manager.records[name].error == "not in SAGELLM_PLUGINS"
        assert f"{name}_sched" not in manager.registry.names("scheduler")
    assert manager.records["cpu"].status == "loaded"  # the allow-list is for external plugins only


def test_block_list_applies_to_external_and_builtin_plugins(site: FakeSite, monkeypatch: pytest.MonkeyPatch) -> None:
    site.install("sagellm-ab", {"a": GOOD, "b": GOOD})
    monkeypatch.setenv("SAGELLM_BLOCK_PLUGINS", "b, cpu")
    manager = create_plugin_manager()
    assert manager.records["a"].status == "loaded"
    assert (manager.records["b"].status, manager.records["b"].error) == ("blocked", "blocked by SAGELLM_BLOCK_PLUGINS")
    assert manager.records["cpu"].status == "blocked" and manager.records["cpu"].builtin
    assert "cpu" not in manager.registry.names("backend")
    assert "b_sched" not in manager.registry.names("scheduler")


def test_misspelled_hook_is_reported_naming_plugin_and_hook(site: FakeSite) -> None:
    site.install("sagellm-typo", {"typo": """
        from sagellm_core.hookspecs import hookimpl

        @hookimpl
        def sagellm_register_schedulerz(register):
            register("never", object)
        """})
    record = create_plugin_manager().records["typo"]
    assert record.status == "failed"
    assert "plugin 'typo'" in record.error and "sagellm_register_schedulerz" in record.error
    assert "sagellm_register_schedulers" in record.error  # the known hooks are listed as a hint


def test_hookimpl_without_prefix_matching_no_spec_is_reported(site: FakeSite) -> None:
    site.install("sagellm-noprefix", {"noprefix": """
        from sagellm_core.hookspecs import hookimpl

        @hookimpl
        def register_schedulers(register):
            register("never", object)
        """})
    record = create_plugin_manager().records["noprefix"]
    assert record.status == "failed" and "register_schedulers" in record.error


def test_hook_with_argument_unknown_to_the_spec_is_failed(site: FakeSite) -> None:
    site.install("sagellm-args", {"args": """
        from sagellm_core.hookspecs import hookimpl

        @hookimpl
        def sagellm_register_schedulers(register, engine):
            pass
        """})
    record = create_plugin_manager().records["args"]
    assert record.status == "failed" and "engine" in record.error


def test_loading_is_idempotent(site: FakeSite) -> None:
    site.install("sagellm-once", {"once": GOOD})
    manager = create_plugin_manager()
    plugins_before = set(manager.pm.get_plugins())
    names_before = manager.registry.names("scheduler")
    manager.load_builtins()
    manager.load_entry_points(None)
    manager.register_object("once", object())  # same name again: ignored, not re-registered
    assert set(manager.pm.get_plugins()) == plugins_before
    assert manager.registry.names("scheduler") == names_before
    assert manager.records["once"].status == "loaded" and manager.failed() == []
    # a second manager in the same process (e.g. a worker) loads the same modules again
    assert create_plugin_manager().records["once"].status == "loaded"


@pytest.mark.parametrize(("declared", "status", "error"), [
    (">=2", "failed", "plugin 'versioned' supports sageLLM plugin API >=2, but this core provides 1.0"),
    ("<1.0", "failed", "plugin 'versioned' supports sageLLM plugin API <1.0, but this core provides 1.0"),
    ("not a range", "failed", "plugin 'versioned': invalid SAGELLM_PLUGIN_API 'not a range'"),
    (">=1.0,<2", "loaded", ""),
])
def test_plugin_api_range(site: FakeSite, declared: str, status: str, error: str) -> None:
    site.install("sagellm-versioned", {"versioned": f"SAGELLM_PLUGIN_API = {declared!r}\n" + GOOD})
    record = create_plugin_manager().records["versioned"]
    assert record.status == status
    assert record.error.startswith(f"PluginError: {error}" if error else "")


def test_register_hook_that_raises_marks_plugin_failed_and_drops_its_registrations(site: FakeSite) -> None:
    site.install("sagellm-raises", {"raises": """
        from sagellm_core.hookspecs import hookimpl

        @hookimpl
        def sagellm_register_schedulers(register):
            register("half_done", lambda config, options=None: None)
            raise ValueError("missing kernel")
        """, "good": GOOD})
    manager = create_plugin_manager()
    assert manager.records["raises"].status == "loaded"  # hooks run when the registry is first built
    registry = manager.registry
    record = manager.records["raises"]
    assert (record.status, record.error) == ("failed", "sagellm_register_schedulers raised ValueError: missing kernel")
    assert "half_done" not in registry.names("scheduler")
    assert "good_sched" in registry.names("scheduler")


def test_name_clash_between_plugins_fails_one_of_them(site: FakeSite) -> None:
    clash = GOOD.replace('"{name}_sched"', '"shared"')
    site.install("sagellm-clash", {"first": clash, "second": clash})
    manager = create_plugin_manager()
    owner = manager.registry.get("scheduler", "shared").plugin
    loser = ({"first", "second"} - {owner}).pop()
    assert manager.records[owner].status == "loaded"
    assert manager.records[loser].status == "failed"
    assert f"scheduler 'shared' from plugin '{loser}' clashes with the one from plugin '{owner}'" \
        in manager.records[loser].error


@pytest.mark.parametrize(("body", "error"), [
    ('register("", lambda c, o=None: None)', "registered a scheduler without a name"),
    ('register("x", 42)', "scheduler 'x' factory is not callable"),
])
def test_bad_registrations_fail_the_plugin(site: FakeSite, body: str, error: str) -> None:
    site.install("sagellm-bad", {"bad": f"""
        from sagellm_core.hookspecs import hookimpl

        @hookimpl
        def sagellm_register_schedulers(register):
            {body}
        """})
    manager = create_plugin_manager()
    manager.registry
    assert manager.records["bad"].status == "failed" and error in manager.records["bad"].error


def test_in_process_plugins_and_historic_configure(site: FakeSite) -> None:
    seen: list[tuple[str, Any]] = []

    class Early:
        @hookimpl
        def sagellm_configure(self, config: Any) -> None:
            seen.append(("early", config))

    class Late:
        @hookimpl
        def sagellm_configure(self, config: Any) -> None:
            seen.append(("late", config))

    manager = create_plugin_manager(entry_points=False, extra={"early": Early()})
    assert manager.records["early"].distribution == "(in-process)"
    manager.configure("the-config")
    manager.register_object("late", Late())  # registered after the call: still sees it (historic)
    assert seen == [("early", "the-config"), ("late", "the-config")]


def test_plugin_whose_second_hook_raises_contributes_nothing(site: FakeSite) -> None:
    """Its scheduler (registered by a hook that succeeded) is rolled back, and its other hooks are
    no longer called."""
    site.install("sagellm-partial", {"partial": """
        from sagellm_core.hookspecs import hookimpl

        CONFIGURED = []

        @hookimpl
        def sagellm_register_schedulers(register):
            register("partial_sched", lambda config, options=None: None)

        @hookimpl
        def sagellm_register_kv_policies(register):
            register("partial_policy", lambda options=None: None)
            raise RuntimeError("no device")

        @hookimpl
        def sagellm_configure(config):
            CONFIGURED.append(config)
        """, "good": GOOD})
    manager = create_plugin_manager()
    registry = manager.registry
    record = manager.records["partial"]
    assert (record.status, record.error) == ("failed", "sagellm_register_kv_policies raised RuntimeError: no device")
    assert "partial_sched" not in registry.names("scheduler") and "partial_policy" not in registry.names("kv_policy")
    assert "good_sched" in registry.names("scheduler")
    manager.configure("cfg")
    assert sys.modules[site.modules[0]].CONFIGURED == []


def test_clash_rolls_back_every_registration_of_the_losing_plugin(site: FakeSite) -> None:
    source = """
        from sagellm_core.hookspecs import hookimpl

        @hookimpl
        def sagellm_register_schedulers(register):
            register("{name}_own", lambda config, options=None: None)
            register("shared", lambda config, options=None: None)
        """
    site.install("sagellm-clash2", {"one": source, "two": source})
    manager = create_plugin_manager()
    owner = manager.registry.get("scheduler", "shared").plugin
    loser = ({"one", "two"} - {owner}).pop()
    assert f"{owner}_own" in manager.registry.names("scheduler")
    assert f"{loser}_own" not in manager.registry.names("scheduler")
    assert manager.records[loser].status == "failed"


def test_options_class_must_be_an_attrs_class(site: FakeSite) -> None:
    site.install("sagellm-badopts", {"badopts": """
        from sagellm_core.hookspecs import hookimpl

        @hookimpl
        def sagellm_register_metrics(register):
            register("m", lambda config, options: None, options=dict)
        """})
    manager = create_plugin_manager()
    manager.registry
    assert manager.records["badopts"].status == "failed"
    assert "metric 'm' options must be an attrs class" in manager.records["badopts"].error
