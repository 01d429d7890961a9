"""Where the engine thread's time goes with KV tiers on a device: `sagellm bench multiturn`'s workload
(conversations sharing a system prompt, each turn re-sending its history) driven through `LLMEngine`
on the calling thread under cProfile, with the device pool a fifth of the working set, a host tier
twice the pool and a disk tier; CUDA's synchronizing calls are counted (torch's sync debug mode).

    python bench/tiers_profile.py --shape qwen3-0.6b [--conversations 32 --turns 4 --top 45]

Prints the tiers' counters, the seconds per turn, the synchronizing calls and the top functions by own
time and by cumulative time over the turns after the first.
"""

from __future__ import annotations

import argparse
import cProfile
import json
import pstats
import random
import tempfile
import time
import warnings
from pathlib import Path

import torch

from sagellm_bench.shapes import write_shape
from sagellm_core.config import EngineConfig
from sagellm_core.engine import LLMEngine
from sagellm_core.sampling_params import SamplingParams


def turn(engine: LLMEngine, histories: list[list[int]], user_len: int, output_len: int, rng: random.Random) -> None:
    """One turn: every conversation sends its history plus a new user message; the outputs join it."""
    params = SamplingParams(max_tokens=output_len, temperature=0.0, ignore_eos=True)
    ids = {}
    for index, history in enumerate(histories):
        history += [rng.randrange(100, 40000) for _ in range(user_len)]
        ids[engine.add_request(list(history), params, stream=False)] = index
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                histories[ids[out.request_id]] += list(out.outputs[0].token_ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="qwen3-0.6b")
    parser.add_argument("--conversations", type=int, default=32)
    parser.add_argument("--turns", type=int, default=4)
    parser.add_argument("--system-len", type=int, default=1024)
    parser.add_argument("--user-len", type=int, default=256)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--top", type=int, default=45)
    parser.add_argument("--backend", default="cuda")
    args = parser.parse_args()
    rng = random.Random(0)
    working_set = args.conversations * (args.system_len + args.turns * (args.user_len + args.output_len))
    with tempfile.TemporaryDirectory() as directory:
        model = write_shape(args.shape, directory)
        shape = json.loads((Path(model) / "config.json").read_text())
        head_dim = shape.get("head_dim") or shape["hidden_size"] // shape["num_attention_heads"]
        block_bytes = shape["num_hidden_layers"] * 2 * shape["num_key_value_heads"] * head_dim * 16 * 2
        blocks = working_set // 16 // 5
        engine = LLMEngine(EngineConfig.from_dict({
            "model": {"path": str(model), "dtype": "bfloat16", "load_format": "dummy"},
            "backend": {"name": args.backend}, "scheduler": {"max_num_seqs": 512, "max_num_batched_tokens": 16384},
            "kv_cache": {"num_blocks": blocks, "block_size": 16},
            "kv_tiers": {"host_bytes": 2 * blocks * block_bytes, "disk_path": f"{directory}/disk"}}))
        cuda = torch.cuda.is_available() and args.backend == "cuda"
        system = [rng.randrange(100, 40000) for _ in range(args.system_len)]
        histories = [list(system) for _ in range(args.conversations)]
        turn(engine, histories, args.user_len, args.output_len, rng)
        profile, seconds, syncs = cProfile.Profile(), [], 0
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.set_sync_debug_mode("warn")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for _ in range(args.turns - 1):
                start = time.perf_counter()
                profile.enable()
                turn(engine, histories, args.user_len, args.output_len, rng)
                profile.disable()
                seconds.append(round(time.perf_counter() - start, 3))
            syncs = len(caught)
            where = sorted({str(w.filename) + ":" + str(w.lineno) for w in caught})[:20]
        if cuda:
            torch.cuda.set_sync_debug_mode(0)
        print("pool blocks", blocks, "seconds per turn", seconds, "synchronizing calls", syncs)
        print("sync sites", where)
        for tier in engine.get_stats()["kv_tiers"]:
            print(tier)
        print("phases", {k: round(v, 3) for k, v in engine.phase_seconds.items()})
        stats = pstats.Stats(profile)
        stats.sort_stats("tottime").print_stats(args.top)
        stats.sort_stats("cumulative").print_stats(args.top)
        engine.release()


if __name__ == "__main__":
    main()
