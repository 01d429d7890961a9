"""Write-back vs write-through on the CPU: the same multi-turn workload (every conversation's history
re-sent each turn, working set several times the device pool) through the default model with the
host and disk tiers, once per ``kv_tiers.write_mode``; prints wall time, blocks copied down and the
host time those copies took.

    python bench/tiers_write_mode.py [--conversations 8 --turns 3 --system-len 128 --user-len 32]
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time

from sagellm_core import LLM, SamplingParams
from sagellm_core.config import EngineConfig


def run(mode: str, args: argparse.Namespace, disk: str) -> dict[str, float]:
    config = EngineConfig.from_dict({"kv_cache": {"num_blocks": args.num_blocks},
                                     "kv_tiers": {"host_bytes": args.host_bytes, "disk_path": disk,
                                                  "write_mode": mode}})
    rng = random.Random(0)
    with LLM(config=config) as llm:
        vocab = llm.engine.vocab_size
        system = [rng.randrange(100, vocab) for _ in range(args.system_len)]
        histories = [list(system) for _ in range(args.conversations)]
        params = SamplingParams(max_tokens=args.output_len, ignore_eos=True, temperature=0.0)
        start = time.perf_counter()
        for _ in range(args.turns):
            for history in histories:
                history.extend(rng.randrange(100, vocab) for _ in range(args.user_len))
            outs = llm.generate([list(h) for h in histories], params, use_tqdm=False)
            for history, out in zip(histories, outs):
                history.extend(out.outputs[0].token_ids)
        elapsed = time.perf_counter() - start
        stats = llm.get_stats()
        host = stats["kv_tiers"][0]
        return {"elapsed_s": elapsed, "blocks_copied_down": host["stores"], "save_seconds": host["save_seconds"],
                "hit_rate": stats["kv_pools"][0].hit_rate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=8)
    parser.add_argument("--turns", type=int, default=3)
    parser.add_argument("--system-len", type=int, default=128)
    parser.add_argument("--user-len", type=int, default=32)
    parser.add_argument("--output-len", type=int, default=8)
    parser.add_argument("--num-blocks", type=int, default=48)
    parser.add_argument("--host-bytes", type=int, default=64 << 20)
    args = parser.parse_args()
    for mode in ("back", "through"):
        with tempfile.TemporaryDirectory() as disk:
            r = run(mode, args, disk)
        print(f"write-{mode}: {r['elapsed_s']:.1f} s, {r['blocks_copied_down']} blocks copied down in "
              f"{r['save_seconds'] * 1000:.1f} ms, hit rate {r['hit_rate']:.3f}", flush=True)


if __name__ == "__main__":
    main()
