"""Batch-1 greedy decode of the default model on the CPU backend per quantization, with the weight-read
floor of each (bytes one decode step reads over the measured read bandwidth), and llama.cpp on the
same GGUF file when llama-cpp-python is installed.

    python bench/quant_cpu_latency.py --input-len 128 --output-len 64 --iters 3

Engines are built first, then timed in alternation (one request each per round), so machine load
hits all of them alike; the best round per engine is reported next to the median.
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Any

import torch

from sagellm_core import SamplingParams
from sagellm_bench import floors
from sagellm_core.builtin.cpu_backend import CPUBackend
from sagellm_core.config import EngineConfig
from sagellm_core.engine import LLMEngine
from sagellm_core.models.loader import default_gguf_path

PROMPT_SEED_TEXT = ("The history of the printing press begins in the fifteenth century, when movable type changed "
                    "how books were made, copied and sold across Europe. ")


def prompt_ids(engine: LLMEngine, length: int) -> list[int]:
    ids = engine.encode(PROMPT_SEED_TEXT * (length // 20 + 2))
    return ids[:length]


def time_decode(engine: LLMEngine, ids: list[int], output_len: int) -> tuple[float, list[int]]:
    """Seconds per output token after the first (TPOT) and the generated ids."""
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    request_id = engine.add_request(list(ids), params)
    stamps: list[float] = []
    tokens: list[int] = []
    while engine.has_unfinished():
        for out in engine.step():
            if out.request_id == request_id and out.outputs[0].token_ids:
                stamps.append(time.perf_counter())
                tokens = list(out.outputs[0].token_ids)
    return (stamps[-1] - stamps[0]) / max(len(tokens) - 1, 1), tokens


def llama_cpp_decode(ids_text: str, output_len: int, threads: int) -> tuple[float, list[int]] | None:
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=str(default_gguf_path()), n_ctx=1024, n_threads=threads, verbose=False)
    tokens = llm.tokenize(ids_text.encode(), add_bos=False)
    start = time.perf_counter()
    first = None
    out: list[int] = []
    for token in llm.generate(tokens, temp=0.0, top_k=1, reset=True):
        out.append(token)
        if first is None:
            first = time.perf_counter()
        if len(out) == output_len:
            break
    assert first is not None
    del start
    return (time.perf_counter() - first) / max(len(out) - 1, 1), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=64)
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--methods", nargs="+", default=["none", "int8", "int4", "auto"])
    args = parser.parse_args()

    engines: dict[str, LLMEngine] = {}
    for method in args.methods:
        config = EngineConfig.from_dict({"model": {"quantization": method}, "backend": {"name": "cpu"}})
        engines[method] = LLMEngine(config)
        print(f"built {method}: {engines[method].quantization.summary()}", flush=True)
    first = next(iter(engines.values()))
    ids = prompt_ids(first, args.input_len)
    text = first.tokenizer.decode(ids)
    bandwidth = floors.measure_read_bandwidth(CPUBackend())["bytes_per_s"]
    results: dict[str, list[float]] = {name: [] for name in engines}
    results["llama.cpp"] = []
    outputs: dict[str, list[int]] = {}
    for name, engine in engines.items():  # warm-up
        time_decode(engine, ids, 4)
    for round_index in range(args.iters):
        for name, engine in engines.items():
            tpot, outputs[name] = time_decode(engine, ids, args.output_len)
            results[name].append(tpot)
            print(f"round {round_index}: {name} {tpot * 1e3:.2f} ms/token", flush=True)
        peer = llama_cpp_decode(text, args.output_len, torch.get_num_threads())
        if peer is not None:
            results["llama.cpp"].append(peer[0])
    print(f"CPU read bandwidth {bandwidth / 1e9:.1f} GB/s; prompt {len(ids)} tokens, {args.output_len} greedy tokens; "
          f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"{'engine':<10} {'quantization':<28} {'MiB/token':>9} {'floor ms':>8} {'best ms':>8} {'median ms':>9} "
          f"{'x floor':>7}")
    for name, times in results.items():
        if not times:
            continue
        engine = engines.get(name)
        nbytes = floors.stored_decode_bytes(engine.model) if engine is not None else None
        floor_ms = nbytes / bandwidth * 1e3 if nbytes else float("nan")
        label = engine.quantization.summary() if engine is not None else "GGUF as stored"
        best, median = min(times) * 1e3, statistics.median(times) * 1e3
        print(f"{name:<10} {label[:28]:<28} {(nbytes or 0) / 2**20:>9.1f} {floor_ms:>8.2f} {best:>8.2f} {median:>9.2f} "
              f"{best / floor_ms if nbytes else float('nan'):>7.2f}")
    if "llama.cpp" in results and results["llama.cpp"]:
        peer = min(results["llama.cpp"])
        for name in engines:
            print(f"{name}: {peer / min(results[name]):.2f}x llama.cpp speed")
    reference = outputs.get("none")
    if reference is not None:
        for name, toks in outputs.items():
            same = sum(a == b for a, b in zip(toks, reference))
            print(f"{name}: first {next((i for i, (a, b) in enumerate(zip(toks, reference)) if a != b), len(toks))} "
                  f"tokens equal to none ({same}/{len(reference)} positions)")


if __name__ == "__main__":
    main()
