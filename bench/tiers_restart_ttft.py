"""TTFT of a long prompt computed cold vs answered from the disk KV tier by a restarted engine.

Each phase runs in its own process (a restart for real): ``cold`` computes the prompt with an empty
disk tier and shuts down (writing its cached blocks to disk); ``disk`` starts a new engine on the
same directory and sends the same prompt. Both report TTFT (one output token) and the greedy tokens.

    python bench/tiers_restart_ttft.py --prompt-len 2048 [--model PATH] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import tempfile
import time


def phase(disk: str, prompt_len: int, model: str | None, output_len: int) -> dict[str, object]:
    from sagellm_core import LLM, SamplingParams

    config = {"kv_tiers": {"disk_path": disk}, "model": {"path": model} if model else {}}
    from sagellm_core.config import EngineConfig

    with LLM(config=EngineConfig.from_dict(config)) as llm:
        vocab = llm.engine.vocab_size
        rng = random.Random(0)
        prompt = [rng.randrange(100, vocab) for _ in range(prompt_len)]
        llm.generate([[1, 2, 3, 4]], SamplingParams(max_tokens=2), use_tqdm=False)  # warm-up
        start = time.perf_counter()
        first = llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0.0), use_tqdm=False)[0]
        ttft = time.perf_counter() - start
        more = llm.generate([prompt], SamplingParams(max_tokens=output_len, temperature=0.0), use_tqdm=False)[0]
        pool = llm.get_stats()["kv_pools"][0]
        return {"ttft_s": ttft, "first_token": list(first.outputs[0].token_ids),
                "tokens": list(more.outputs[0].token_ids), "cached_tokens": first.metrics.num_cached_tokens,
                "disk_hit_tokens": pool.tier_hit_tokens[0] if pool.tier_hit_tokens else 0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt-len", type=int, default=2048)
    parser.add_argument("--output-len", type=int, default=8)
    parser.add_argument("--model", default=None)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--phase", choices=["cold", "disk"], default=None, help=argparse.SUPPRESS)
    parser.add_argument("--disk", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phase is not None:
        print(json.dumps(phase(args.disk, args.prompt_len, args.model, args.output_len)))
        return
    rows = []
    for _ in range(args.repeats):
        with tempfile.TemporaryDirectory(prefix="sagellm-restart-") as disk:
            result = {}
            for name in ("cold", "disk"):
                command = [sys.executable, __file__, "--phase", name, "--disk", disk, "--prompt-len",
                           str(args.prompt_len), "--output-len", str(args.output_len)]
                if args.model:
                    command += ["--model", args.model]
                out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
                result[name] = json.loads(out.strip().splitlines()[-1])
            rows.append(result)
            cold, warm = result["cold"], result["disk"]
            print(f"cold TTFT {cold['ttft_s'] * 1000:.0f} ms, restarted from disk {warm['ttft_s'] * 1000:.0f} ms "
                  f"({cold['ttft_s'] / warm['ttft_s']:.1f}x), disk hit tokens {warm['disk_hit_tokens']}, "
                  f"same tokens: {cold['tokens'] == warm['tokens']}", flush=True)
    cold_ms = sorted(r["cold"]["ttft_s"] for r in rows)[len(rows) // 2] * 1000
    disk_ms = sorted(r["disk"]["ttft_s"] for r in rows)[len(rows) // 2] * 1000
    print(f"median over {len(rows)}: cold {cold_ms:.0f} ms, from disk {disk_ms:.0f} ms ({cold_ms / disk_ms:.1f}x)")


if __name__ == "__main__":
    main()
