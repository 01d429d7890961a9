"""The plugin templates under plugins/, one per family, used as a plugin author would: pip-installed
(into a directory of their own on sys.path, so this environment is left untouched), selected by name
with options from YAML and from the command line, changing what the engine does; a bad option names
its config path and an unknown name is refused before any model loads.

The scheduler template (sagellm-sched-spf) is installed by scripts/setup.sh; the KV-policy, metric
and backend templates are installed here.
"""

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
from sagellm_core.cli import build_parser, main
from sagellm_core.cli.common import engine_config as cli_engine_config
from sagellm_core.config import EngineConfig
from sagellm_core.sampling_params import SamplingParams

REPO = Path(__file__).resolve().parents[1]
TEMPLATES = ("sagellm-kv-mru", "sagellm-metric-jsonl", "sagellm-backend-template")
ENV_KNOBS = ("SAGELLM_PLUGINS", "SAGELLM_BLOCK_PLUGINS", "SAGELLM_BACKEND")


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The three templates pip-installed (built from copies of their sources) into one directory,
    which this process and its subprocesses put on their path."""
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("building the templates offline (--no-build-isolation) needs setuptools")
    sources = tmp_path_factory.mktemp("template-sources")
    target = tmp_path_factory.mktemp("template-site")
    copies = [shutil.copytree(REPO / "plugins" / name, sources / name) for name in TEMPLATES]
    result = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation",
                             "--no-index", "--disable-pip-version-check", "--target", str(target), *map(str, copies)],
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    try:
        yield target
    finally:
        sys.path.remove(str(target))
        for module in ("sagellm_kv_mru", "sagellm_metric_jsonl", "sagellm_backend_template"):
            sys.modules.pop(module, None)
        importlib.invalidate_caches()


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV_KNOBS:
        monkeypatch.delenv(name, raising=False)


def from_yaml(model: Path, text: str) -> EngineConfig:
    """The test engine's settings (tiny model, CPU, small pool) with a user's YAML on top."""
    user = EngineConfig.from_yaml(text).to_dict()
    base = engine_config(model).to_dict()
    for section, values in user.items():
        if values != EngineConfig().to_dict()[section]:
            base[section] = {**base[section], **{k: v for k, v in values.items()
                                                 if v != EngineConfig().to_dict()[section][k]}}
    return EngineConfig.from_dict(base)


def from_cli(model: Path, *flags: str) -> EngineConfig:
    """What ``sagellm generate ... FLAGS`` builds (the real parser and config merge)."""
    args = build_parser().parse_args(["generate", "hi", "--model", str(model), "--backend", "cpu", "--dtype",
                                      "float32", "--num-kv-blocks", "256", *flags])
    config = cli_engine_config(args)
    return config.evolve(kv_cache={"block_size": 4})


def sagellm(site: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ENV_KNOBS}
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "sagellm_core", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)


def run_one(engine: Any, prompt: list[int], rid: str) -> Any:
    engine.add_request(prompt, SamplingParams(max_tokens=3, ignore_eos=True), request_id=rid)
    final = None
    while engine.has_unfinished():
        for output in engine.step():
            if output.finished:
                final = output
    return final


def test_templates_are_installed_and_listed(site: Path) -> None:
    result = sagellm(site, "plugins", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    status = {p["name"]: (p["status"], p["distribution"]) for p in report["plugins"]}
    assert status["kv_mru"] == ("loaded", "sagellm-kv-mru")
    assert status["metric_jsonl"] == ("loaded", "sagellm-metric-jsonl")
    assert status["backend_template"] == ("loaded", "sagellm-backend-template")
    assert "mru" in {r["name"] for r in report["registered"]["kv_policy"]}
    assert "jsonl" in {r["name"] for r in report["registered"]["metric"]}
    assert {b["name"]: b["available"] for b in report["backends"]}["template"] is True
    assert report["selected"]["name"] != "template"  # priority -10: never chosen by auto


# ---- KV policy: reuse only for prompts longer than N ------------------------------------------------
SHARED = list(range(10, 22))  # three full blocks of 4


def cached_tokens_of_second(config: EngineConfig) -> int:
    from sagellm_core.engine import LLMEngine

    engine = LLMEngine(config)
    assert type(engine.kv_pools[0].policy).__name__ == "MRUPolicy"
    run_one(engine, SHARED + [1, 2, 3], "first")
    return int(run_one(engine, SHARED + [4, 5, 6], "second").metrics.num_cached_tokens)


def test_kv_template_from_yaml_and_cli(site: Path, tiny_models: dict[str, Path]) -> None:
    model = tiny_models["llama"]
    yaml_text = "kv_cache:\n  policy: mru\n  policy_options: {{min_prompt_tokens: {}}}\n"
    assert cached_tokens_of_second(from_yaml(model, yaml_text.format(0))) == 12
    assert cached_tokens_of_second(from_yaml(model, yaml_text.format(100))) == 0  # 15-token prompts: too short
    assert cached_tokens_of_second(from_cli(model, "--kv-policy", "mru")) == 12
    assert cached_tokens_of_second(from_cli(model, "--kv-policy", "mru", "--kv-policy-option",
                                            "min_prompt_tokens=100")) == 0


# ---- scheduler: shortest prompt first -----------------------------------------------------------------
def finish_order(config: EngineConfig) -> list[str]:
    from sagellm_core.engine import LLMEngine

    engine = LLMEngine(config)
    for rid, length in (("long", 9), ("short", 3), ("mid", 6)):
        engine.add_request(list(range(1, length + 1)), SamplingParams(max_tokens=2, ignore_eos=True), request_id=rid)
    order: list[str] = []
    while engine.has_unfinished():
        order += [o.request_id for o in engine.step() if o.finished]
    return order


def test_scheduler_template_from_yaml_and_cli(tiny_models: dict[str, Path]) -> None:
    try:
        metadata.distribution("sagellm-sched-spf")
    except metadata.PackageNotFoundError:
        pytest.skip("sagellm-sched-spf is installed by scripts/setup.sh")
    model = tiny_models["llama"]
    assert finish_order(engine_config(model, scheduler={"max_num_seqs": 1})) == ["long", "short", "mid"]
    spf = "scheduler:\n  name: spf\n  max_num_seqs: 1\n  options: {aging_tokens_per_second: 0.0}\n"
    assert finish_order(from_yaml(model, spf)) == ["short", "mid", "long"]
    cli = from_cli(model, "--scheduler", "spf", "--scheduler-option", "aging_tokens_per_second=0")
    assert cli.scheduler.options == {"aging_tokens_per_second": 0}
    assert finish_order(cli.evolve(scheduler={"max_num_seqs": 1})) == ["short", "mid", "long"]


# ---- metric sink: one JSON line per finished request ------------------------------------------------------
def test_metric_template_from_yaml_and_cli(site: Path, tiny_models: dict[str, Path], tmp_path: Path) -> None:
    from sagellm_core.engine import LLMEngine

    model = tiny_models["llama"]
    yaml_path, cli_path = tmp_path / "yaml.jsonl", tmp_path / "cli.jsonl"
    configs = [
        from_yaml(model, f"metrics:\n  extra: [jsonl]\n  options: {{jsonl: {{path: '{yaml_path}'}}}}\n"),
        from_cli(model, "--metric", "jsonl", "--metric-option", f"jsonl.path={cli_path}",
                 "--metric-option", "jsonl.include_token_times=true"),
    ]
    for config, path in zip(configs, (yaml_path, cli_path)):
        engine = LLMEngine(config)
        run_one(engine, [1, 2, 3], "a")
        run_one(engine, [4, 5], "b")
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        assert [(line["request_id"], line["num_output_tokens"]) for line in lines] == [("a", 3), ("b", 3)]
        assert engine.get_stats()["jsonl"]["lines"] == 2
        assert "latency" in engine.get_stats()  # extra extends the default sinks
    assert len(json.loads(cli_path.read_text().splitlines()[0])["token_times"]) == 3


# ---- backend: the host CPU under another name ----------------------------------------------------------------
def test_backend_template_from_yaml_and_cli(site: Path, tiny_models: dict[str, Path]) -> None:
    from sagellm_core.engine import LLMEngine

    model = tiny_models["llama"]
    prompt = [5, 9, 2, 7, 1]
    cpu_tokens = run_one(LLMEngine(engine_config(model)), prompt, "r").outputs[0].token_ids
    configs = [from_yaml(model, "backend:\n  name: template\n  options: {attention: reference}\n"),
               from_cli(model, "--backend", "template", "--backend-option", "attention=reference")]
    for config in configs:
        engine = LLMEngine(config)
        assert engine.backend.name == "template" and engine.backend.describe()["attention"] == "reference"
        assert run_one(engine, prompt, "r").outputs[0].token_ids == cpu_tokens
        assert engine.backend.describe()["attention_calls"] > 0  # its op served the model


# ---- errors before any model loads -------------------------------------------------------------------------
MISSING_MODEL = "/nonexistent/model-dir"  # loading it would fail: these errors must come first


@pytest.mark.parametrize(("flags", "error"), [
    (("--kv-policy", "mru", "--kv-policy-option", "min_prompt_tokens=-1"),
     "kv_cache.policy_options.min_prompt_tokens: must be >= 0, got -1"),
    (("--scheduler", "spf", "--scheduler-option", "aging_tokens_per_second=fast"),
     "scheduler.options.aging_tokens_per_second: expected float, got str 'fast'"),
    (("--metric", "jsonl", "--metric-option", "jsonl.colour=red"), "metrics.options.jsonl.colour: unknown key"),
    (("--backend", "template", "--backend-option", "attention=gpu"),
     "backend.options.attention: must be one of cpu, reference; got 'gpu'"),
])
def test_bad_option_names_its_path_before_the_model_loads(site: Path, flags: tuple[str, ...], error: str,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    if "spf" in flags and importlib.util.find_spec("sagellm_sched_spf") is None:
        pytest.skip("sagellm-sched-spf is installed by scripts/setup.sh")
    assert main(["generate", "hi", "--model", MISSING_MODEL, *flags]) == 2
    errors = capsys.readouterr().err
    assert error in errors and "nonexistent" not in errors


def test_unknown_names_are_listed_with_the_registered_ones_before_the_model_loads(
        site: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["generate", "hi", "--model", MISSING_MODEL, "--scheduler", "nope1", "--kv-policy", "nope2",
                 "--metric", "nope3", "--backend", "nope4"]) == 2
    errors = capsys.readouterr().err
    assert "scheduler.name: unknown scheduler 'nope1'; registered: " in errors and "fcfs" in errors
    assert "kv_cache.policy: unknown kv_policy 'nope2'; registered: arc, lfu, mru, no_reuse, prefix_lru, s3fifo" in errors
    assert "metrics.extra[0]: unknown metric 'nope3'; registered: jsonl, kv, latency" in errors
    assert "backend.name: unknown backend 'nope4'; registered: " in errors and "template" in errors
    assert "nonexistent" not in errors
