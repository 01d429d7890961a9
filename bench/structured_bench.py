"""Throughput with a JSON-schema constraint on every request vs unconstrained, in the same process.

    .venv/bin/python bench/structured_bench.py [--model PATH | --model-shape qwen3-0.6b --tokenizer DIR]
        [--requests 32] [--max-tokens 64] [--rounds 2] [--backend cpu|cuda] [--dtype ...]

Rounds alternate (free, constrained, free, constrained, ...) so load drift on a shared machine hits
both alike. Both runs generate exactly ``--max-tokens`` tokens per request: EOS is ignored, and the
schema (an array of at least ``--max-tokens + 1`` strings) cannot be complete earlier, so the
constrained run does the same work plus the masks; random weights (``--model-shape``) produce
garbage, but the grammar still constrains every token. Printed: a header (command, hardware,
versions), each round, then unconstrained and constrained output tok/s, their ratio, the tokens of
both runs and the host time per step of computing masks (llguidance, per row too; the part on the
helper thread, overlapped with the engine thread's output processing, and the time the engine
thread waited for it) and applying them.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from sagellm_core import LLM, SamplingParams

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def array_schema(max_tokens: int) -> dict[str, Any]:
    """A JSON array of strings that cannot close within ``max_tokens`` tokens (one token per item at
    least), so a constrained request runs to its length like a free one."""
    return {"type": "array", "items": {"type": "string"}, "minItems": max_tokens + 1}


def run(llm: LLM, prompts: list[str], params: SamplingParams) -> tuple[float, int]:
    """(seconds, output tokens) of one batch run to completion."""
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    return seconds, sum(len(c.token_ids) for out in outputs for c in out.outputs)


def header(args: argparse.Namespace) -> dict[str, Any]:
    """What ran where: the command, the hardware and the software versions."""
    import llguidance
    import transformers

    from sagellm_core import __version__

    info: dict[str, Any] = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
        "cpu": _cpu_name(), "cores": len(os.sched_getaffinity(0)), "load_avg": os.getloadavg(),
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "llguidance": getattr(llguidance, "__version__", _dist_version("llguidance")), "sagellm": __version__,
        "torch_threads": torch.get_num_threads(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _dist_version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def model_config(args: argparse.Namespace, directory: str) -> dict[str, Any]:
    """The engine config: the named model, or a random-weight model of ``--model-shape`` with the
    tokenizer of ``--tokenizer`` (its vocabulary may be smaller than the shape's: the rest is masked)."""
    config: dict[str, Any] = {"scheduler": {"max_num_seqs": args.max_num_seqs}}
    if args.backend:
        config["backend"] = {"name": args.backend}
    if args.model_shape:
        from sagellm_bench.shapes import write_shape

        model_dir = write_shape(args.model_shape, Path(directory) / args.model_shape)
        for name in TOKENIZER_FILES:
            if (Path(args.tokenizer) / name).exists():
                shutil.copy(Path(args.tokenizer) / name, model_dir / name)
        config["model"] = {"path": str(model_dir), "load_format": "dummy"}
    elif args.model:
        config["model"] = {"path": args.model}
    if args.dtype:
        config.setdefault("model", {})["dtype"] = args.dtype
    return config


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model path (default: the embedded default model)")
    parser.add_argument("--model-shape", default=None, help="random weights of a named shape (sagellm_bench.shapes)")
    parser.add_argument("--tokenizer", default=None, help="directory with tokenizer.json, for --model-shape")
    parser.add_argument("--backend", default=None, help="backend name (default: the engine's choice)")
    parser.add_argument("--dtype", default=None)
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    if args.model_shape and not args.tokenizer:
        parser.error("--model-shape needs --tokenizer DIR (structured outputs need a real tokenizer)")
    return args


def main() -> None:
    args = parse_args()
    print(json.dumps(header(args), indent=1), flush=True)
    with tempfile.TemporaryDirectory() as directory, LLM(config=model_config(args, directory)) as llm:
        prompts = [f"Person number {i}, described as a JSON list of short strings:" for i in range(args.requests)]
        common = {"max_tokens": args.max_tokens, "temperature": 0.7, "seed": 0, "ignore_eos": True}
        free = SamplingParams(**common)
        constrained = SamplingParams(**common, structured_outputs={"json": array_schema(args.max_tokens)})
        run(llm, prompts[:2], constrained)  # warm-up: the llguidance tokenizer view and the grammar cache
        run(llm, prompts[:2], free)
        stats = llm.engine.structured.stats
        warm = _counters(stats)
        rounds: dict[str, list[tuple[float, int]]] = {"free": [], "constrained": []}
        for _ in range(args.rounds):
            for name, params in (("free", free), ("constrained", constrained)):
                seconds, tokens = run(llm, prompts, params)
                rounds[name].append((seconds, tokens))
                print(f"{name:12s} {tokens:6d} tokens in {seconds:7.2f} s = {tokens / seconds:7.1f} tok/s", flush=True)
        print(json.dumps(summary(args, rounds, stats, warm), indent=1))


def _counters(stats: Any) -> dict[str, float]:
    """The structured outputs' counters (`StructuredStats`) now."""
    return {name: getattr(stats, name) for name in ("mask_seconds", "helper_seconds", "wait_seconds",
                                                     "apply_seconds", "masked_rows", "masked_steps")}


def summary(args: argparse.Namespace, rounds: dict[str, list[tuple[float, int]]], stats: Any,
            warm: dict[str, float]) -> dict[str, Any]:
    """Totals over the rounds, the ratio, and the host mask time of the constrained rounds: computed
    (wherever), on the helper thread (overlapped with the engine thread's output processing), waited
    for, and the engine thread's share (computed in line + waited + applied) of the constrained time."""
    delta = {name: value - warm[name] for name, value in _counters(stats).items()}
    rows, steps = max(delta["masked_rows"], 1), max(delta["masked_steps"], 1)
    engine_thread = delta["mask_seconds"] - delta["helper_seconds"] + delta["wait_seconds"] + delta["apply_seconds"]
    seconds = {name: sum(s for s, _ in runs) for name, runs in rounds.items()}
    tokens = {name: sum(t for _, t in runs) for name, runs in rounds.items()}
    rates = {name: tokens[name] / seconds[name] for name in rounds}
    per_round = {name: [round(t / s, 1) for s, t in runs] for name, runs in rounds.items()}
    return {
        "requests": args.requests, "max_tokens": args.max_tokens, "rounds": args.rounds,
        "free_tokens": tokens["free"], "constrained_tokens": tokens["constrained"],
        "free_tok_s": round(rates["free"], 1), "constrained_tok_s": round(rates["constrained"], 1),
        "free_tok_s_per_round": per_round["free"], "constrained_tok_s_per_round": per_round["constrained"],
        "ratio": round(rates["constrained"] / rates["free"], 3),
        "mask_ms_per_step": round(1000 * delta["mask_seconds"] / steps, 3),
        "mask_on_helper_ms_per_step": round(1000 * delta["helper_seconds"] / steps, 3),
        "mask_wait_ms_per_step": round(1000 * delta["wait_seconds"] / steps, 3),
        "apply_ms_per_step": round(1000 * delta["apply_seconds"] / steps, 3),
        "mask_us_per_row": round(1e6 * delta["mask_seconds"] / rows, 1),
        "masked_steps": int(delta["masked_steps"]), "masked_rows": int(delta["masked_rows"]),
        "mask_share_of_constrained_time": round(engine_thread / seconds["constrained"], 4),
    }


if __name__ == "__main__":
    main()
