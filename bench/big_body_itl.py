"""One client with a huge body must not stall the others: p99 inter-token latency (ITL) of N streams
with and without one client posting a 10 MB body (issue 10's figure).

Starts `sagellm serve` in a subprocess (default model unless --model), then runs two rounds of
``--streams`` streaming completions (``ignore_eos``, ``--max-tokens`` each): a baseline, and the same
while one more client posts a ``--body-mb`` MB completion body (``--big-kind prompt``: one huge prompt;
``chat``: one huge chat message) once every stream has its first token: ``--big-count`` bodies one
after the other (default 1), from a process of its own that is ready before the streams start.
The server's body limit is raised above the body so the server has to read, parse and pre-check it.
ITL is measured by the client: the gaps between consecutive SSE chunks of each stream.

    python bench/big_body_itl.py                      # default model, 32 streams, 10 MB
    python bench/big_body_itl.py --model DIR --streams 32 --max-tokens 64 --big-kind chat
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import httpx


def percentile(values: list[float], q: float) -> float:
    """The engine's one definition (linear interpolation); NaN for no values."""
    from sagellm_core.metrics.latency import percentile as linear

    return linear(values, q) if values else float("nan")


async def one_stream(http: httpx.AsyncClient, index: int, max_tokens: int, started: list[int],
                     all_started: asyncio.Event) -> list[float]:
    body = {"prompt": f"Story number {index}: once upon a time", "max_tokens": max_tokens, "stream": True,
            "ignore_eos": True, "temperature": 0.8, "seed": index}
    gaps, last = [], None
    async with http.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            now = time.perf_counter()
            if last is not None:
                gaps.append(now - last)
            else:
                started[0] -= 1
                if started[0] == 0:
                    all_started.set()
            last = now
    return gaps


BIG_CLIENT = """
import json, sys, time, httpx
url, path, kind, megabytes, count = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4]), int(sys.argv[5])
text = "lorem ipsum " * int(megabytes * 1e6 / 12)
body = {"messages": [{"role": "user", "content": text}]} if kind == "chat" else {"prompt": text}
payload = json.dumps({**body, "max_tokens": 4}).encode()
answers = []
with httpx.Client(base_url=url, timeout=600) as http:
    print("ready", flush=True)
    sys.stdin.readline()
    while len(answers) < count:
        start = time.perf_counter()
        status = http.post(path, content=payload, headers={"content-type": "application/json"}).status_code
        answers.append((status, time.perf_counter() - start))
print(json.dumps(answers))
"""


async def start_big_client(url: str, big: tuple[str, float], count: int) -> asyncio.subprocess.Process:
    """The big client runs in a process of its own, started and ready (payload built, httpx imported)
    before the streams: only its request, not its set-up, competes with them."""
    kind, megabytes = big
    path = "/v1/chat/completions" if kind == "chat" else "/v1/completions"
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", BIG_CLIENT, url, path, kind, str(megabytes), str(count),
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE)
    assert process.stdout is not None
    await process.stdout.readline()  # "ready"
    return process


async def big_client(process: asyncio.subprocess.Process, start: asyncio.Event) -> list[tuple[int, float]]:
    await start.wait()
    output, _ = await process.communicate(b"go\n")
    return [tuple(answer) for answer in json.loads(output)]


async def round_(url: str, streams: int, max_tokens: int, big: tuple[str, float] | None, count: int = 1
                 ) -> dict[str, Any]:
    limits = httpx.Limits(max_connections=streams + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        all_started, started = asyncio.Event(), [streams]
        process = await start_big_client(url, big, count) if big else None
        big_task = asyncio.create_task(big_client(process, all_started)) if process else None
        start = time.perf_counter()
        results = await asyncio.gather(*(one_stream(http, i, max_tokens, started, all_started)
                                         for i in range(streams)))
        wall = time.perf_counter() - start
        answers = await big_task if big_task else []
    gaps = [gap for result in results for gap in result]
    return {"itl_p50_ms": 1000 * percentile(gaps, 50), "itl_p99_ms": 1000 * percentile(gaps, 99),
            "itl_max_ms": 1000 * max(gaps), "gaps": len(gaps), "wall_s": wall,
            "big_requests": [{"status": status, "seconds": round(seconds, 3)} for status, seconds in answers]}


def big_payload(kind: str, megabytes: float) -> tuple[bytes, str]:
    text = "lorem ipsum " * int(megabytes * 1e6 / 12)
    if kind == "chat":
        return json.dumps({"messages": [{"role": "user", "content": text}], "max_tokens": 4}).encode(), \
            "/v1/chat/completions"
    return json.dumps({"prompt": text, "max_tokens": 4}).encode(), "/v1/completions"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None)
    parser.add_argument("--backend", default="cpu")
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--body-mb", type=float, default=10.0)
    parser.add_argument("--big-kind", choices=["prompt", "chat"], default="prompt")
    parser.add_argument("--big-count", type=int, default=1, help="big bodies sent one after the other")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()

    payload = big_payload(args.big_kind, args.body_mb)
    big = (args.big_kind, args.body_mb)
    command = [sys.executable, "-m", "sagellm_core", "serve", "--port", str(args.port), "--backend", args.backend,
               "--max-request-bytes", str(len(payload[0]) + 1024), "--log-level", "warning"]
    if args.model:
        command += ["--model", args.model]
    server = subprocess.Popen(command, env={**os.environ, "SAGELLM_API_KEY": ""})
    url = f"http://127.0.0.1:{args.port}"
    try:
        deadline = time.monotonic() + 600
        while True:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("the server did not come up")
            time.sleep(0.5)
        asyncio.run(round_(url, 4, 8, None))  # warm-up
        baseline = asyncio.run(round_(url, args.streams, args.max_tokens, None))
        loaded = asyncio.run(round_(url, args.streams, args.max_tokens, big, args.big_count))
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=120)
    ratio = loaded["itl_p99_ms"] / baseline["itl_p99_ms"]
    report = {"streams": args.streams, "max_tokens": args.max_tokens, "body_bytes": len(payload[0]),
              "big_kind": args.big_kind, "big_count": args.big_count, "baseline": baseline, "with_big_body": loaded, "p99_ratio": round(ratio, 3)}
    summary = {k: v for k, v in loaded.items() if k != "big_requests"}
    print(json.dumps({**report, "with_big_body": {**summary, "big_requests": loaded["big_requests"][:5],
                                                  "num_big_requests": len(loaded["big_requests"])}}, indent=2))
    print(f"p99 ITL: {baseline['itl_p99_ms']:.1f} ms alone, {loaded['itl_p99_ms']:.1f} ms with the "
          f"{args.body_mb:g} MB client: {ratio:.2f}x", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
