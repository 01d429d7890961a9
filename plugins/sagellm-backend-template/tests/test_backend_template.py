"""Tests of the template backend: the contract is complete, options are validated with their path,
and selecting it by name runs a model through its attention op with the CPU backend's tokens."""

from __future__ import annotations

import pytest

import sagellm_backend_template as template
from sagellm_core.backend import Backend
from sagellm_core.backend_selection import create_backend, select_backend
from sagellm_core.config import BackendConfig
from sagellm_core.errors import ConfigError
from sagellm_core.plugin_manager import create_plugin_manager


def test_the_contract_is_complete_and_options_apply() -> None:
    backend = template.SPEC.create(BackendConfig(), template.TemplateOptions(memory_bytes=1 << 30))
    assert isinstance(backend, Backend)
    assert backend.memory_info() == (1 << 30, 1 << 30)
    assert str(backend.device()) == "cpu" and backend.describe()["attention"] == "cpu"
    op = backend.attention_op()
    assert isinstance(op, template.CountingOp) and backend.attention_calls == 0


def test_selected_by_name_never_by_auto() -> None:
    manager = create_plugin_manager(entry_points=False, extra={"backend_template": template})
    assert select_backend(manager, None).spec.name == "cpu"  # priority -10 < 0
    choice = select_backend(manager, "template")
    backend = create_backend(choice.spec, BackendConfig(name="template", options={"attention": "reference"}))
    assert isinstance(backend, template.TemplateBackend) and backend.settings.attention == "reference"


@pytest.mark.parametrize(("options", "error"), [
    ({"attention": "fast"}, r"^backend\.options\.attention: must be one of cpu, reference; got 'fast'$"),
    ({"memory_bytes": 5}, r"^backend\.options\.memory_bytes: must be >= 1048576, got 5$"),
    ({"colour": 1}, r"^backend\.options\.colour: unknown key$"),
])
def test_bad_options_name_their_path(options: dict[str, object], error: str) -> None:
    with pytest.raises(ConfigError, match=error):
        create_backend(template.SPEC, BackendConfig(name="template", options=options))
