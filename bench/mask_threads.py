"""llguidance's host cost per decode step of structured outputs, by thread count, on this machine:
filling the token masks of N constrained rows and advancing their grammars by one token each,
serially in the calling thread and through `llguidance.LLExecutor` pools of several sizes.

    python bench/mask_threads.py --tokenizer .whl/tokenizer [--rows 256] [--steps 64]

The grammar is `bench/structured_bench.py`'s (a JSON array of strings that cannot close); each step
every matcher takes a random token its mask allows, so every pool size walks the same states. Prints
one JSON object: milliseconds per step for the fill and the advance at each size, and the cores.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any

import llguidance
import llguidance.hf
import numpy as np
import torch
from transformers import AutoTokenizer

sys.path.insert(0, str(Path(__file__).parent))
from structured_bench import array_schema  # noqa: E402

from sagellm_core.structured.bitmask import bitmask_words  # noqa: E402
from sagellm_core.structured.grammar import compile_grammar  # noqa: E402
from sagellm_core.structured.params import StructuredOutputsParams  # noqa: E402


def matchers(tokenizer: Any, rows: int, steps: int) -> list[llguidance.LLMatcher]:
    grammar = compile_grammar(StructuredOutputsParams(json=array_schema(steps)))
    prototype = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
    return [prototype.deep_copy() for _ in range(rows)]


def walk(tokenizer: Any, rows: int, steps: int, threads: int) -> dict[str, float]:
    """Milliseconds per step of the fill and of the advance with a pool of ``threads`` (0: serial)."""
    group = matchers(tokenizer, rows, steps)
    pool = llguidance.LLExecutor(num_threads=threads) if threads else None
    words = bitmask_words(tokenizer.vocab_size)
    bitmask = torch.zeros((rows, words), dtype=torch.int32)
    rng = random.Random(0)
    fill = advance = 0.0
    for _ in range(steps):
        tick = time.perf_counter()
        if pool is None:
            for row, matcher in enumerate(group):
                matcher.unsafe_compute_mask_ptr(bitmask[row].data_ptr(), words * 4)
        else:
            pool.unsafe_compute_mask_ptr([(m, row) for row, m in enumerate(group)], bitmask.data_ptr(), words * 4,
                                         rows)
        fill += time.perf_counter() - tick
        tokens = [pick(bitmask[row].numpy(), rng) for row in range(rows)]
        tick = time.perf_counter()
        if pool is None:
            for matcher, token in zip(group, tokens):
                matcher.consume_token(token)
        else:
            pool.consume_token_par(list(zip(group, tokens)))
        advance += time.perf_counter() - tick
    return {"fill_ms": round(1000 * fill / steps, 3), "advance_ms": round(1000 * advance / steps, 3)}


def pick(row: np.ndarray, rng: random.Random) -> int:
    """A random token the packed mask ``row`` allows."""
    allowed = np.flatnonzero(np.unpackbits(row.view(np.uint8), bitorder="little"))
    return int(allowed[rng.randrange(len(allowed))])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizer", required=True)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--threads", type=int, nargs="*", default=[0, 2, 4, 8, 16])
    args = parser.parse_args()
    tokenizer = llguidance.hf.from_tokenizer(AutoTokenizer.from_pretrained(args.tokenizer))
    cores = len(os.sched_getaffinity(0))
    results = {str(threads): walk(tokenizer, args.rows, args.steps, threads) for threads in args.threads}
    print(json.dumps({"command": " ".join(sys.argv), "cores": cores, "rows": args.rows,
                      "by_threads (0: serial)": results}, indent=1))


if __name__ == "__main__":
    main()
