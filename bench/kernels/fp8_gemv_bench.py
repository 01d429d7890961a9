"""Time the weight-only FP8 decode GEMM (sagellm_cuda/sagellm_cuda/fp8_gemv.py) on Llama-3-8B's linear
shapes against ``torch._scaled_mm`` with per-token activation quantization (the layer's path above
16 rows) and a bf16 ``torch.mm``, each as achieved weight bandwidth against a device-to-device copy
measured in the same run (the floor of a weight pass is bytes over that bandwidth).

    PYTHONPATH=.:sagellm_cuda python3 bench/kernels/fp8_gemv_bench.py [--rows 1] [--sweep]

``--sweep`` first times every tile configuration of both kernels (one row; 4 and 16 rows) summed
over the four shapes, prints the five best of each and uses the best for the table. ``--per-shape``
times a wider grid of one-row tiles (down to one weight row per program) on each shape alone and
prints the three best per shape: whether small and large weights want different tiles.
"""

from __future__ import annotations

import argparse
import itertools

import torch
import triton

from sagellm_core.quant.weights import quantize_fp8
from sagellm_cuda.fp8_gemv import DOT_TILES, Tiles, fp8_gemv, row_tiles
from sagellm_cuda.quant import quantize_rows

LLAMA_3_8B = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def copy_bandwidth() -> float:
    """Bytes per second of a 1 GiB device-to-device copy (read + write counted)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = triton.testing.do_bench(lambda: dst.copy_(src))
    return 2 * src.numel() / (ms * 1e-3)


Case = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (x [rows, K] bf16, codes [N, K] e4m3, scales [N])


def make_case(n: int, k: int, rows: int) -> Case:
    qw = quantize_fp8(torch.randn(n, k, device="cuda") * 0.02)
    return torch.randn(rows, k, device="cuda", dtype=torch.bfloat16), qw.codes, qw.scales.float().reshape(-1)


def time_grid(grid: list[Tiles], cases: list[Case], rep: int) -> list[tuple[float, Tiles]]:
    """(ms summed over ``cases``, tiles) for each configuration of ``grid`` the compiler takes, fastest first."""
    timed = []
    for tiles in grid:
        try:
            ms = sum(triton.testing.do_bench(lambda: fp8_gemv(x, codes, scales, tiles), warmup=5, rep=rep)
                     for x, codes, scales in cases)
        except Exception as exc:  # a configuration the compiler cannot fit (shared memory, registers)
            print(f"  {tiles}: {type(exc).__name__}")
            continue
        timed.append((ms, tiles))
    return sorted(timed)


def sweep(rows: int) -> Tiles:
    """The tile configuration with the least summed time over the four shapes at ``rows`` rows."""
    cases = [make_case(n, k, rows) for n, k in LLAMA_3_8B.values()]
    if rows == 1:  # the row kernel: also narrow tiles (more programs), long tiles reduced each step, 16 warps
        grid = [Tiles(n, k, w, 3, r) for n, k, w, r in itertools.product((2, 4, 8, 16), (1024, 2048, 4096), (4, 8, 16),
                                                                          (False, True))
                if not (k * n > 16384 and not r)]  # an unreduced accumulator that large spills
    else:
        grid = [Tiles(n, k, w, st) for n, k, w, st in itertools.product((16, 32, 64), (256, 512, 1024), (4, 8), (3, 4))]
    results = time_grid(grid, cases, rep=20)
    for total, tiles in results[:5]:
        print(f"  rows {rows}: {tiles} {total * 1e3:.1f} us over the four shapes")
    return results[0][1]


def per_shape_sweep() -> None:
    """The three fastest one-row tile configurations of a wide grid on each shape by itself."""
    grid = [Tiles(n, k, w, 3, True) for n, k, w in itertools.product((1, 2, 4, 8), (512, 1024, 2048, 4096, 8192),
                                                                      (1, 2, 4, 8))]
    for name, (n, k) in LLAMA_3_8B.items():
        timed = time_grid(grid, [make_case(n, k, 1)], rep=25)
        for ms, tiles in timed[:3]:
            print(f"  {name} {n}x{k}: {tiles} {ms * 1e3:.1f} us")
        current = [ms for ms, tiles in timed if tiles == row_tiles(k)]
        if current:
            print(f"  {name} {n}x{k}: current row_tiles {current[0] * 1e3:.1f} us")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--sweep-rows", type=int, nargs="+", default=[1, 4], help="which kernels --sweep tunes")
    parser.add_argument("--per-shape", action="store_true", help="the best one-row tiles of each shape alone")
    args = parser.parse_args()
    if args.per_shape:
        per_shape_sweep()
    best: dict[int, Tiles | None] = {1: None, 4: DOT_TILES}  # None: the kernel's own choice (`row_tiles`)
    if args.sweep:
        best.update({rows: sweep(rows) for rows in args.sweep_rows})
    bandwidth = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}; "
          f"copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    print("| shape | rows | fp8_gemv us (GB/s) | _scaled_mm+quant us | bf16 mm us | gemv / floor |")
    print("| --- | --- | --- | --- | --- | --- |")
    total = {"gemv": 0.0, "scaled": 0.0, "bf16": 0.0, "floor": 0.0}
    for name, (n, k) in LLAMA_3_8B.items():
        weight = torch.randn(n, k, device="cuda") * 0.02
        qw = quantize_fp8(weight)
        scales = qw.scales.float().reshape(-1)
        scale_b = scales.reshape(1, -1)
        w16 = weight.to(torch.bfloat16)
        del weight
        for rows in args.rows:
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)

            def scaled() -> torch.Tensor:
                codes, s = quantize_rows(x)
                return torch._scaled_mm(codes, qw.codes.t(), scale_a=s, scale_b=scale_b, out_dtype=torch.bfloat16)

            tiles = best[1] if rows == 1 else best[4]
            gemv_ms = triton.testing.do_bench(lambda: fp8_gemv(x, qw.codes, scales, tiles))
            scaled_ms = triton.testing.do_bench(scaled)
            bf16_ms = triton.testing.do_bench(lambda: x @ w16.t())
            floor_ms = n * k / bandwidth * 1e3  # one pass over the fp8 weight bytes
            if rows == args.rows[0]:
                for key, value in (("gemv", gemv_ms), ("scaled", scaled_ms), ("bf16", bf16_ms), ("floor", floor_ms)):
                    total[key] += value
            print(f"| {name} {n}x{k} | {rows} | {gemv_ms * 1e3:.1f} ({n * k / gemv_ms / 1e6:.0f}) | "
                  f"{scaled_ms * 1e3:.1f} | {bf16_ms * 1e3:.1f} | {gemv_ms / floor_ms:.2f}x |")
    layers = 32
    print(f"Llama-3-8B linears, {args.rows[0]} row(s), 32 layers: fp8_gemv {total['gemv'] * layers:.2f} ms, "
          f"_scaled_mm {total['scaled'] * layers:.2f} ms, bf16 {total['bf16'] * layers:.2f} ms, "
          f"fp8 floor {total['floor'] * layers:.2f} ms")


if __name__ == "__main__":
    main()
