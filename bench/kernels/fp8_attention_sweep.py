"""Decode attention over an fp8 (E4M3) KV cache against a bf16 cache, per kernel configuration (issue 15:
an fp8 cache should cut decode attention time about in half, as it halves the bytes read).

Run from the repository root on a CUDA machine:

    PYTHONPATH=.:sagellm_cuda python3 bench/kernels/fp8_attention_sweep.py [--seqs 256] [--ctx 1024]

Qwen3-0.6B's attention shape (16 query heads, 8 KV heads, head dim 128, block size 16), a CUDA graph over
8 layers' caches (as check_attention.py times decode); prints us per layer, the KV bandwidth, and each
fp8 row as a ratio to the best bf16 row of the same context.
"""

from __future__ import annotations

import argparse
import itertools
import sys

import torch

sys.path.insert(0, "bench/kernels")
from check_attention import graph_ms, make_case  # noqa: E402  (the same case builder and timer)

from sagellm_cuda.attention import _alloc_scratch, decode_attention  # noqa: E402


def sweep(seqs: int, ctx: int, layers: int = 8) -> list[tuple[str, float, float]]:
    hq, hkv, d = 16, 8, 128
    query, _, _, _, _, meta, kv = make_case([ctx - 1] * seqs, [], hq, hkv, d, 16, torch.bfloat16, "cuda", seed=7,
                                            extra_blocks=0, layers=layers, return_kv=True)
    caches = {"bf16": kv, "fp8": kv.to(torch.float8_e4m3fn)}
    out = torch.empty_like(query)
    scratch = _alloc_scratch(seqs, hq, 1, d, query.device)
    rows = []
    for name, cache in caches.items():
        kv_bytes = 2 * seqs * ctx * hkv * d * cache.element_size()
        if name == "fp8":  # the f16 widening (the default) over more tiles; bf16 dots at the former default
            configs = [*itertools.product((64, 128, 256), (1, 2, 4), (3, 4), (True,)), (64, 4, 3, False)]
        else:
            configs = list(itertools.product((64, 128), (2, 4), (3,), (None,)))
        for block_n, warps, stages, kv_f16 in configs:
            def step(block_n=block_n, warps=warps, stages=stages, kv_f16=kv_f16, cache=cache):
                for layer in range(layers):
                    decode_attention(query, cache[layer, 0], cache[layer, 1], out, meta.seq_lens, meta.block_tables,
                                     seqs, d ** -0.5, block_n=block_n, num_warps=warps, num_stages=stages,
                                     scratch=scratch, kv_f16=kv_f16)
            try:
                ms = graph_ms(step, layers)
            except Exception as error:  # a configuration the compiler refuses (shared memory): skip it
                print(f"  {name} block_n={block_n} warps={warps} stages={stages}: {type(error).__name__}")
                continue
            tag = f"{name} block_n={block_n} warps={warps} stages={stages}" + (f" f16={kv_f16}" if name == "fp8" else "")
            rows.append((tag, ms * 1e3, kv_bytes / ms / 1e6))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seqs", type=int, default=256)
    parser.add_argument("--ctx", type=int, nargs="+", default=[1024])
    args = parser.parse_args()
    print(torch.cuda.get_device_name(), "torch", torch.__version__)
    for ctx in args.ctx:
        rows = sweep(args.seqs, ctx)
        best_bf16 = min(us for tag, us, _ in rows if tag.startswith("bf16"))
        print(f"\n{args.seqs} seqs x {ctx} ctx, Hq/Hkv/D 16/8/128: us per layer, GB/s of KV, bf16-best / row")
        for tag, us, gbps in sorted(rows, key=lambda r: r[1]):
            print(f"  {tag:48s} {us:8.1f} us {gbps:8.0f} GB/s  {best_bf16 / us:5.2f}x")


if __name__ == "__main__":
    main()
