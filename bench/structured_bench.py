"""Throughput with a JSON-schema constraint on every request vs unconstrained, in the same process.

    .venv/bin/python bench/structured_bench.py [--model PATH] [--requests 16] [--max-tokens 64] [--rounds 2]

Rounds alternate (free, constrained, free, constrained, ...) so load drift on a shared machine hits
both alike. Output tokens per second are compared; the constrained runs also report the host time
spent computing masks (llguidance) and applying them (bitmask -> logits), per step and per row.
Constrained requests stop when their JSON is complete, free ones run to ``--max-tokens``
(``ignore_eos``), so tokens per second, not requests per second, is the fair figure.
"""

from __future__ import annotations

import argparse
import json
import time

from sagellm_core import LLM, SamplingParams

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "email": {"type": "string"},
        "address": {"type": "object", "properties": {"street": {"type": "string"}, "city": {"type": "string"},
                                                     "country": {"type": "string"}},
                    "required": ["street", "city", "country"]},
        "interests": {"type": "array", "items": {"type": "string"}},
        "status": {"enum": ["active", "inactive", "pending"]},
    },
    "required": ["name", "age", "email", "address", "interests", "status"],
}


def run(llm: LLM, prompts: list[str], params: SamplingParams) -> tuple[float, int]:
    """(seconds, output tokens) of one batch run to completion."""
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    return seconds, sum(len(c.token_ids) for out in outputs for c in out.outputs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="model path (default: the embedded default model)")
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    with LLM(args.model, backend={"name": "cpu"} if args.model is None else {}) as llm:
        chat = [llm.apply_chat_template([{"role": "user", "content": f"Describe person number {i} as JSON: name, "
                                                                      "age, email, address, interests, status."}])
                for i in range(args.requests)]
        free = SamplingParams(max_tokens=args.max_tokens, temperature=0.7, seed=0, ignore_eos=True)
        constrained = SamplingParams(max_tokens=args.max_tokens, temperature=0.7, seed=0,
                                     structured_outputs={"json": SCHEMA})
        run(llm, chat[:2], constrained)  # warm-up: the llguidance tokenizer view and the grammar cache
        stats = llm.engine.structured.stats
        warm = (stats.mask_seconds, stats.apply_seconds, stats.masked_rows, stats.masked_steps)
        totals = {"free": [0.0, 0], "constrained": [0.0, 0]}
        for _ in range(args.rounds):
            for name, params in (("free", free), ("constrained", constrained)):
                seconds, tokens = run(llm, chat, params)
                totals[name][0] += seconds
                totals[name][1] += tokens
                print(f"{name:12s} {tokens:6d} tokens in {seconds:7.2f} s = {tokens / seconds:7.1f} tok/s", flush=True)
        mask_s, apply_s = stats.mask_seconds - warm[0], stats.apply_seconds - warm[1]
        rows, steps = stats.masked_rows - warm[2], stats.masked_steps - warm[3]
        free_rate = totals["free"][1] / totals["free"][0]
        constrained_rate = totals["constrained"][1] / totals["constrained"][0]
        print(json.dumps({
            "requests": args.requests, "max_tokens": args.max_tokens, "rounds": args.rounds,
            "free_tok_s": round(free_rate, 1), "constrained_tok_s": round(constrained_rate, 1),
            "ratio": round(constrained_rate / free_rate, 3),
            "mask_ms_per_step": round(1000 * mask_s / max(steps, 1), 3),
            "apply_ms_per_step": round(1000 * apply_s / max(steps, 1), 3),
            "mask_ms_per_row": round(1000 * mask_s / max(rows, 1), 4),
            "mask_share_of_constrained_time": round((mask_s + apply_s) / totals["constrained"][0], 4),
        }, indent=1))


if __name__ == "__main__":
    main()
