"""The engine core in processes of its own: killing the engine process fails open streams at once and
turns ``/health`` to 503; structured outputs and tools cross the process boundary; two data-parallel
replicas behind one front end route a shared prefix to one replica; ``sagellm serve
--api-server-count 2`` runs two front ends on one port that report the same engine metrics."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Iterator

import httpx
import pytest
from server_utils import ServerThread, free_port, save_tiny_llama, wait_until

from sagellm_core.config import EngineConfig
from sagellm_core.errors import InvalidRequestError
from sagellm_core.sampling_params import SamplingParams
from sagellm_core.server import create_app, server_engine_config
from sagellm_core.server.processes import EngineLauncher, ServeTopology

TIMEOUT = 120.0
MODEL = "tiny"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("process-model") / "llama", default_model_dir)


def engine_config(model_dir: Path, **scheduler: object) -> EngineConfig:
    return server_engine_config(EngineConfig.from_dict({
        "model": {"path": str(model_dir), "dtype": "float32"}, "backend": {"name": "cpu"},
        "kv_cache": {"block_size": 16, "num_blocks": 128}, "scheduler": {"name": "fcfs", **scheduler}}))


def sse_lines(response: httpx.Response) -> Iterator[str]:
    for line in response.iter_lines():
        if line.startswith("data: "):
            yield line.removeprefix("data: ")


def test_killed_engine_fails_open_streams_and_health(model_dir: Path) -> None:
    launcher = EngineLauncher(engine_config(model_dir), ServeTopology())
    launcher.start()
    client = launcher.client(0, input_workers=1, stall_timeout_s=None, owns_engines=True)
    body = {"model": MODEL, "prompt": [1, 2, 3], "max_tokens": 480, "stream": True, "ignore_eos": True}
    try:
        with ServerThread(create_app(client, served_model_name=MODEL)) as url:
            with httpx.stream("POST", url + "/v1/completions", json=body, timeout=TIMEOUT) as response:
                assert response.status_code == 200
                events = sse_lines(response)
                first = json.loads(next(events))
                assert first["choices"][0]["finish_reason"] is None
                os.kill(launcher.processes[0].pid, signal.SIGKILL)  # type: ignore[arg-type]
                rest = list(events)  # ends at once: the engine's connection dropped
            assert rest[-1] == "[DONE]"
            error = json.loads(rest[-2])["error"]
            assert error["code"] == "engine_dead" or "engine" in error["message"]
            health = httpx.get(url + "/health", timeout=TIMEOUT)
            assert health.status_code == 503 and health.json()["error"]["code"] == "engine_dead"
            refused = httpx.post(url + "/v1/completions", json={**body, "stream": False}, timeout=TIMEOUT)
            assert refused.status_code == 503
            assert httpx.get(url + "/metrics", timeout=TIMEOUT).status_code == 503
    finally:
        client.shutdown()
    assert not launcher.processes[0].process.is_alive()


def test_structured_outputs_and_params_cross_the_process(tokenizer_model: Path) -> None:
    from sagellm_core.structured.params import StructuredOutputsParams

    launcher = EngineLauncher(engine_config(tokenizer_model), ServeTopology())
    launcher.start()
    client = launcher.client(0, input_workers=1, stall_timeout_s=None, owns_engines=True)
    try:
        params = SamplingParams(max_tokens=40, temperature=0.8, seed=3,
                                structured_outputs=StructuredOutputsParams(choice=["yes", "no", "maybe"]))
        stream = client.submit("Answer:", params, stream=False)
        for _ in stream:
            pass
        assert stream.final is not None and stream.final.outputs[0].text in ("yes", "no", "maybe")
        bad = client.submit([1, 2, 3], SamplingParams(max_tokens=5, structured_outputs=StructuredOutputsParams(
            regex="(")))
        with pytest.raises(InvalidRequestError):  # refused by the engine, raised here as the same class
            list(bad)
    finally:
        client.shutdown()


def test_two_data_parallel_replicas_route_a_shared_prefix(model_dir: Path) -> None:
    launcher = EngineLauncher(engine_config(model_dir), ServeTopology(data_parallel_size=2))
    infos = launcher.start()
    client = launcher.client(0, input_workers=1, stall_timeout_s=None, owns_engines=True)
    try:
        assert len(infos) == 2 and client.info.num_blocks == 2 * infos[0].num_blocks
        prefix = list(range(10, 74))  # four full blocks
        for suffix in range(4):
            stream = client.submit(prefix + [100 + suffix, 5], SamplingParams(max_tokens=2, ignore_eos=True),
                                   stream=False)
            for _ in stream:
                pass
        stats = client.get_stats()
        assert stats["router"]["requests"] == 4 and stats["router"]["affinity_routed"] == 3
        pools = [replica["kv_pools"][0] for replica in stats["replicas"]]
        holder = max(range(2), key=lambda r: pools[r].prefix_hit_tokens)
        assert pools[holder].prefix_hit_tokens >= 3 * 64 and pools[1 - holder].prefix_hit_tokens == 0
        text = client.metrics_exposition()
        assert text is not None
        assert b'sagellm_generation_tokens_total{engine="0"}' in text
        assert b'sagellm_generation_tokens_total{engine="1"}' in text
    finally:
        client.shutdown()


def test_serve_with_two_front_end_processes(model_dir: Path, tmp_path: Path) -> None:
    port = free_port()
    log_path = tmp_path / "serve.log"
    command = [sys.executable, "-m", "sagellm_core", "serve", str(model_dir), "--port", str(port),
               "--backend", "cpu", "--dtype", "float32", "--num-kv-blocks", "64", "--served-model-name", MODEL,
               "--api-server-count", "2", "--max-num-seqs", "8", "--set", "kv_cache.block_size=32",
               "--api-key", "k"]
    url = f"http://127.0.0.1:{port}"
    headers = {"Authorization": "Bearer k"}
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)
    try:
        def healthy() -> bool:
            assert process.poll() is None, log_path.read_text()
            try:
                return httpx.get(url + "/health", timeout=2.0).status_code == 200
            except httpx.HTTPError:
                return False

        wait_until(healthy, 300, interval=0.2, what="the server to answer")
        for _ in range(8):  # new connections, whichever front end accepts: only ready ones accept
            with httpx.Client() as http:
                assert http.get(url + "/v1/models", headers=headers, timeout=TIMEOUT).status_code == 200
        for index in range(4):
            out = httpx.post(url + "/v1/completions", headers=headers, timeout=TIMEOUT,
                             json={"model": MODEL, "prompt": [1, 2, 3 + index], "max_tokens": 3, "ignore_eos": True})
            assert out.status_code == 200 and out.json()["usage"]["completion_tokens"] == 3
        assert httpx.get(url + "/v1/config", timeout=TIMEOUT).status_code == 401
        config = httpx.get(url + "/v1/config", headers=headers, timeout=TIMEOUT).json()
        assert config["topology"] == {"engine_process": True, "api_server_count": 2, "api_server_count_source": "option",
                                      "data_parallel_size": 1}
        assert config["engine"]["scheduler"]["max_num_seqs"] == 8 and config["engine"]["kv_cache"]["block_size"] == 32
        scrapes = set()
        for _ in range(6):  # new connections: both front ends answer some of them
            with httpx.Client() as http:
                lines = http.get(url + "/metrics", timeout=TIMEOUT).text.splitlines()
            scrapes.add(next(line for line in lines if line.startswith("sagellm_generation_tokens_total")))
        assert scrapes == {"sagellm_generation_tokens_total 12.0"}
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    log = log_path.read_text()
    assert "2 front-end processes" in log and "api server count 2" in log
    assert process.returncode == 0, log[-3000:]
