"""The README's Python examples run as written (with the embedded default model)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def python_examples() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


def test_the_readme_has_examples() -> None:
    assert python_examples()


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(python_examples())))
def test_readme_example_runs(index: int, default_model_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    exec(compile(python_examples()[index], f"README.md example {index}", "exec"), {"__name__": "readme_example"})
    assert capsys.readouterr().out.strip()  # each example prints what it generated
