"""``sagellm plugins``: a test plugin distribution is pip-installed for real, listed, then uninstalled;
the vendor backend distributions show up with their probe results; text rendering of every status."""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator

import pytest

from conftest import engine_config  # tests/conftest.py (imported at collection, before plugins/)
from sagellm_core.cli import main, plugins_cmd
from sagellm_core.hookspecs import hookimpl
from sagellm_core.plugin_manager import create_plugin_manager

REPO = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).resolve().parent / "fixtures" / "sagellm_testplugin"
TEST_DIST = "sagellm-testplugin"
VENDOR_DISTS = {"cuda": "sagellm-cuda", "ascend": "sagellm-ascend", "cambricon": "sagellm-cambricon",
                "hygon": "sagellm-hygon"}
PRIORITY = {"cuda": 100, "ascend": 90, "cambricon": 80, "hygon": 70, "cpu": 0}
ENV_KNOBS = ("SAGELLM_PLUGINS", "SAGELLM_BLOCK_PLUGINS", "SAGELLM_BACKEND")


def sagellm_json(**env: str) -> dict[str, Any]:
    """Run ``python -m sagellm_core plugins --json`` from the repository root, as a user would."""
    full_env = {k: v for k, v in os.environ.items() if k not in ENV_KNOBS} | env
    result = subprocess.run([sys.executable, "-m", "sagellm_core", "plugins", "--json"], cwd=REPO, env=full_env,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def pip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pip", *args, "--disable-pip-version-check"],
                          capture_output=True, text=True, timeout=300)


class Installation:
    """The test plugin, installed with pip into the running interpreter's environment."""

    def __init__(self, source: Path) -> None:
        self.source = source
        self.installed = False

    def install(self) -> None:
        if not self.installed:
            result = pip("install", "--no-deps", "--no-build-isolation", "--no-index", str(self.source))
            assert result.returncode == 0, result.stdout + result.stderr
            importlib.invalidate_caches()  # this process imports the new module and reads its metadata
            self.installed = True

    def uninstall(self) -> None:
        result = pip("uninstall", "-y", TEST_DIST)
        assert result.returncode == 0, result.stdout + result.stderr
        importlib.invalidate_caches()
        self.installed = False


@pytest.fixture(scope="module")
def test_plugin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Installation]:
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("building the fixture offline (--no-build-isolation) needs setuptools in this environment")
    source = tmp_path_factory.mktemp("fixture") / FIXTURE.name
    shutil.copytree(FIXTURE, source)  # the build writes build/ and *.egg-info next to the sources
    pip("uninstall", "-y", TEST_DIST)  # leftover of an interrupted earlier run
    installation = Installation(source)
    try:
        installation.install()
        yield installation
    finally:
        pip("uninstall", "-y", TEST_DIST)


def by_name(items: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in items}


# ---- a real pip install ---------------------------------------------------------------------------
def test_installed_plugin_is_listed_with_its_hooks(test_plugin: Installation) -> None:
    test_plugin.install()
    report = sagellm_json()
    record = by_name(report["plugins"])["testplugin"]
    assert record == {"name": "testplugin", "distribution": TEST_DIST, "version": "0.0.1", "status": "loaded",
                      "error": "", "hooks": ["sagellm_register_schedulers"], "builtin": False}
    assert {"name": "test_lifo", "plugin": "testplugin"} in report["registered"]["scheduler"]


def test_installed_plugin_obeys_allow_and_block_lists(test_plugin: Installation) -> None:
    test_plugin.install()
    not_allowed = by_name(sagellm_json(SAGELLM_PLUGINS="cuda")["plugins"])["testplugin"]
    assert (not_allowed["status"], not_allowed["error"]) == ("not allowed", "not in SAGELLM_PLUGINS")
    blocked = sagellm_json(SAGELLM_BLOCK_PLUGINS="testplugin")
    assert by_name(blocked["plugins"])["testplugin"]["status"] == "blocked"
    assert "test_lifo" not in {s["name"] for s in blocked["registered"]["scheduler"]}


def test_lifo_factory_builds_a_policy_scheduler(test_plugin: Installation) -> None:
    test_plugin.install()
    from sagellm_core.config import SchedulerConfig
    from sagellm_core.schedulers.base import PolicyScheduler

    manager = create_plugin_manager()
    assert "test_lifo" in manager.registry.names("scheduler"), manager.records
    registration = manager.registry.get("scheduler", "test_lifo")
    scheduler = registration.factory(SchedulerConfig(), None)
    assert isinstance(scheduler, PolicyScheduler)


def test_installed_scheduler_chosen_by_name_changes_the_run_order(test_plugin: Installation,
                                                                  tiny_models: dict[str, Path]) -> None:
    """The pip-installed ``test_lifo`` scheduler, selected in config, admits the newest request first."""
    from sagellm_core.engine import LLMEngine
    from sagellm_core.sampling_params import SamplingParams

    test_plugin.install()

    def finish_order(scheduler: str) -> list[str]:
        engine = LLMEngine(engine_config(tiny_models["llama"], scheduler={"name": scheduler, "max_num_seqs": 1}))
        for rid in ("first", "second", "third"):
            engine.add_request([1, 2, 3], SamplingParams(max_tokens=2, ignore_eos=True), request_id=rid)
        order: list[str] = []
        while engine.has_unfinished():
            order += [o.request_id for o in engine.step() if o.finished]
        return order

    assert finish_order("fcfs") == ["first", "second", "third"]
    assert finish_order("test_lifo") == ["third", "second", "first"]


def test_uninstalled_plugin_is_gone(test_plugin: Installation) -> None:
    test_plugin.install()
    test_plugin.uninstall()
    report = sagellm_json()
    assert "testplugin" not in by_name(report["plugins"])
    assert "test_lifo" not in {s["name"] for s in report["registered"]["scheduler"]}


# ---- vendor backends ------------------------------------------------------------------------------
def test_vendor_backends_are_listed_with_probe_results() -> None:
    missing = [dist for dist in VENDOR_DISTS.values() if not _installed(dist)]
    assert not missing, f"install them first: pip install -e {' -e '.join(d.replace('-', '_') for d in missing)}"
    report = sagellm_json()
    plugins = by_name(report["plugins"])
    for name, dist in VENDOR_DISTS.items():
        assert (plugins[name]["status"], plugins[name]["distribution"], plugins[name]["hooks"]) == \
            ("loaded", dist, ["sagellm_register_backends"])
    backends = report["backends"]
    assert [b["name"] for b in backends] == ["cuda", "ascend", "cambricon", "hygon", "cpu"]
    for backend in backends:
        assert backend["priority"] == PRIORITY[backend["name"]]
        assert isinstance(backend["available"], bool) and backend["detail"]
    assert by_name(backends)["cpu"]["available"] is True
    first_available = next(b["name"] for b in backends if b["available"])
    assert report["selected"] == {"name": first_available,
                                  "reason": f"highest priority available (priority {PRIORITY[first_available]})"}
    assert report["selection_error"] is None


def _installed(dist: str) -> bool:
    try:
        metadata.distribution(dist)
    except metadata.PackageNotFoundError:
        return False
    return True


# ---- text output (in-process) ---------------------------------------------------------------------
class BrokenScheduler:
    @hookimpl
    def sagellm_register_schedulers(self, register: Any) -> None:
        raise RuntimeError("kernel missing")


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for name in ENV_KNOBS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_text_report_shows_every_status_and_the_choice(clean_env: pytest.MonkeyPatch,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    clean_env.setenv("SAGELLM_BLOCK_PLUGINS", "builtin_metrics")
    clean_env.setattr(plugins_cmd, "create_plugin_manager",
                      lambda: create_plugin_manager(entry_points=False, extra={"broken": BrokenScheduler()}))
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0] == "Plugins (sageLLM plugin API 1.0)"
    assert lines[1].split() == ["NAME", "DISTRIBUTION", "VERSION", "STATUS", "HOOKS"]
    assert "cpu sagellm 0.1.0 loaded backends" in [" ".join(line.split()) for line in lines]
    assert "      failed: sagellm_register_schedulers raised RuntimeError: kernel missing" in lines
    assert "      blocked: blocked by SAGELLM_BLOCK_PLUGINS" in lines
    assert lines[-1] == "Selected backend: cpu - highest priority available (priority 0)"
    assert any(line.split()[:3] == ["cpu", "0", "yes"] for line in lines)


def test_no_selectable_backend_is_said(clean_env: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    clean_env.setenv("SAGELLM_PLUGINS", "")
    clean_env.setenv("SAGELLM_BLOCK_PLUGINS", "cpu")
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "  (no backends registered)" in out
    assert ("No backend can be selected: no backend found a device. Probed:\n"
            "  (no backends registered)\n  plugin cpu: blocked") in out


def test_explicit_backend_reason_names_its_source(clean_env: pytest.MonkeyPatch,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    clean_env.setenv("SAGELLM_PLUGINS", "")
    assert main(["plugins", "--json", "--backend", "cpu"]) == 0
    selected = json.loads(capsys.readouterr().out)["selected"]
    assert selected == {"name": "cpu", "reason": "chosen explicitly via --backend"}
    clean_env.setenv("SAGELLM_BACKEND", "cpu")
    assert main(["plugins", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["selected"]["reason"] == "chosen explicitly via SAGELLM_BACKEND"
    assert main(["plugins", "--json", "--backend", "cuda"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["selected"] is None
    assert report["selection_error"].startswith("backend 'cuda' is not installed or failed to load")


def test_format_table_aligns_columns() -> None:
    assert plugins_cmd.format_table(("A", "LONG"), [("xyz", 1), ("q", 22)], indent="") == \
        ["A    LONG", "xyz  1", "q    22"]


# ---- plugin options on the command line ------------------------------------------------------------
def test_plugin_option_flags_merge_over_file_and_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from sagellm_core.cli import build_parser
    from sagellm_core.cli.common import engine_config as cli_engine_config

    path = tmp_path / "c.yaml"
    path.write_text("scheduler: {name: pd, options: {mode: hybrid, max_decode_steps: 3}}\n"
                    "metrics: {options: {latency: {window: 10}}}\n")
    monkeypatch.setenv("SAGELLM_SCHEDULER__MAX_NUM_SEQS", "7")
    args = build_parser().parse_args([
        "generate", "hi", "--config", str(path), "--scheduler-option", "max_decode_steps=5",
        "--kv-policy-option", "a=1.5", "--metric-option", "latency.window=20", "--metric-option", "jsonl.path=x y",
        "--backend-option", "flag=true", "--metric", "jsonl",
    ])
    config = cli_engine_config(args)
    assert config.scheduler.max_num_seqs == 7
    assert config.scheduler.options == {"mode": "hybrid", "max_decode_steps": 5}
    assert config.kv_cache.policy_options == {"a": 1.5}
    assert config.metrics.options == {"latency": {"window": 20}, "jsonl": {"path": "x y"}}
    assert config.backend.options == {"flag": True} and config.metrics.extra == ["jsonl"]


@pytest.mark.parametrize(("flag", "value", "error"), [
    ("--scheduler-option", "aging", "--scheduler-option 'aging': expected KEY=VALUE"),
    ("--metric-option", "window=3", "--metric-option 'window=3': expected SINK.KEY=VALUE"),
    ("--kv-policy-option", "=3", "--kv-policy-option '=3': expected KEY=VALUE"),
    ("--scheduler-option", "mode=[x", "--scheduler-option 'mode=[x': VALUE is not valid YAML"),
])
def test_malformed_plugin_options_are_named(flag: str, value: str, error: str,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "hi", flag, value]) == 2
    assert error in capsys.readouterr().err


def test_bad_plugin_option_value_names_its_path_before_the_model_loads(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "hi", "--model", "/nonexistent/model", "--scheduler", "pd",
                 "--scheduler-option", "mode=sideways", "--metric-option", "latency.window=0"]) == 2
    errors = capsys.readouterr().err
    assert "scheduler.options.mode: must be one of" in errors
    assert "metrics.options.latency.window: must be >= 1, got 0" in errors
    assert "nonexistent" not in errors
