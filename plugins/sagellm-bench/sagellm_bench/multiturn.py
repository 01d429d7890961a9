"""Multi-turn conversations sharing a system prompt, with the KV tiers off and on in one run.

Each turn re-sends a conversation's whole history plus a new user message, so every turn's prompt
extends the previous turn's; with many conversations the working set is several times the device
KV pool, and whatever the pool evicted is recomputed (tiers off) or loaded from host memory or disk
(tiers on). By default each turn submits every conversation at once (TTFT then measures mostly the
queue); ``max_concurrency`` keeps at most that many turns in flight, in the same turn-major order, so
a turn's TTFT is its own prefill or load (a chat service below saturation). Reports TTFT, output
tok/s, the hit rate of each tier, the tiers' load rate (against a measured pinned-host-to-device copy
on CUDA) and the hit rates of the eviction policies replayed on the benchmark's own block trace at
the device pool's capacity.
"""

from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
from collections import deque
from typing import Any

import attrs

from sagellm_bench.environment import device_info, environment
from sagellm_bench.offline import describe_engine, engine_session, timing_from_output, warmup
from sagellm_bench.report import BenchReport, Table, panel_bars, write_report
from sagellm_bench.stats import RequestTiming, latency_summary, throughput_summary
from sagellm_core.config import EngineConfig
from sagellm_core.kv.policies.trace import builtin_policies, compare
from sagellm_core.kv.tiers.gate import block_load_seconds
from sagellm_core.kv.tiers.store import TierStore
from sagellm_core.llm import LLM
from sagellm_core.models.kv_cache import kv_bytes_per_block
from sagellm_core.outputs import RequestOutput
from sagellm_core.quant import kv_cache_dtype
from sagellm_core.sampling_params import SamplingParams

MODES = ("device-only", "tiers")
UNGATED = "tiers, no load gate"


@attrs.frozen
class MultiturnOptions:
    num_conversations: int = 16
    num_turns: int = 4
    system_len: int = 256
    user_len: int = 64
    output_len: int = 16
    working_set_factor: float = 5.0
    host_bytes: int | None = None
    disk_path: str | None = None
    seed: int = 0
    temperature: float = 0.0
    output_dir: str = "bench_results"
    ungated: bool = False  # a third run: tiers with kv_tiers.load_gate off
    max_concurrency: int | None = None  # None: each turn submits every conversation at once

    def modes(self) -> tuple[str, ...]:
        return MODES + ((UNGATED,) if self.ungated else ())

    def max_prompt_len(self) -> int:
        return self.system_len + self.num_turns * (self.user_len + self.output_len)

    def working_set_tokens(self) -> int:
        return self.system_len + self.num_conversations * self.num_turns * (self.user_len + self.output_len)


def device_blocks(config: EngineConfig, options: MultiturnOptions) -> int:
    """``kv_cache.num_blocks`` if set, else the working set over ``working_set_factor`` (never less
    than the longest conversation)."""
    if config.kv_cache.num_blocks is not None:
        return config.kv_cache.num_blocks
    block = config.kv_cache.block_size
    ws_blocks = -(-options.working_set_tokens() // block)
    longest = -(-(options.max_prompt_len() + options.output_len) // block)
    return max(int(ws_blocks / options.working_set_factor), longest + 1)


def run(config: EngineConfig, options: MultiturnOptions, args: argparse.Namespace | None = None) -> BenchReport:
    env = environment(args)
    blocks = device_blocks(config, options)
    base = config.evolve(kv_cache={"num_blocks": blocks},
                         model={"max_model_len": options.max_prompt_len() + options.output_len})
    results: dict[str, Any] = {}
    outputs: dict[str, list[list[int]]] = {}
    setup: dict[str, Any] = {}
    trace: list[list[int]] = []
    with tempfile.TemporaryDirectory(prefix="sagellm-kv-disk-") as scratch:
        for mode in options.modes():
            mode_config = base if mode == "device-only" else _with_tiers(base, options, blocks, scratch)
            if mode == UNGATED:  # its own disk directory: nothing left by the gated run
                disk = os.path.join(mode_config.kv_tiers.disk_path or scratch, "ungated")
                mode_config = mode_config.evolve(kv_tiers={"load_gate": False, "disk_path": disk})
            with engine_session(mode_config) as llm:
                warmup(llm, llm.engine.vocab_size)
                results[mode], outputs[mode], trace = _run_mode(llm, options, mode)
                setup = {**describe_engine(llm), "device_kv_blocks": blocks,
                         "kv_tiers": mode_config.kv_tiers.names() if mode != "device-only" else []}
                if mode == "tiers":
                    setup["host_bytes"] = mode_config.kv_tiers.host_bytes
                    results[mode]["pinned_copy_bytes_per_s"] = pinned_copy_bandwidth(llm)
                env["gpus"] = device_info(llm.engine.backend)
    policy_rates = compare(trace, blocks, builtin_policies())
    results["policies"] = policy_rates
    results["same_tokens"] = outputs["device-only"] == outputs["tiers"]
    setup.update(workload=_describe(options), working_set_tokens=options.working_set_tokens(),
                 working_set_over_pool=options.working_set_tokens() / (blocks * config.kv_cache.block_size))
    report = BenchReport("multiturn", env, setup, results, _tables(results), _comparisons(results), _notes())
    write_report(report, options.output_dir, _figures(results))
    return report


def _with_tiers(config: EngineConfig, options: MultiturnOptions, blocks: int, scratch: str) -> EngineConfig:
    block_bytes = _block_bytes(config)
    host = options.host_bytes if options.host_bytes is not None else 2 * blocks * block_bytes
    return config.evolve(kv_tiers={"host_bytes": host, "disk_path": options.disk_path or scratch})


def _block_bytes(config: EngineConfig) -> int:
    """Bytes of one KV block of the configured model (from its config, without loading weights)."""
    import torch
    from transformers import AutoConfig

    from sagellm_core.engine.builder import DTYPES
    from sagellm_core.models import loader

    source = loader.resolve(config.model.path, config.model.gguf_file)
    model_config = AutoConfig.from_pretrained(source.directory)
    dtype = DTYPES.get(config.model.dtype, torch.bfloat16 if torch.cuda.is_available() else torch.float32)
    holder = type("ConfigHolder", (), {"config": model_config})()
    return kv_bytes_per_block(holder, config.kv_cache.block_size, kv_cache_dtype(config.kv_cache.dtype, dtype))


def _run_mode(llm: LLM, options: MultiturnOptions, mode: str
              ) -> tuple[dict[str, Any], list[list[int]], list[list[int]]]:
    rng = random.Random(options.seed)
    vocab = llm.engine.vocab_size
    system = [rng.randrange(vocab) for _ in range(options.system_len)]
    histories = [list(system) for _ in range(options.num_conversations)]
    params = SamplingParams(max_tokens=options.output_len, ignore_eos=True, temperature=options.temperature,
                            seed=options.seed)
    user_turns = [[[rng.randrange(vocab) for _ in range(options.user_len)] for _ in histories]
                  for _ in range(options.num_turns)]
    before = llm.get_stats()["kv_pools"][0]
    if options.max_concurrency is None:
        turns = _lockstep(llm, histories, user_turns, params, mode)
    else:
        turns = _paced(llm, histories, user_turns, params, options.max_concurrency, mode)
    stats = llm.get_stats()
    after = stats["kv_pools"][0]
    queried = after.prefix_query_tokens - before.prefix_query_tokens
    tier_hits = [a - b for a, b in zip(after.tier_hit_tokens, before.tier_hit_tokens or [0] * len(after.tier_hit_tokens))]
    hits = after.prefix_hit_tokens - before.prefix_hit_tokens
    rates = {"device": (hits - sum(tier_hits)) / queried if queried else 0.0}
    for tier, tier_hit in zip(stats["kv_tiers"], tier_hits):
        rates[tier["name"]] = tier_hit / queried if queried else 0.0
    summary = {"hit_rate": rates, "combined_hit_rate": hits / queried if queried else 0.0,
               "tiers": stats["kv_tiers"], **throughput_summary(turns.timings, turns.elapsed),
               **latency_summary(turns.timings)}
    block = llm.engine.config.kv_cache.block_size
    tiers = llm.engine.kv_pools[0].tiers
    if tiers is not None:
        summary["block_seconds"] = _block_costs(tiers, block)
        summary["copy_waits"] = dict(tiers.steps.waits)
    outputs = [turns.outputs[key] for key in sorted(turns.outputs)]
    return summary, outputs, [_block_ids(p, block) for p in turns.prompts]


def _block_costs(tiers: TierStore, block_size: int) -> dict[str, float]:
    """The load gate's figures at the end of a run: seconds to recompute one block (its fitted
    prefill cost of a token, times the block size) and to load one from each tier."""
    costs: dict[str, float] = {}
    token = tiers.gate.token_seconds()
    if token is not None:
        costs["recompute"] = token * block_size
    for level, tier in enumerate(tiers.tiers):
        load = block_load_seconds(level, tiers.tiers)
        if load is not None:
            costs[tier.name] = load
    return costs


@attrs.define
class _Turns:
    """What a run of every turn produced: timings, outputs by (turn, conversation), the prompts in
    submission order (the trace the eviction policies replay) and the wall seconds."""

    timings: list[RequestTiming] = attrs.field(factory=list)
    outputs: dict[tuple[int, int], list[int]] = attrs.field(factory=dict)
    prompts: list[list[int]] = attrs.field(factory=list)
    elapsed: float = 0.0

    def finish(self, turn: int, conv: int, prompt: list[int], output: RequestOutput,
               histories: list[list[int]]) -> None:
        """A turn ended: its tokens extend the conversation's history; keep its output and timing."""
        tokens = list(output.outputs[0].token_ids)
        histories[conv] = prompt + tokens
        self.outputs[(turn, conv)] = tokens
        self.timings.append(timing_from_output(output))


def _lockstep(llm: LLM, histories: list[list[int]], user_turns: list[list[list[int]]], params: SamplingParams,
              mode: str) -> _Turns:
    """Each turn submits every conversation at once (`LLM.generate`) and waits for all of them."""
    turns = _Turns()
    for turn, users in enumerate(user_turns):
        batch = [history + user for history, user in zip(histories, users)]
        print(f"[{mode}] turn {turn + 1}/{len(user_turns)}: {len(batch)} conversations", flush=True)
        start = time.perf_counter()
        results = llm.generate(batch, params, use_tqdm=False)
        turns.elapsed += time.perf_counter() - start
        for conv, (prompt, result) in enumerate(zip(batch, results)):
            turns.finish(turn, conv, prompt, result, histories)
        turns.prompts.extend(batch)
    return turns


def _paced(llm: LLM, histories: list[list[int]], user_turns: list[list[list[int]]], params: SamplingParams,
           max_concurrency: int, mode: str) -> _Turns:
    """The turns in turn-major order with at most ``max_concurrency`` in flight; a conversation's
    next turn waits for its previous one (the queue's head waits, keeping the order)."""
    engine = llm.engine
    queue = deque((turn, conv) for turn in range(len(user_turns)) for conv in range(len(histories)))
    in_flight: dict[str, tuple[int, int, list[int]]] = {}
    turns = _Turns()
    print(f"[{mode}] {len(queue)} turns, at most {max_concurrency} in flight", flush=True)
    start = time.perf_counter()
    while queue or in_flight:
        busy = {conv for _, conv, _ in in_flight.values()}
        while queue and len(in_flight) < max_concurrency and queue[0][1] not in busy:
            turn, conv = queue.popleft()
            prompt = histories[conv] + user_turns[turn][conv]
            in_flight[engine.add_request(prompt, params, stream=False)] = (turn, conv, prompt)
            busy.add(conv)
            turns.prompts.append(prompt)
        for output in engine.step():
            if not output.finished or output.request_id not in in_flight:
                continue
            turn, conv, prompt = in_flight.pop(output.request_id)
            turns.finish(turn, conv, prompt, output, histories)
    turns.elapsed = time.perf_counter() - start
    return turns


def _block_ids(tokens: list[int], block: int) -> list[int]:
    return [hash(tuple(tokens[i:i + block])) for i in range(0, len(tokens) - block + 1, block)]


def pinned_copy_bandwidth(llm: LLM, nbytes: int = 256 << 20) -> float | None:
    """Bytes per second of one pinned host-to-device copy on CUDA (None elsewhere)."""
    import torch

    device = llm.engine.backend.device()
    if device.type != "cuda":
        return None
    host = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    target = torch.empty(nbytes, dtype=torch.uint8, device=device)
    target.copy_(host, non_blocking=True)
    torch.cuda.synchronize(device)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        target.copy_(host, non_blocking=True)
    end.record()
    end.synchronize()
    return 5 * nbytes / (start.elapsed_time(end) / 1000.0)


def _describe(options: MultiturnOptions) -> str:
    paced = "each turn of all at once" if options.max_concurrency is None else \
        f"at most {options.max_concurrency} turns in flight"
    return (f"{options.num_conversations} conversations x {options.num_turns} turns, system prompt "
            f"{options.system_len} tokens, {options.user_len} user tokens and {options.output_len} output tokens "
            f"per turn, {paced}")


def _modes(results: dict[str, Any]) -> list[str]:
    return [mode for mode in (*MODES, UNGATED) if mode in results]


def _tables(results: dict[str, Any]) -> list[Table]:
    main = Table("Multi-turn conversations", ["mode", "mean TTFT ms", "p99 TTFT ms", "output tok/s",
                                              "combined hit rate", "hit rate per tier", "load GB/s per tier"])
    for mode in _modes(results):
        r = results[mode]
        per_tier = ", ".join(f"{k} {v:.3f}" for k, v in r["hit_rate"].items())
        loads = ", ".join(f"{t['name']} {t['load_bandwidth'] / 1e9:.2f}" for t in r["tiers"]) or "-"
        main.rows.append([mode, r["ttft_ms"].get("mean"), r["ttft_ms"].get("p99"), r["output_tokens_per_s"],
                          r["combined_hit_rate"], per_tier, loads])
    policies = Table("Eviction policies replayed on this trace (device pool capacity)", ["policy", "hit rate"])
    for name, rate in results["policies"].items():
        policies.rows.append([name, rate])
    return [main, policies]


def _comparisons(results: dict[str, Any]) -> list[str]:
    off, on = results["device-only"], results["tiers"]
    lines = [f"output tok/s tiers / device-only: {on['output_tokens_per_s'] / off['output_tokens_per_s']:.2f}x"]
    if on["ttft_ms"].get("mean") and off["ttft_ms"].get("mean"):
        lines.append(f"mean TTFT device-only / tiers: {off['ttft_ms']['mean'] / on['ttft_ms']['mean']:.2f}x "
                     f"({off['ttft_ms']['mean']:.1f} ms vs {on['ttft_ms']['mean']:.1f} ms)")
    pinned = on.get("pinned_copy_bytes_per_s")
    host = next((t for t in on["tiers"] if t["name"] == "host"), None)
    if pinned and host:
        lines.append(f"host tier load rate {host['load_bandwidth'] / 1e9:.2f} GB/s vs pinned copy "
                     f"{pinned / 1e9:.2f} GB/s ({host['load_bandwidth'] / pinned:.0%})")
    turned_down = ", ".join(f"{t['name']} {t.get('turned_down', 0)}" for t in on["tiers"])
    lines.append(f"lookups the load gate left to recompute (tier slower than prefill), per tier: {turned_down}")
    if host:
        lines.append(f"engine-thread seconds saving evicted blocks to the host tier: {host['save_seconds']:.2f} "
                     f"(of {on['elapsed_s']:.2f} s); blocks dropped while the tier below was behind: "
                     f"{host.get('write_drops', 0)}")
    costs = on.get("block_seconds") or {}
    if costs:
        lines.append("one block, the load gate's figures (recompute: its fitted prefill cost): "
                     + ", ".join(f"{name} {seconds * 1e6:.1f} us" for name, seconds in costs.items()))
        bound = _prefill_bound(off, on, costs)
        if bound is not None:
            lines.append(f"prefill device time device-only / tiers at best (loads fully beside compute): {bound:.2f}x")
    copy_waits = on.get("copy_waits")
    if copy_waits:
        lines.append("device copies by what they waited for (nothing / the steps that used their blocks / all "
                     "queued compute): " + " / ".join(str(copy_waits[k]) for k in ("none", "step", "all")))
    waits = ", ".join(f"{t['name']} {t.get('wait_seconds', 0.0):.2f}" for t in on["tiers"])
    lines.append(f"engine-thread seconds waiting for loads (nothing else could run), per tier: {waits}")
    ungated = results.get(UNGATED)
    if ungated is not None:
        lines.append(f"output tok/s tiers with / without the load gate: "
                     f"{on['output_tokens_per_s'] / ungated['output_tokens_per_s']:.2f}x")
    lines.append(f"greedy tokens identical with tiers on and off: {results['same_tokens']}")
    return lines


def _prefill_bound(off: dict[str, Any], on: dict[str, Any], costs: dict[str, float]) -> float | None:
    """How much less prefill time the tiers can give at most: device-only recomputes its misses;
    with tiers the misses are recomputed while the hits below the pool load on the copy engine
    beside them, so the slower of the two counts (each in recompute-block units)."""
    recompute = costs.get("recompute")
    if not recompute:
        return None
    loaded = sum(rate * costs.get(name, recompute) / recompute
                 for name, rate in on["hit_rate"].items() if name != "device")
    with_tiers = max(1.0 - on["combined_hit_rate"], loaded)
    return (1.0 - off["combined_hit_rate"]) / with_tiers if with_tiers > 0 else None


def _notes() -> list[str]:
    return ["hit rate = prompt tokens served from cached blocks / prompt tokens looked up over the timed turns; "
            "device = hits in the device pool, host / disk = blocks loaded from that tier",
            "each turn submits every conversation at once (with a max concurrency: turn-major order, at most that "
            "many in flight); the histories include the generated tokens",
            "policy hit rates: the turns' prompts as block chains, replayed one request at a time through a "
            "KV manager with the device pool's block count"]


def _figures(results: dict[str, Any]) -> dict[str, Any]:
    panels = {
        "combined hit rate": {m: results[m]["combined_hit_rate"] for m in _modes(results)},
        "mean TTFT ms": {m: results[m]["ttft_ms"].get("mean", 0.0) for m in _modes(results)},
        "output tok/s": {m: results[m]["output_tokens_per_s"] for m in _modes(results)},
        "policy hit rate": dict(results["policies"]),
    }
    return {"tiers": panel_bars(panels, "Multi-turn conversations: KV tiers off and on")}
