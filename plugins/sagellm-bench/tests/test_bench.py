"""`sagellm bench` (the sagellm-bench plugin): end-to-end runs on a tiny random Llama (CPU), plus the pure
helpers. The plugin's own command hook, the shared latency definitions and ``--launch`` are in
test_bench_plugin.py."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from sagellm_bench.stats import RequestTiming, summarize
from sagellm_bench.workloads import poisson_arrivals, random_workload, shared_prefix_workload
from sagellm_core.cli import main
from sagellm_core.metrics.latency import percentile

ENGINE_ARGS = ["--backend", "cpu", "--dtype", "float32", "--num-kv-blocks", "256"]


def _bench(name: str, model: Path, out: Path, *extra: str) -> dict[str, Any]:
    assert main(["bench", name, "--model", str(model), *ENGINE_ARGS, "--output-dir", str(out), *extra]) == 0
    assert (out / f"{name}.md").is_file()
    pngs = list(out.glob(f"{name}_*.png"))
    assert pngs and all(p.stat().st_size > 1000 for p in pngs)
    return json.loads((out / f"{name}.json").read_text())


def _assert_header(data: dict[str, Any], name: str) -> None:
    env = data["environment"]
    assert env["cpu"]["cores"] >= 1
    assert {"python", "torch", "transformers", "sagellm"} <= set(env["versions"])
    assert env["command"].startswith(f"sagellm bench {name}")


def test_throughput_compare_hf(tiny_llama: Path, tmp_path: Path) -> None:
    data = _bench("throughput", tiny_llama, tmp_path, "--compare", "hf", "--num-requests", "8",
                  "--min-input-len", "8", "--max-input-len", "32", "--min-output-len", "8", "--max-output-len", "32",
                  "--hf-batch-size", "4")
    _assert_header(data, "throughput")
    results = data["results"]
    workload = random_workload(8, (8, 32), (8, 32), 512, 0)
    for engine in ("sageLLM", "HF generate (static)"):
        result = results[engine]
        assert result["output_tokens"] == workload.num_output_tokens, engine
        assert result["output_tokens_per_s"] > 0 and result["total_tokens_per_s"] > result["output_tokens_per_s"]
        assert 0 < result["compute_floor"]["fraction_achieved"] < 1
    assert "HF continuous batching" not in results  # auto: GPUs only
    assert any("sageLLM / HF generate (static)" in line for line in data["comparisons"])
    assert data["setup"]["matmul"]["flops_per_s"] > 0
    assert "--compare hf" in data["environment"]["command"]


def test_throughput_peer_loads_the_checkpoint_itself(tiny_llama: Path, tmp_path: Path) -> None:
    """``--hf-model transformers``: sageLLM runs int8 layers, transformers its own load of the same
    checkpoint; both generate the whole workload."""
    data = _bench("throughput", tiny_llama, tmp_path, "--compare", "hf", "--hf-model", "transformers",
                  "--quantization", "int8", "--num-requests", "4", "--min-input-len", "8", "--max-input-len", "16",
                  "--min-output-len", "4", "--max-output-len", "8", "--hf-batch-size", "4")
    workload = random_workload(4, (8, 16), (4, 8), 512, 0)
    for engine in ("sageLLM", "HF generate (static)"):
        assert data["results"][engine]["output_tokens"] == workload.num_output_tokens, engine
    assert any("loads the checkpoint itself" in note for note in data["notes"])


def test_throughput_peer_of_a_random_shape_cannot_load_a_checkpoint(tiny_llama: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="--hf-model same"):
        main(["bench", "throughput", "--model", str(tiny_llama), *ENGINE_ARGS, "--load-format", "dummy",
              "--compare", "hf", "--hf-model", "transformers", "--num-requests", "2", "--output-dir", str(tmp_path)])


def test_sampling_mixes_defaults_and_first_run(tiny_llama: Path, tmp_path: Path) -> None:
    data = _bench("sampling", tiny_llama, tmp_path, "--num-requests", "6", "--min-input-len", "4",
                  "--max-input-len", "12", "--min-output-len", "3", "--max-output-len", "8", "--max-num-seqs", "4")
    _assert_header(data, "sampling")
    workload = random_workload(6, (4, 12), (3, 8), 512, 0)
    from sagellm_bench.sampling import MIXES

    mixes = data["results"]["mixes"]
    assert list(mixes) == list(MIXES) and mixes["plain"]["ratio_to_plain"] == 1.0
    for name, result in [*mixes.items(), *data["results"]["engine"].items()]:
        assert result["output_tokens"] == workload.num_output_tokens, name
        assert result["ratio_to_plain"] > 0
    assert data["setup"]["budgets"]["max_num_seqs"] == 4  # the flag wins
    assert data["setup"]["default_budgets"]["source"]["max_num_seqs"] == "derived"


def test_prefix_policies(tiny_llama: Path, tmp_path: Path) -> None:
    data = _bench("prefix", tiny_llama, tmp_path, "--num-groups", "2", "--requests-per-group", "3",
                  "--prefix-len", "64", "--suffix-len", "8", "--output-len", "4")
    results = data["results"]
    assert set(results) == {"prefix_lru", "no_reuse"}
    for result in results.values():
        assert {"hit_rate", "ttft_ms", "tpot_ms", "output_tokens_per_s", "requests_per_s"} <= set(result)
        assert result["completed"] == 6
    assert results["no_reuse"]["hit_rate"] == 0.0
    assert results["prefix_lru"]["hit_rate"] > 0.3  # 4 of 6 requests find their group's 64-token prefix


def test_multiturn_tiers_off_and_on(tiny_llama: Path, tmp_path: Path) -> None:
    args = ["bench", "multiturn", "--model", str(tiny_llama), "--backend", "cpu", "--dtype", "float32",
            "--num-conversations", "6", "--num-turns", "3", "--system-len", "32", "--user-len", "8",
            "--output-len", "4", "--ungated", "--output-dir", str(tmp_path)]
    assert main(args) == 0
    data = json.loads((tmp_path / "multiturn.json").read_text())
    results, setup = data["results"], data["setup"]
    assert setup["working_set_over_pool"] > 2 and setup["kv_tiers"] == ["host", "disk"]
    assert results["same_tokens"] is True
    off, on = results["device-only"], results["tiers"]
    assert off["completed"] == on["completed"] == 18
    assert set(off["hit_rate"]) == {"device"} and set(on["hit_rate"]) == {"device", "host", "disk"}
    assert on["combined_hit_rate"] > off["combined_hit_rate"]
    assert on["hit_rate"]["host"] + on["hit_rate"]["disk"] > 0
    assert set(results["policies"]) == {"lru", "lfu", "arc", "s3fifo"}
    # a fresh disk directory: it finds lower-tier hits too. Not necessarily the gated run's: which blocks
    # stay in the device pool depends on when the reader threads' loads land (a busy machine differs)
    ungated = results["tiers, no load gate"]
    assert ungated["completed"] == 18 and set(ungated["hit_rate"]) == {"device", "host", "disk"}
    assert ungated["combined_hit_rate"] > off["combined_hit_rate"]
    assert ungated["hit_rate"]["host"] + ungated["hit_rate"]["disk"] > 0
    assert all(tier["turned_down"] == 0 for tier in ungated["tiers"])
    assert list(tmp_path.glob("multiturn_*.png"))
    assert all(tier["wait_seconds"] >= 0 for tier in on["tiers"])
    assert "engine-thread seconds waiting for loads (nothing else could run), per tier: host " in \
        (tmp_path / "multiturn.md").read_text()


def test_multiturn_paced(tiny_llama: Path, tmp_path: Path) -> None:
    """At most two turns in flight: every turn completes once, in turn-major order per conversation,
    and the tiers still find the histories the device pool evicted."""
    args = ["bench", "multiturn", "--model", str(tiny_llama), "--backend", "cpu", "--dtype", "float32",
            "--num-conversations", "5", "--num-turns", "3", "--system-len", "32", "--user-len", "8",
            "--output-len", "4", "--max-concurrency", "2", "--output-dir", str(tmp_path)]
    assert main(args) == 0
    data = json.loads((tmp_path / "multiturn.json").read_text())
    results = data["results"]
    off, on = results["device-only"], results["tiers"]
    assert off["completed"] == on["completed"] == 15
    assert results["same_tokens"] is True
    assert on["hit_rate"]["host"] + on["hit_rate"]["disk"] > 0
    assert "at most 2 turns in flight" in data["setup"]["workload"]


def test_pd_modes(tiny_llama: Path, tmp_path: Path) -> None:
    data = _bench("pd", tiny_llama, tmp_path, "--num-requests", "6", "--min-input-len", "8", "--max-input-len",
                  "48", "--min-output-len", "4", "--max-output-len", "12")
    results = data["results"]
    assert set(results) == {"strict", "time_share", "hybrid"}
    for result in results.values():
        assert result["completed"] == 6
        assert result["ttft_ms"]["mean"] > 0 and result["tpot_ms"]["mean"] > 0
        assert {"prefill_steps", "decode_steps", "mixed_steps"} <= set(result["scheduler"])
    assert results["strict"]["scheduler"]["transferred_blocks"] > 0
    assert len(results["strict"]["kv_blocks"]) == 2


def test_latency_compare_hf(tiny_llama: Path, tmp_path: Path) -> None:
    data = _bench("latency", tiny_llama, tmp_path, "--compare", "hf", "--input-len", "16", "--output-len", "8",
                  "--num-iters", "2")
    for engine in ("sageLLM", "HF generate"):
        result = data["results"][engine]
        assert result["output_tokens"] == 8 and len(result["itl_trace_ms"]) == 7
        assert result["tpot_ms"] > 0 and result["weight_read_floor"]["tpot_over_floor"] > 0


def test_workloads_are_seeded() -> None:
    a = random_workload(5, (3, 9), (2, 4), 100, seed=7)
    assert a == random_workload(5, (3, 9), (2, 4), 100, seed=7)
    assert all(3 <= r.prompt_len <= 9 and 2 <= r.output_len <= 4 for r in a.requests)
    assert all(0 <= t < 100 for r in a.requests for t in r.prompt_token_ids)
    shared = shared_prefix_workload(2, 2, 5, 3, 1, 50, seed=0)
    first, second = shared.requests[0].prompt_token_ids, shared.requests[2].prompt_token_ids
    assert first[:5] == second[:5] and len(first) == 8
    assert poisson_arrivals(3, math.inf) == [0.0, 0.0, 0.0]
    offsets = poisson_arrivals(100, 10.0, seed=1)
    assert offsets[0] == 0.0 and offsets == sorted(offsets) and 5 < offsets[-1] < 15


def test_stats_helpers() -> None:
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert summarize([None, 0.001, 0.003])["mean"] == pytest.approx(2.0)
    timing = RequestTiming(arrival=0.0, first_token=0.5, finished=1.5, prompt_len=4, output_len=3,
                           token_times=(0.5, 1.0, 1.5))
    assert timing.ttft == 0.5 and timing.tpot == 0.5 and timing.itls == [0.5, 0.5]


def test_serve_client_against_fake_server(tmp_path: Path) -> None:
    """The SSE client and the metrics, against an in-process ASGI stand-in for `sagellm serve`."""
    import asyncio

    import httpx

    from sagellm_bench import serve

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        body = json.loads((await receive())["body"])
        chunks = [{"choices": [{"text": f"t{i}", "finish_reason": None}]} for i in range(body["max_tokens"])]
        chunks.append({"choices": [{"text": "", "finish_reason": "length"}]})
        chunks.append({"choices": [], "usage": {"completion_tokens": body["max_tokens"]}})
        stream = "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"text/event-stream")]})
        await send({"type": "http.response.body", "body": stream.encode()})

    options = serve.ServeOptions(num_requests=4, input_len=(4, 8), output_len=(3, 5), vocab_size=100,
                                 slo_ttft_ms=10_000.0, output_dir=str(tmp_path))
    payloads = serve.build_payloads(options, "m")

    async def go() -> tuple[list[RequestTiming], float]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://x") as client:
            return await serve.run_rate(client, "http://x/v1/completions", payloads, 50.0, 2, 0)

    timings, elapsed = asyncio.run(go())
    assert [t.output_len for t in timings] == [p.output_len for p in payloads]
    assert all(t.ok and t.ttft is not None and len(t.token_times) == t.output_len for t in timings)
    assert serve.goodput(timings, elapsed, 10_000.0, None) == pytest.approx(4 / elapsed)


@pytest.mark.parametrize("shape, total, tied",
                         [("qwen3-0.6b", 596_049_920, True), ("llama-3-8b", 8_030_261_248, False)])
def test_model_shapes_match_the_real_parameter_counts(shape: str, total: int, tied: bool, tmp_path: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from sagellm_bench.floors import param_counts
    from sagellm_bench.shapes import write_shape
    from sagellm_bench.cli import SHAPE_NAMES

    assert shape in SHAPE_NAMES
    config = AutoConfig.from_pretrained(str(write_shape(shape, tmp_path / shape)))
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    counts = param_counts(model)
    assert (counts.total, counts.tied) == (total, tied)


def test_console_run_records_the_exact_command(tiny_llama: Path, tmp_path: Path) -> None:
    import subprocess
    import sys

    argv = ["bench", "pd", "--model", str(tiny_llama), *ENGINE_ARGS, "--output-dir", str(tmp_path),
            "--modes", "hybrid", "--num-requests", "2", "--min-input-len", "4", "--max-input-len", "8",
            "--min-output-len", "2", "--max-output-len", "3"]
    done = subprocess.run([sys.executable, "-m", "sagellm_core", *argv], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads((tmp_path / "pd.json").read_text())
    assert data["environment"]["command"] == "sagellm " + " ".join(argv)
    assert "command: sagellm bench pd" in done.stdout and "hardware: CPU" in done.stdout


@pytest.mark.parametrize("text", ["", "hello"])
def test_serve_client_counts_tokens_that_arrive_with_the_finishing_chunk(text: str) -> None:
    """A stream whose only choice chunk also finishes it (its tokens may decode to no text) is a
    completed request with a first-token time, not a failure."""
    import asyncio

    import httpx

    from sagellm_bench.serve import Payload, send_request

    events = [{"choices": [{"index": 0, "text": text, "finish_reason": "length"}]},
              {"choices": [], "usage": {"prompt_tokens": 4, "completion_tokens": 3}}]
    body = "".join(f"data: {json.dumps(event)}\n\n" for event in events) + "data: [DONE]\n\n"

    async def go() -> RequestTiming:
        transport = httpx.MockTransport(lambda request: httpx.Response(200, text=body))
        async with httpx.AsyncClient(transport=transport) as client:
            return await send_request(client, "http://server/v1/completions", Payload({"prompt": [1]}, 4, 3))

    timing = asyncio.run(go())
    assert timing.ok and timing.first_token is not None and timing.output_len == 3


def test_multiturn_prefill_bound_counts_the_slower_of_recompute_and_loads_beside_it() -> None:
    from sagellm_bench.multiturn import _prefill_bound

    off = {"combined_hit_rate": 0.5, "hit_rate": {"device": 0.5}}
    on = {"combined_hit_rate": 0.8, "hit_rate": {"device": 0.5, "host": 0.3}}
    assert _prefill_bound(off, on, {"recompute": 10e-6, "host": 10e-6}) == pytest.approx(0.5 / 0.3)
    assert _prefill_bound(off, on, {"recompute": 10e-6, "host": 1e-6}) == pytest.approx(0.5 / 0.2), \
        "cheap loads: the recomputed misses bound it"
    assert _prefill_bound(off, on, {"host": 1e-6}) is None
