"""How much of a CPU batch-1 decode token the weight-only GEMMs take: the default model's greedy decode
timed as it is, then with every packed GEMM replaced by a preallocated zero tensor (the tokens are
then meaningless; only the time counts). The difference is the GEMMs; the rest is norms, rotary,
attention, casts and the engine's host work.

    python bench/cpu_gemm_share.py [--input-len 128] [--output-len 32] [--rounds 3]
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

import sagellm_core.models.lean_projection as lean_projection
from sagellm_core.config import EngineConfig
from sagellm_core.engine import LLMEngine
from quant_cpu_latency import prompt_ids, time_decode  # bench/ is the script's directory


def zero_gemm() -> Any:
    """A stand-in for `cpu_linear.weight_only_gemm` returning a cached zero [M, N] bf16 tensor."""
    cache: dict[tuple[int, int], torch.Tensor] = {}

    def gemm(x: torch.Tensor, qweight: torch.Tensor, params: torch.Tensor, group_size: int,
             dense: torch.Tensor | None, dense_min_rows: int) -> torch.Tensor:
        n = params.shape[1] if group_size else params.shape[0]  # int4: [K / group, N, 2]; int8: [N]
        key = (x.shape[0], n)
        if key not in cache:
            cache[key] = torch.zeros(key, dtype=torch.bfloat16)
        return cache[key]

    return gemm


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    engine = LLMEngine(EngineConfig.from_dict({"model": {"quantization": "auto"}, "backend": {"name": "cpu"}}))
    ids = prompt_ids(engine, args.input_len)
    time_decode(engine, ids, 8)

    def best() -> float:
        return min(time_decode(engine, ids, args.output_len)[0] for _ in range(args.rounds)) * 1e3

    full = best()
    lean_projection.weight_only_gemm = zero_gemm()  # the lean decoder's projections call it by this name
    rest = best()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}")
    print(f"decode {full:.2f} ms/token; without the GEMMs {rest:.2f} ms; the GEMMs {full - rest:.2f} ms "
          f"({(full - rest) / full:.0%})")


if __name__ == "__main__":
    main()
