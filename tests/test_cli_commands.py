"""The ``sagellm_register_commands`` hook: a plugin adds a ``sagellm`` sub-command; bad registrations fail
the plugin, clashes with built-ins are ignored, a missing first-party command says how to install it."""

from __future__ import annotations

import argparse
from typing import Any

import pytest

from sagellm_core.cli import main, plugin_commands
from sagellm_core.errors import SageLLMError
from sagellm_core.hookspecs import hookimpl
from sagellm_core.plugin_manager import create_plugin_manager


class HelloPlugin:
    """Adds ``sagellm hello --name N`` and tries to take the built-in ``serve``."""

    @hookimpl
    def sagellm_register_commands(self, register: Any) -> None:
        register("hello", self.add_arguments, self.run, help="say hello")
        register("serve", lambda parser: None, lambda args: 99)

    @staticmethod
    def add_arguments(parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--name", required=True)
        parser.add_argument("--fail", action="store_true")

    @staticmethod
    def run(args: argparse.Namespace) -> int:
        if args.fail:
            raise SageLLMError(f"no hello for {args.name}")
        print(f"hello {args.name} ({' '.join(args.argv)})")
        return 3


@pytest.fixture
def hello_commands(monkeypatch: pytest.MonkeyPatch) -> None:
    manager = create_plugin_manager(entry_points=False, extra={"hello": HelloPlugin()})
    specs = [r.command for r in manager.registry.all("command")]
    monkeypatch.setattr(plugin_commands, "registered_commands", lambda: specs)


def test_a_plugin_command_runs_through_the_cli(hello_commands: None, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["hello", "--name", "ada"]) == 3
    captured = capsys.readouterr()
    assert "hello ada (hello --name ada)" in captured.out
    assert "command 'serve' clashes with a built-in command; ignored" in captured.err
    assert main(["hello", "--name", "bob", "--fail"]) == 2
    assert "error: no hello for bob" in capsys.readouterr().err


def test_a_clashing_name_leaves_the_built_in_command_in_place(hello_commands: None) -> None:
    from sagellm_core.cli import build_parser, serve_cmd

    assert build_parser().parse_args(["serve"]).func is serve_cmd.run


@pytest.mark.parametrize("registration, message", [
    ('register("Bad Name", lambda p: None, lambda a: 0)', "lower-case letters, digits and dashes"),
    ('register("ok", lambda p: None, "not callable")', "command run must be callable"),
])
def test_a_bad_registration_fails_its_plugin(registration: str, message: str) -> None:
    namespace: dict[str, Any] = {"hookimpl": hookimpl}
    exec(f"@hookimpl\ndef sagellm_register_commands(register):\n    {registration}\n", namespace)
    plugin = type("Plugin", (), {"sagellm_register_commands": staticmethod(namespace["sagellm_register_commands"])})
    manager = create_plugin_manager(entry_points=False, extra={"broken": plugin})
    assert manager.registry.names("command") == []
    record = manager.records["broken"]
    assert record.status == "failed" and message in record.error


def test_a_command_whose_options_raise_is_left_out(monkeypatch: pytest.MonkeyPatch,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    from sagellm_core.commands import CommandSpec

    def broken(parser: argparse.ArgumentParser) -> None:
        raise RuntimeError("boom")

    monkeypatch.setattr(plugin_commands, "registered_commands",
                        lambda: [CommandSpec("broken", broken, lambda args: 0)])
    with pytest.raises(SystemExit):
        main(["broken"])
    assert "could not declare its options (RuntimeError: boom); ignored" in capsys.readouterr().err


def test_a_missing_first_party_command_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(plugin_commands, "registered_commands", lambda: [])
    assert main(["bench", "throughput", "--num-requests", "4"]) == 2
    error = capsys.readouterr().err
    assert "`sagellm bench` comes from the plugin distribution sagellm-bench" in error
    assert "pip install -e plugins/sagellm-bench" in error
