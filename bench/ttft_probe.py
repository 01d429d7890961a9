"""Where a batch-1 request's time to first token goes, through the public `LLM` API (works on any
checkout that has `LLM.submit`): submit -> engine admission -> first schedule -> first token in the
engine -> first token at the caller. Random weights of a real shape; prompts of random token ids.

    python bench/ttft_probe.py --shape llama-3-8b --iters 10
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time

SHAPES = {
    "llama-3-8b": dict(model_type="llama", hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, vocab_size=49152, max_position_embeddings=8192),
    "qwen3-0.6b": dict(model_type="qwen3", hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                       num_attention_heads=16, num_key_value_heads=8, head_dim=128, vocab_size=49152,
                       max_position_embeddings=8192, tie_word_embeddings=True),
}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="llama-3-8b", choices=sorted(SHAPES))
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--input-len", type=int, default=128)
    args = parser.parse_args()
    from transformers import AutoConfig

    from sagellm_core import LLM, SamplingParams

    directory = tempfile.mkdtemp()
    fields = dict(SHAPES[args.shape])
    AutoConfig.for_model(fields.pop("model_type"), **fields).save_pretrained(directory)
    llm = LLM(config={"model": {"path": directory, "load_format": "dummy", "dtype": "bfloat16"},
                      "backend": {"name": "cuda"}})
    rng = random.Random(0)
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    rows = []
    for i in range(args.iters + 3):
        ids = [rng.randrange(1, 40000) for _ in range(args.input_len)]
        start = time.monotonic()
        first = None
        final = None
        for out in llm.submit(ids, params):
            if first is None and out.outputs[0].token_ids:
                first = time.monotonic()
            final = out
        m = getattr(final, "metrics", None)
        if i < 3 or m is None:
            continue
        rows.append({
            "caller_ttft_ms": (first - start) * 1e3,
            "submit_to_admission_ms": (m.arrival_time - start) * 1e3,
            "admission_to_scheduled_ms": (m.first_scheduled_time - m.arrival_time) * 1e3,
            "scheduled_to_first_token_ms": (m.first_token_time - m.first_scheduled_time) * 1e3,
            "engine_first_token_to_caller_ms": (first - m.first_token_time) * 1e3,
        })
    summary = {key: round(statistics.median(r[key] for r in rows), 2) for key in rows[0]}
    stats = llm.get_stats()
    print(json.dumps({"shape": args.shape, "median": summary, "steps": stats.get("steps"),
                      "phase_seconds": stats.get("phase_seconds")}, indent=1))
    llm.shutdown()


if __name__ == "__main__":
    main()
