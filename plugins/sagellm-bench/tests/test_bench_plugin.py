"""The sagellm-bench plugin's contracts with the core: ``sagellm bench`` comes from its command hook, the
core runs without matplotlib and httpx, `get_stats()` and the bench share one latency definition, and
``sagellm bench serve --launch`` forwards every engine option to the server it starts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sagellm_bench import cli
from sagellm_bench.offline import timing_from_output
from sagellm_bench.stats import RequestTiming, latency_summary
from sagellm_core.builtin.metrics import LatencySink
from sagellm_core.cli import build_parser, main
from sagellm_core.cli.serve_cmd import serve_config, serve_topology
from sagellm_core.config import EngineConfig, MetricsConfig
from sagellm_core.metrics.base import RequestEvent
from sagellm_core.plugin_manager import create_plugin_manager

ENGINE_ARGS = ["--backend", "cpu", "--dtype", "float32", "--num-kv-blocks", "256"]


# ---- the command hook -----------------------------------------------------------------------------
def test_command_hook_registers_bench_from_the_installed_plugin() -> None:
    manager = create_plugin_manager()
    record = manager.records["bench"]
    assert (record.status, record.distribution, record.hooks) == ("loaded", "sagellm-bench",
                                                                  ["sagellm_register_commands"])
    registration = manager.registry.get("command", "bench")
    assert registration.plugin == "bench" and registration.command is not None and registration.command.run is cli.run
    args = build_parser().parse_args(["bench", "pd", "--modes", "hybrid", "--max-num-seqs", "4"])
    assert args.func is cli.run and args.bench_run is cli._run_pd and args.max_num_seqs == 4


def test_without_the_plugin_sagellm_bench_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("SAGELLM_BLOCK_PLUGINS", "bench")
    assert main(["bench", "throughput", "--num-requests", "2"]) == 2
    error = capsys.readouterr().err
    assert "sagellm-bench, which is not installed" in error and "pip install -e plugins/sagellm-bench" in error


# ---- the core without the harness's dependencies --------------------------------------------------
BLOCK_IMPORTS = """
import sys

class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in {"matplotlib", "httpx"}:
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by the test)", name=name)
        return None

sys.meta_path.insert(0, Blocker())
"""

CORE_RUN = """
import contextlib, io
import sagellm_core, sagellm_core.server
from sagellm_core.cli import main
from sagellm_core.config import EngineConfig
from sagellm_core.llm import LLM
from sagellm_core.sampling_params import SamplingParams

text = io.StringIO()
with contextlib.redirect_stdout(text), contextlib.suppress(SystemExit):
    main(["--help"])
assert "generate" in text.getvalue() and "serve" in text.getvalue(), text.getvalue()
config = EngineConfig.from_dict({"model": {"path": sys.argv[1], "dtype": "float32"}, "backend": {"name": "cpu"},
                                 "kv_cache": {"num_blocks": 64}})
with LLM(config=config) as llm:
    out = llm.generate([[1, 2, 3, 4]], SamplingParams(max_tokens=3, ignore_eos=True), use_tqdm=False)
assert len(out[0].outputs[0].token_ids) == 3
leaked = sorted(m for m in sys.modules if m.partition(".")[0] in {"matplotlib", "httpx"})
assert not leaked, leaked
print("core ok")
"""


def test_core_imports_and_runs_without_matplotlib_and_httpx(tiny_llama: Path) -> None:
    done = subprocess.run([sys.executable, "-c", BLOCK_IMPORTS + CORE_RUN, str(tiny_llama)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0 and "core ok" in done.stdout, done.stderr[-3000:]


def test_the_blocker_really_blocks() -> None:
    done = subprocess.run([sys.executable, "-c", BLOCK_IMPORTS + "import matplotlib"], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode != 0 and "blocked by the test" in done.stderr


# ---- one latency definition -----------------------------------------------------------------------
def _event(index: int, arrival: float, token_times: tuple[float, ...]) -> RequestEvent:
    return RequestEvent(request_id=str(index), arrival_time=arrival, first_token_time=token_times[0],
                        finished_time=token_times[-1], token_times=token_times, num_prompt_tokens=4,
                        num_output_tokens=len(token_times), num_cached_tokens=0, finish_reason="length")


def test_latency_sink_and_bench_give_the_same_percentiles_for_the_same_timestamps() -> None:
    events = [_event(i, 10.0 * i, tuple(10.0 * i + 0.01 * (i + 1) + 0.002 * (i + 1) * k for k in range(4)))
              for i in range(10)]
    sink = LatencySink(MetricsConfig(percentiles=[50.0, 99.0]))
    for event in events:
        sink.on_request_finished(event)
    engine = sink.snapshot()
    bench = latency_summary([RequestTiming(e.arrival_time, e.first_token_time, e.finished_time, 4,
                                           e.num_output_tokens, e.token_times) for e in events])
    for metric in ("ttft", "tpot", "itl", "e2e"):
        assert bench[f"{metric}_ms"]["p99"] == engine[metric]["p99"] * 1000.0, metric
        assert bench[f"{metric}_ms"]["median"] == engine[metric]["p50"] * 1000.0, metric
    # linear interpolation between the 9th and 10th of the TTFTs 0.01 .. 0.10, not the nearest rank (0.10)
    assert engine["ttft"]["p99"] == pytest.approx(0.0991)


def test_get_stats_and_the_bench_agree_on_one_engine_run(tiny_llama: Path) -> None:
    from sagellm_core.llm import LLM
    from sagellm_core.sampling_params import SamplingParams

    config = EngineConfig.from_dict({"model": {"path": str(tiny_llama), "dtype": "float32"},
                                     "backend": {"name": "cpu"}, "kv_cache": {"num_blocks": 64},
                                     "scheduler": {"max_num_seqs": 3}})
    prompts = [[(7 * i + j) % 500 for j in range(4 + i)] for i in range(7)]
    with LLM(config=config) as llm:
        outputs = llm.generate(prompts, [SamplingParams(max_tokens=2 + i % 3, ignore_eos=True) for i in range(7)],
                               use_tqdm=False)
        stats = llm.get_stats()["latency"]
    bench = latency_summary([timing_from_output(output) for output in outputs])
    for metric in ("ttft", "tpot", "e2e"):
        assert bench[f"{metric}_ms"]["p99"] == stats[metric]["p99"] * 1000.0, metric


# ---- sagellm bench serve --launch -----------------------------------------------------------------
def test_launch_forwards_every_engine_option_to_the_server(tmp_path: Path) -> None:
    config_file = tmp_path / "engine.yaml"
    config_file.write_text("kv_cache:\n  block_size: 32\nscheduler:\n  max_waiting: 7\n", encoding="utf-8")
    args = build_parser().parse_args([
        "bench", "serve", "--launch", "--model-shape", "qwen3-0.6b", "--config", str(config_file),
        "--max-num-seqs", "512", "--max-num-batched-tokens", "16384", "--dtype", "bfloat16",
        "--kv-policy", "no_reuse", "--request-rate", "16", "--set", "scheduler.async_scheduling=off",
        "--api-server-count", "2", "--data-parallel-size", "2"])
    with cli.bench_config(args) as config:
        argv = cli.serve_argv(args, config)
        pairs = dict(zip(argv[::2], argv[1::2]))
        assert pairs == {"--model": config.model.path, "--config": str(config_file), "--dtype": "bfloat16",
                         "--kv-policy": "no_reuse", "--max-num-seqs": "512", "--max-num-batched-tokens": "16384",
                         "--load-format": "dummy", "--set": "scheduler.async_scheduling=off",
                         "--api-server-count": "2", "--data-parallel-size": "2"}
        served_args = build_parser().parse_args(["serve", *argv])
        served = serve_config(served_args).to_dict()
    assert serve_topology(served_args, serve_config(served_args)).describe() == {
        "engine_process": True, "api_server_count": 2, "api_server_count_source": "option", "data_parallel_size": 2}
    assert served["scheduler"]["async_scheduling"] == "off"
    assert served["scheduler"]["max_num_seqs"] == 512 and served["scheduler"]["max_num_batched_tokens"] == 16384
    assert served["scheduler"]["max_waiting"] == 7 and served["kv_cache"]["block_size"] == 32  # from --config
    assert served["kv_cache"]["policy"] == "no_reuse" and served["model"]["load_format"] == "dummy"
    assert served["model"]["dtype"] == "bfloat16"


def test_serve_launch_compare_offline_end_to_end(tiny_llama: Path, tmp_path: Path) -> None:
    """A real `sagellm serve` subprocess with forwarded budgets, then the offline engine on the same requests."""
    argv = ["bench", "serve", "--launch", "--compare", "offline", "--model", str(tiny_llama), *ENGINE_ARGS,
            "--max-num-seqs", "2", "--num-requests", "3", "--min-input-len", "4", "--max-input-len", "8",
            "--min-output-len", "2", "--max-output-len", "3", "--output-dir", str(tmp_path)]
    assert main(argv) == 0
    data = json.loads((tmp_path / "serve.json").read_text())
    result = data["results"]["inf"]
    assert result["completed"] == 3 and result["offline"]["completed"] == 3
    assert result["output_tokens"] == result["offline"]["output_tokens"]  # the same requests
    assert result["server_over_offline"]["output_tokens_per_s"] > 0
    assert data["setup"]["server_config"]["scheduler"]["max_num_seqs"] == 2
    assert "--max-num-seqs 2" in data["setup"]["server_command"]
    report = (tmp_path / "serve.md").read_text()
    assert "| scheduler.max_num_seqs | 2 |" in report and "server / offline engine =" in report
