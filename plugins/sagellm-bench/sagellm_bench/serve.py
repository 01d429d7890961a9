"""Online serving: Poisson arrivals against an OpenAI-compatible ``/v1/completions`` endpoint (SSE).

Per request rate: TTFT, TPOT, ITL and E2E (mean / median / p99), request and token throughput, and
goodput (requests per second meeting every given SLO). ``--launch`` starts ``sagellm serve`` as a
subprocess with every engine option given (`server_launch`) and reports the configuration it runs
with, as the server reports it (``GET /v1/config``). ``--compare offline`` runs the engine in-process on
the same requests and arrival times first, releases it, then measures the server, and reports server /
offline ratios (the two never share the device).

Requests use the vLLM extensions ``ignore_eos`` and token-id prompts (``prompt`` as a list of ints),
and ask for ``stream_options.include_usage`` so the output token count comes from the server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import random
import shlex
import time
from pathlib import Path
from typing import Any

import attrs

from sagellm_bench.environment import environment, visible_accelerators
from sagellm_bench.offline import rate_label
from sagellm_bench.report import BenchReport, Table, line_chart, write_report
from sagellm_bench.serve_offline import offline_comparison, offline_table, ratios, run_offline_peer, three
from sagellm_bench.server_launch import fetch_server_config, flatten, launched_server, process_tree_cpu
from sagellm_bench.stats import RequestTiming, latency_summary, throughput_summary
from sagellm_bench.workloads import BenchRequest, Workload, poisson_arrivals, random_text, random_workload
from sagellm_core.config import EngineConfig


@attrs.frozen
class ServeOptions:
    base_url: str = "http://127.0.0.1:8000"
    launch: bool = False
    launch_args: tuple[str, ...] = ()
    launch_timeout_s: float = 600.0
    request_rates: tuple[float, ...] = (math.inf,)
    max_concurrency: int | None = None
    num_requests: int = 64
    input_len: tuple[int, int] = (100, 1024)
    output_len: tuple[int, int] = (100, 1024)
    prompt_kind: str = "tokens"
    vocab_size: int = 32000
    model_name: str | None = None
    slo_ttft_ms: float | None = None
    slo_tpot_ms: float | None = None
    compare_offline: bool = False
    seed: int = 0
    temperature: float = 0.0
    output_dir: str = "bench_results"


@attrs.frozen
class Payload:
    """One request body plus the figures the client needs to account for it."""

    body: dict[str, Any]
    prompt_len: int
    output_len: int


def serve_workload(options: ServeOptions) -> Workload:
    """The seeded requests every rate (and the offline peer) runs."""
    return random_workload(options.num_requests, options.input_len, options.output_len, options.vocab_size,
                           options.seed)


def build_payloads(options: ServeOptions, model_name: str) -> list[Payload]:
    """Seeded prompts: random token ids, or random words with about one word per requested token."""
    rng = random.Random(options.seed + 1)
    return [_payload(request, options, model_name, rng) for request in serve_workload(options).requests]


def _payload(request: BenchRequest, options: ServeOptions, model_name: str, rng: random.Random) -> Payload:
    prompt: Any = request.prompt_token_ids
    if options.prompt_kind == "text":
        prompt = random_text(request.prompt_len, rng)
    body = {"model": model_name, "prompt": prompt, "max_tokens": request.output_len, "ignore_eos": True,
            "temperature": options.temperature, "stream": True, "stream_options": {"include_usage": True}}
    return Payload(body, request.prompt_len, request.output_len)


def _token_event(chunk: dict[str, Any]) -> bool:
    """Whether an SSE chunk carries generated tokens (a bare finish/usage chunk does not)."""
    choices = chunk.get("choices") or []
    if not choices:
        return False
    choice = choices[0]
    return bool(choice.get("text")) or choice.get("finish_reason") is None


async def send_request(client: Any, url: str, payload: Payload) -> RequestTiming:
    """POST one streaming completion; timestamps every token-carrying chunk."""
    start = time.perf_counter()
    times: list[float] = []
    usage: dict[str, Any] = {}
    finish_time: float | None = None
    ok = False
    try:
        async with client.stream("POST", url, json=payload.body) as response:
            if response.status_code != 200:
                await response.aread()
                return RequestTiming(start, None, time.perf_counter(), payload.prompt_len, 0, ok=False)
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    ok = True
                    break
                chunk = json.loads(data)
                if _token_event(chunk):
                    times.append(time.perf_counter())
                elif finish_time is None and (chunk.get("choices") or [{}])[0].get("finish_reason"):
                    finish_time = time.perf_counter()
                usage = chunk.get("usage") or usage
    except Exception:  # a dropped connection is a failed request, not a failed benchmark
        ok = False
    end = time.perf_counter()
    tokens = int(usage.get("completion_tokens", len(times)))
    if not times and tokens > 0 and finish_time is not None:
        times.append(finish_time)  # every token came in the finishing chunk (text that decodes to nothing)
    prompt_len = int(usage.get("prompt_tokens", payload.prompt_len))  # text prompts: the server's count
    return RequestTiming(start, times[0] if times else None, times[-1] if times else end, prompt_len,
                         tokens, tuple(times), ok=ok and bool(times))


async def run_rate(client: Any, url: str, payloads: list[Payload], rate: float, max_concurrency: int | None,
                   seed: int) -> tuple[list[RequestTiming], float]:
    """Send every payload at its Poisson arrival time, at most ``max_concurrency`` in flight."""
    from tqdm import tqdm

    offsets = poisson_arrivals(len(payloads), rate, seed)
    limit = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    bar = tqdm(total=len(payloads), desc=f"rate {rate_label(rate)}", unit="req")
    start = time.perf_counter()

    async def one(payload: Payload, offset: float) -> RequestTiming:
        await asyncio.sleep(max(0.0, start + offset - time.perf_counter()))
        async with limit if limit else contextlib.nullcontext():
            timing = await send_request(client, url, payload)
        bar.update(1)
        return timing

    timings = await asyncio.gather(*(one(p, o) for p, o in zip(payloads, offsets)))
    bar.close()
    return list(timings), time.perf_counter() - start


def goodput(timings: list[RequestTiming], elapsed: float, slo_ttft_ms: float | None, slo_tpot_ms: float | None
            ) -> float | None:
    """Requests per second that finished and met every given SLO; None when no SLO was given."""
    if slo_ttft_ms is None and slo_tpot_ms is None:
        return None

    def meets(t: RequestTiming) -> bool:
        ttft_ok = slo_ttft_ms is None or (t.ttft is not None and t.ttft * 1000.0 <= slo_ttft_ms)
        tpot_ok = slo_tpot_ms is None or t.tpot is None or t.tpot * 1000.0 <= slo_tpot_ms
        return t.ok and ttft_ok and tpot_ok

    return sum(1 for t in timings if meets(t)) / elapsed if elapsed else 0.0


async def _model_name(client: Any, base_url: str, attempts: int = 60) -> str:
    """The served model's name from ``/v1/models``; a server still loading (503) is asked again once a
    second, anything else is an error (a guessed name would turn every request into a 404)."""
    for _ in range(attempts):
        response = await client.get(f"{base_url}/v1/models")
        if response.status_code != 503:
            break
        await asyncio.sleep(1.0)
    if response.status_code != 200:
        raise RuntimeError(f"GET {base_url}/v1/models answered {response.status_code}: {response.text[:300]}")
    return str(response.json()["data"][0]["id"])


def cpu_use(client_s: float, before: dict[str, float], after: dict[str, float], elapsed: float) -> dict[str, Any]:
    """Where the CPU went during one rate: this client's seconds and each server process's, and each as a
    share of the wall time (a process near 1.0 is saturated)."""
    server = {name: round(after[name] - before.get(name, 0.0), 2) for name in after}
    return {"wall_s": round(elapsed, 2), "client_s": round(client_s, 2), "server_s": server,
            "busiest_share": round(max([client_s, *server.values()]) / elapsed, 2) if elapsed else None}


async def _run_all(options: ServeOptions, base_url: str, server_pid: int | None) -> tuple[dict[str, Any], str]:
    import httpx

    results: dict[str, Any] = {}
    limits = httpx.Limits(max_connections=options.max_concurrency or 1000)
    async with httpx.AsyncClient(timeout=httpx.Timeout(None), limits=limits) as client:
        model = options.model_name or await _model_name(client, base_url)
        payloads = build_payloads(options, model)
        url = f"{base_url}/v1/completions"
        warm = _payload(BenchRequest([(7 * i + 3) % options.vocab_size for i in range(16)], 4), options, model,
                        random.Random(0))
        await send_request(client, url, warm)  # first-call costs stay out of the timings, as offline
        for rate in options.request_rates:
            client_start, server_before = time.process_time(), process_tree_cpu(server_pid) if server_pid else {}
            timings, elapsed = await run_rate(client, url, payloads, rate, options.max_concurrency, options.seed)
            server_after = process_tree_cpu(server_pid) if server_pid else {}
            results[rate_label(rate)] = {
                "cpu": cpu_use(time.process_time() - client_start, server_before, server_after, elapsed),
                "request_rate": rate_label(rate), **throughput_summary(timings, elapsed),
                **latency_summary(timings),
                "goodput_requests_per_s": goodput(timings, elapsed, options.slo_ttft_ms, options.slo_tpot_ms),
            }
    return results, model


def run(options: ServeOptions, config: EngineConfig, args: argparse.Namespace | None = None) -> BenchReport:
    """Run the offline peer if asked (first, then released), then benchmark the server (launching one if
    asked); write the files.

    ``config`` is the engine configuration of this command's options: the one forwarded to a launched
    server, and the one the offline peer runs.
    """
    env = environment(args)
    env["gpus"] = visible_accelerators()  # this machine's (the server's, with --launch)
    offline_results = None
    if options.compare_offline:  # first, and released before the server starts: they never share the device
        workload = serve_workload(options)
        offsets = {rate_label(rate): poisson_arrivals(len(workload.requests), rate, options.seed)
                   for rate in options.request_rates}
        offline_results = run_offline_peer(config, workload, offsets, options.temperature)
    server_config = None
    with contextlib.ExitStack() as stack:
        base_url, server_pid = options.base_url, None
        if options.launch:
            base_url, server_pid = stack.enter_context(launched_server(
                list(options.launch_args), options.launch_timeout_s, Path(options.output_dir) / "serve_server.log"))
        server_config = fetch_server_config(base_url.rstrip("/"), options.launch_args)
        results, model = asyncio.run(_run_all(options, base_url.rstrip("/"), server_pid))
    for rate, offline in (offline_results or {}).items():
        results[rate]["offline"] = offline
        results[rate]["server_over_offline"] = ratios(results[rate], offline)
    setup = {"base_url": base_url, "launched": options.launch, "model": model, "prompt_kind": options.prompt_kind,
             "num_requests_per_rate": options.num_requests,
             "input_len": f"{options.input_len[0]}..{options.input_len[1]}",
             "output_len": f"{options.output_len[0]}..{options.output_len[1]}",
             "max_concurrency": options.max_concurrency or "unlimited",
             "slo_ttft_ms": options.slo_ttft_ms, "slo_tpot_ms": options.slo_tpot_ms, "seed": options.seed,
             "server_command": shlex.join(["sagellm", "serve", "--port", "PORT", *options.launch_args])
             if options.launch else "not launched by this run",
             "server_config": server_config or "unknown: the server does not report it (GET /v1/config)"}
    report = BenchReport("serve", env, setup, results, _tables(results, server_config), _comparisons(results),
                         _notes(options))
    write_report(report, options.output_dir, _figures(results))
    return report


# ---- report --------------------------------------------------------------------------------------
def _tables(results: dict[str, Any], server_config: dict[str, Any] | None) -> list[Table]:
    table = Table("Online serving", ["rate req/s", "done/failed", "req/s", "output tok/s", "TTFT mean/med/p99 ms",
                                     "TPOT mean/med/p99 ms", "ITL mean/p99 ms", "E2E median ms", "goodput req/s"])
    for rate, r in results.items():
        itl = r["itl_ms"]
        table.rows.append([rate, f"{r['completed']}/{r['failed']}", r["requests_per_s"], r["output_tokens_per_s"],
                           three(r["ttft_ms"]), three(r["tpot_ms"]),
                           f"{itl['mean']:.1f}/{itl['p99']:.1f}" if itl.get("count") else "-",
                           r["e2e_ms"].get("median"), r["goodput_requests_per_s"]])
    tables = [table]
    if any("offline" in r for r in results.values()):
        tables.append(offline_table(results))
    if server_config is not None:
        config = Table("Server configuration (as the server reports it: GET /v1/config)",
                       ["setting", "value"])
        config.rows = [[key, value] for key, value in flatten(server_config).items()]
        tables.append(config)
    return tables


def _comparisons(results: dict[str, Any]) -> list[str]:
    lines = []
    for rate, r in results.items():
        if rate != "inf":
            lines.append(f"rate {rate}: achieved {r['requests_per_s']:.2f} req/s of {float(rate):.2f} offered "
                         f"({r['requests_per_s'] / float(rate):.2f}x)")
        if "offline" in r:
            lines.append(offline_comparison(rate, r))
        cpu = r["cpu"]
        lines.append(f"rate {rate}: CPU seconds over {cpu['wall_s']} s wall: client {cpu['client_s']}, server "
                     + (", ".join(f"{name} {s}" for name, s in cpu["server_s"].items()) or "not launched here"))
    if not any("offline" in r for r in results.values()):
        lines.append("no offline peer measured in this run (pass --compare offline)")
    return lines


def _notes(options: ServeOptions) -> list[str]:
    return ["TTFT from sending the request to the first token-carrying SSE chunk; TPOT = (last - first chunk) / "
            "(completion tokens - 1), completion tokens from the server's usage chunk when present",
            f"prompts: {options.prompt_kind}; EOS ignored (ignore_eos) so every request generates its full length",
            "one short warm-up request goes to the server before the timed rates (the offline engine warms up too)",
            "offline peer (--compare offline): `LLM` in this process with the same engine options, run first and "
            "shut down (device memory released) before the server was launched; TTFT from submission; no "
            "concurrency limit"]


def _figures(results: dict[str, Any]) -> dict[str, Any]:
    labels = list(results)
    xs = list(range(len(labels)))

    def series(metric: str, stat: str) -> tuple[list[int], list[float]]:
        return xs, [results[r][metric].get(stat, float("nan")) for r in labels]

    figure = line_chart({"TTFT median": series("ttft_ms", "median"), "TTFT p99": series("ttft_ms", "p99"),
                         "TPOT median": series("tpot_ms", "median"), "TPOT p99": series("tpot_ms", "p99")},
                        "request rate (req/s)", "ms", "Latency vs request rate", logy=True, xticklabels=labels)
    return {"latency_vs_rate": figure}
