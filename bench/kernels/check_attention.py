"""Check and time the Triton paged-attention kernels (sagellm_cuda/sagellm_cuda/attention.py).

Run from the repository root on a CUDA machine:

    PYTHONPATH=.:sagellm_cuda python3 bench/kernels/check_attention.py [--quick] [--no-bench]

(a) correctness against `reference_paged_attention` (fp32 oracle on upcast inputs) over many random
    shapes: mixed decode + prefill batches with cached prefixes, GQA 1/4/8, fp32/bf16/fp16, block
    sizes 16/32, sliding window on/off, contexts up to 4096, a CUDA-graph capture/replay of the
    decode path; every output is poisoned with NaN first so unwritten elements fail.
(b) decode timings (triton.testing.do_bench, median, L2 flushed) with the KV bytes read turned into
    bandwidth and compared with a device-to-device copy measured in the same run.
(c) prefill timings, 8 x 512 tokens, with and without a cached prefix; KV write timings.
On a CPU-only machine, TRITON_INTERPRET=1 runs a small subset of (a) through the Triton interpreter
(fp32 / fp16 only: Triton 3.6's interpreter computes bf16 dots wrongly, so its bf16 cases fail there).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import random
import sys
import time

import torch
import triton

if os.environ.get("TRITON_INTERPRET") == "1":
    # Triton 3.6's interpreter calls int() on 1-element arrays, which NumPy >= 2.4 refuses.
    import triton.runtime.interpreter as _interp

    _orig_patch = _interp._patch_lang_tensor

    def _patch_lang_tensor(tensor, scope):
        _orig_patch(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    _interp._patch_lang_tensor = _patch_lang_tensor

from sagellm_core.attention.metadata import AttentionMetadata  # noqa: E402
from sagellm_core.attention.reference import reference_paged_attention
from sagellm_cuda.attention import (  # noqa: E402
    _alloc_scratch,
    decode_attention,
    prefill_attention,
    triton_paged_attention,
    write_kv_cache,
)


# ------------------------------------------------------------------------------------------ cases


def make_case(decode_ctx, prefills, hq, hkv, d, block_size, dtype, device, seed, extra_blocks=7, layers=2,
              return_kv=False):
    """A random step: ``decode_ctx`` are the decodes' cached lengths (seq_len = ctx + 1); ``prefills``
    are (cached prefix, new tokens). Returns (query, key, value, k_cache, v_cache, meta)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    rng = random.Random(seed)
    q_lens = [1] * len(decode_ctx) + [n for _, n in prefills]
    seq_lens = [c + 1 for c in decode_ctx] + [c + n for c, n in prefills]
    blocks_per_seq = [math.ceil(s / block_size) for s in seq_lens]
    num_blocks = sum(blocks_per_seq) + extra_blocks
    ids = list(range(num_blocks))
    rng.shuffle(ids)
    max_blocks = max(blocks_per_seq) + 1
    table = torch.zeros((len(seq_lens), max_blocks), dtype=torch.int32)
    cursor = 0
    for i, nb in enumerate(blocks_per_seq):
        table[i, :nb] = torch.tensor(ids[cursor:cursor + nb], dtype=torch.int32)
        cursor += nb
    slots = []
    for i, (s, q) in enumerate(zip(seq_lens, q_lens)):
        for p in range(s - q, s):
            slots.append(int(table[i, p // block_size]) * block_size + p % block_size)
    t = sum(q_lens)
    # One [L, 2, ...] tensor like the backend allocates; use the last layer's (non-leading) views.
    kv = torch.empty((layers, 2, num_blocks, block_size, hkv, d), dtype=dtype, device=device)
    for layer in range(layers):  # fill in slices to bound the fp32 temporary
        for j in range(2):
            kv[layer, j] = torch.randn(kv.shape[2:], generator=gen, device=device).to(dtype)
    query = torch.randn((t, hq, d), generator=gen, device=device).to(dtype)
    # key / value as strided views of a fused qkv projection, as models produce them.
    qkv = torch.randn((t, (hq + 2 * hkv) * d), generator=gen, device=device).to(dtype)
    key = qkv[:, hq * d:(hq + hkv) * d].view(t, hkv, d)
    value = qkv[:, (hq + hkv) * d:].view(t, hkv, d)
    starts = [0]
    for q in q_lens:
        starts.append(starts[-1] + q)
    meta = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=device),
        block_tables=table.to(device),
        query_lens_host=q_lens,
        seq_lens_host=seq_lens,
        num_decodes=len(decode_ctx),
        block_size=block_size,
    )
    if return_kv:
        return query, key, value, kv[-1, 0], kv[-1, 1], meta, kv
    return query, key, value, kv[-1, 0], kv[-1, 1], meta


def fresh_meta(meta):
    return AttentionMetadata(meta.slot_mapping, meta.query_start_loc, meta.seq_lens, meta.block_tables,
                             meta.query_lens_host, meta.seq_lens_host, meta.num_decodes, meta.block_size)


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    return (float((out - ref).norm() / ref.norm().clamp_min(1e-30)), float((out - ref).abs().max()))


def run_check(case, scale, window, dtype):
    query, key, value, k_cache, v_cache, meta = case
    # Oracle: the reference op in fp32 on upcast copies (cache values are exact in fp32).
    kc32, vc32 = k_cache.float().clone(), v_cache.float().clone()
    ref = reference_paged_attention(query.float(), key.float(), value.float(), kc32, vc32, fresh_meta(meta),
                                    scale, window)
    kc, vc = k_cache.clone(), v_cache.clone()
    out = triton_paged_attention(query, key, value, kc, vc, meta, scale, window)
    out2 = triton_paged_attention(query, key, value, kc, vc, meta, scale, window)  # cached plan / extras
    cache_ok = torch.equal(kc.float(), kc32) and torch.equal(vc.float(), vc32)
    # Poisoned run through the two halves: every element must be written.
    poisoned = torch.full_like(query, float("nan"))
    plan = next(v for k, v in meta.extras.items() if isinstance(k, tuple) and k[0] == "triton_plan")
    decode_attention(query, kc, vc, poisoned, meta.seq_lens, meta.block_tables, meta.num_decodes, scale, window,
                     num_splits=plan["num_splits"])
    prefill_attention(query, kc, vc, poisoned, meta.query_start_loc, meta.seq_lens, meta.block_tables,
                      meta.num_decodes, plan["num_prefills"], plan["max_prefill_len"], scale, window)
    nan_free = not (torch.isnan(out).any() or torch.isnan(poisoned).any())
    e1, m1 = rel_err(out, ref)
    e2, _ = rel_err(poisoned, ref)
    same = torch.equal(out, out2)
    tol = 2e-5 if dtype == torch.float32 else 1.2e-2
    ok = cache_ok and nan_free and same and e1 < tol and e2 < tol
    return ok, max(e1, e2), m1, plan["num_splits"], cache_ok, nan_free, same


def correctness_cases(quick: bool):
    r = random.Random(1234)
    cases = []
    maxc = 300 if quick else 4000
    # GQA ratio 1 / 4 / 8 x block size 16 / 32 x fp32 / bf16, two random mixed batches each (one with
    # a sliding window); head dim alternates 64 / 128.
    for dtype in [torch.float32, torch.bfloat16]:
        for (hq, hkv) in [(8, 8), (32, 8), (16, 2)]:
            for bs in [16, 32]:
                for k, window in enumerate([None, r.choice([100, 1000])]):
                    d = 128 if (k + bs // 16) % 2 else 64
                    n_dec = r.choice([0, 1, 3, 9, 20])
                    n_pre = r.choice([0, 1, 2, 3]) if n_dec else r.choice([1, 2, 3])
                    dec = [r.randint(0, maxc) for _ in range(n_dec)]
                    pre = [(r.choice([0, 0, r.randint(1, maxc // 2)]), r.randint(1, 300 if quick else 700))
                           for _ in range(n_pre)]
                    cases.append((dec, pre, hq, hkv, d, bs, dtype, window))
    # Edge shapes: odd head dims, MQA, long single decodes (many splits), chunk ending on block edge,
    # windows larger than the context, tiny windows, a 4096 decode batch.
    extra = [
        ([4095], [], 32, 8, 128, 16, torch.bfloat16, None),
        ([4095], [], 32, 8, 128, 16, torch.float32, 1000),
        ([0, 1, 15, 16, 17, 31, 32], [(0, 1), (16, 16), (31, 33)], 8, 1, 64, 16, torch.float32, None),
        ([100, 2000], [(37, 91)], 12, 4, 96, 16, torch.float32, None),
        ([100, 2000], [(37, 91)], 12, 4, 80, 32, torch.bfloat16, 64),
        ([5, 600], [(500, 300)], 8, 2, 128, 16, torch.float32, 1),
        ([5, 600], [(500, 300)], 8, 2, 128, 16, torch.bfloat16, 100000),
        ([], [(0, 1024)], 16, 8, 128, 16, torch.bfloat16, None),
        ([], [(3072, 1024)], 32, 8, 128, 32, torch.bfloat16, 2048),
        ([1023] * 64, [], 16, 8, 128, 16, torch.bfloat16, None),
        ([3000] * 4, [(1000, 128)] * 2, 64, 8, 128, 16, torch.float16, None),
        ([200] * 3, [(0, 50)], 8, 8, 256, 16, torch.float32, None),
    ]
    if quick:
        extra = [
            ([0, 1, 15, 16, 17, 31, 32], [(0, 1), (16, 16), (31, 33)], 8, 1, 64, 16, torch.float32, None),
            ([40, 200], [(37, 41)], 12, 4, 48, 16, torch.float32, None),
            ([5, 60], [(50, 30)], 8, 2, 32, 16, torch.float32, 7),
            ([300], [], 8, 2, 64, 16, torch.bfloat16, None),
        ]
    return cases + extra


def check_graph_capture(device):
    """Capture the decode path once, then replay it with longer contexts written in place."""
    hq, hkv, d, bs, dtype = 16, 8, 128, 16, torch.bfloat16
    n, max_blocks = 8, 256  # up to 4096 tokens per sequence
    scale = d ** -0.5
    num_blocks = n * max_blocks + 3
    kv = torch.randn((1, 2, num_blocks, bs, hkv, d), device=device).to(dtype)
    k_cache, v_cache = kv[0, 0], kv[0, 1]
    perm = torch.randperm(num_blocks, device=device)[: n * max_blocks].view(n, max_blocks).to(torch.int32)
    block_tables = perm.clone()
    seq_lens = torch.full((n,), 5, dtype=torch.int32, device=device)
    slot_mapping = torch.zeros(n, dtype=torch.int64, device=device)
    query = torch.randn((n, hq, d), device=device).to(dtype)
    key = torch.randn((n, hkv, d), device=device).to(dtype)
    value = torch.randn((n, hkv, d), device=device).to(dtype)
    meta = AttentionMetadata(slot_mapping, torch.arange(n + 1, dtype=torch.int32, device=device), seq_lens,
                             block_tables, [1] * n, [5] * n, n, bs)

    def set_lengths(lengths):
        seq_lens.copy_(torch.tensor(lengths, dtype=torch.int32))
        pos = torch.tensor(lengths, device=device, dtype=torch.int64) - 1
        blocks = block_tables.gather(1, (pos // bs)[:, None]).squeeze(1).long()
        slot_mapping.copy_(blocks * bs + pos % bs)

    set_lengths([5] * n)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(2):
            triton_paged_attention(query, key, value, k_cache, v_cache, meta, scale)  # compile + warm up
    torch.cuda.current_stream().wait_stream(stream)
    meta.extras.clear()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = triton_paged_attention(query, key, value, k_cache, v_cache, meta, scale)
    splits = next(v for k, v in meta.extras.items() if isinstance(k, tuple) and k[0] == "triton_plan")["num_splits"]
    worst = 0.0
    for trial in range(3):
        lengths = [random.randint(1, max_blocks * bs) for _ in range(n)]
        set_lengths(lengths)
        query.copy_(torch.randn_like(query, dtype=torch.float32))
        key.copy_(torch.randn_like(key, dtype=torch.float32))
        value.copy_(torch.randn_like(value, dtype=torch.float32))
        kref, vref = k_cache.float().clone(), v_cache.float().clone()
        ref_meta = AttentionMetadata(slot_mapping.clone(), meta.query_start_loc, seq_lens.clone(), block_tables,
                                     [1] * n, lengths, n, bs)
        ref = reference_paged_attention(query.float(), key.float(), value.float(), kref, vref, ref_meta, scale)
        graph.replay()
        torch.cuda.synchronize()
        worst = max(worst, rel_err(static_out, ref)[0])
    return worst < 1.2e-2, worst, splits


# ------------------------------------------------------------------------------------------ timing


def bench_ms(fn):
    import triton.testing

    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def copy_bandwidth(device):
    src = torch.randn(256 * 1024 * 1024, device=device)  # 1 GiB
    dst = torch.empty_like(src)
    ms = bench_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * src.element_size() / ms / 1e6  # GB/s, read + write


def graph_ms(step, calls):
    """Capture ``step`` (``calls`` launches of the op, one per layer) in a CUDA graph; median ms per call."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        step()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        step()
    return bench_ms(g.replay) / calls


def decode_bench(device, rows, label, n, ctx, hq, hkv, d, dtype, variants, layers):
    """Decode over ``layers`` distinct KV caches (as a model would), replayed from a CUDA graph, so neither
    launch overhead nor a warm L2 flatters the numbers; time per layer."""
    bs = 16
    query, key, value, _, _, meta, kv = make_case([ctx - 1] * n, [], hq, hkv, d, bs, dtype, device, seed=7,
                                                  extra_blocks=0, layers=layers, return_kv=True)
    scale = d ** -0.5
    kv_bytes = 2 * n * ctx * hkv * d * kv.element_size()
    out = torch.empty_like(query)
    for v in variants:
        scratch = _alloc_scratch(n, hq, v.get("num_splits", 1), d, device)

        def step(v=v, scratch=scratch):
            for layer in range(layers):
                decode_attention(query, kv[layer, 0], kv[layer, 1], out, meta.seq_lens, meta.block_tables, n, scale,
                                 scratch=scratch, **v)

        ms = graph_ms(step, layers)
        tag = "kernel " + " ".join(f"{k.replace('num_', '')}={x}" for k, x in v.items())
        rows.append((label, tag, ms * 1e3, kv_bytes / ms / 1e6))
    m2 = fresh_meta(meta)

    def full():
        for layer in range(layers):
            triton_paged_attention(query, key, value, kv[layer, 0], kv[layer, 1], m2, scale)

    ms = graph_ms(full, layers)
    splits = next(v for k, v in m2.extras.items() if isinstance(k, tuple) and k[0] == "triton_plan")["num_splits"]
    rows.append((label, f"full op, graph (auto splits={splits})", ms * 1e3, kv_bytes / ms / 1e6))
    ms = bench_ms(lambda: triton_paged_attention(query, key, value, kv[0, 0], kv[0, 1], m2, scale))
    rows.append((label, "full op, eager 1 layer", ms * 1e3, kv_bytes / ms / 1e6))
    # Peer: torch SDPA over dense (non-paged) per-layer caches of the same size, same graph method.
    kd = torch.randn((layers, n, hkv, ctx, d), device=device, dtype=dtype)
    vd = torch.randn_like(kd)
    qd = query.view(n, hq, 1, d)

    def sdpa():
        for layer in range(layers):
            torch.nn.functional.scaled_dot_product_attention(qd, kd[layer], vd[layer], scale=scale,
                                                             enable_gqa=hq != hkv)

    ms = graph_ms(sdpa, layers)
    rows.append((label, "peer: torch SDPA dense, graph", ms * 1e3, kv_bytes / ms / 1e6))


@triton.jit
def _noop_kernel(x_ptr):
    pass


def host_overhead(device, rows):
    """Host time per eager call (the GPU work is tiny, so the CPU is the bottleneck)."""
    query, key, value, k_cache, v_cache, meta = make_case([15] * 4, [], 16, 8, 128, 16, torch.bfloat16, device,
                                                          seed=1, layers=1)
    out = torch.empty_like(query)
    triton_paged_attention(query, key, value, k_cache, v_cache, meta, 0.1)
    fns = [
        ("empty Triton kernel, 1 arg (floor)", lambda: _noop_kernel[(1,)](out)),
        ("write_kv_cache", lambda: write_kv_cache(key, value, k_cache, v_cache, meta.slot_mapping)),
        ("decode_attention (1 split)", lambda: decode_attention(query, k_cache, v_cache, out, meta.seq_lens,
                                                                meta.block_tables, 4, 0.1)),
        ("triton_paged_attention, plan cached", lambda: triton_paged_attention(query, key, value, k_cache, v_cache,
                                                                               meta, 0.1)),
    ]
    for name, fn in fns:
        fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(500):
            fn()
        host = (time.perf_counter() - t) / 500
        torch.cuda.synchronize()
        rows.append(("host cost per eager call", name, host * 1e6, float("nan")))


def prefill_bench(device, rows, label, n, q_len, prefix, hq, hkv, d, dtype, configs=()):
    bs = 16
    query, key, value, k_cache, v_cache, meta = make_case([], [(prefix, q_len)] * n, hq, hkv, d, bs, dtype, device,
                                                          seed=9, extra_blocks=0, layers=1)
    scale = d ** -0.5
    write_kv_cache(key, value, k_cache, v_cache, meta.slot_mapping)
    out = torch.empty_like(query)
    # causal FLOPs: QK^T and PV over the visible keys
    visible = n * sum(prefix + i + 1 for i in range(q_len))
    flops = 4 * visible * d * hq
    for cfg in configs or [None]:
        ms = bench_ms(lambda: prefill_attention(query, k_cache, v_cache, out, meta.query_start_loc, meta.seq_lens,
                                                meta.block_tables, 0, n, q_len, scale, config=cfg))
        rows.append((label, f"prefill kernel {cfg or 'default'}", ms * 1e3, flops / ms / 1e9))
    ms = bench_ms(lambda: triton_paged_attention(query, key, value, k_cache, v_cache, meta, scale))
    rows.append((label, "full op (write + prefill)", ms * 1e3, flops / ms / 1e9))
    qd = torch.randn((n, hq, q_len, d), device=device, dtype=dtype)
    kd = torch.randn((n, hkv, prefix + q_len, d), device=device, dtype=dtype)
    vd = torch.randn_like(kd)
    if prefix == 0:
        fn = lambda: torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, is_causal=True,  # noqa: E731
                                                                      enable_gqa=hq != hkv)
    else:
        mask = torch.ones(q_len, prefix + q_len, dtype=torch.bool, device=device).tril(prefix)
        fn = lambda: torch.nn.functional.scaled_dot_product_attention(qd, kd, vd, attn_mask=mask,  # noqa: E731
                                                                      enable_gqa=hq != hkv)
    ms = bench_ms(fn)
    rows.append((label, "peer: torch SDPA dense", ms * 1e3, flops / ms / 1e9))


def write_bench(device, rows, t, hkv, d, dtype):
    from sagellm_core.attention.reference import write_kv

    case = make_case([], [(0, t)], 16, hkv, d, 16, dtype, device, seed=3, extra_blocks=4096, layers=1)
    _, key, value, k_cache, v_cache, meta = case
    nbytes = 2 * 2 * t * hkv * d * k_cache.element_size()
    ms = bench_ms(lambda: write_kv_cache(key, value, k_cache, v_cache, meta.slot_mapping))
    rows.append((f"kv write T={t}", "triton kernel", ms * 1e3, nbytes / ms / 1e6))
    ms = bench_ms(lambda: write_kv(key, value, k_cache, v_cache, meta.slot_mapping))
    rows.append((f"kv write T={t}", "index_copy_ (reference)", ms * 1e3, nbytes / ms / 1e6))


# ------------------------------------------------------------------------------------------ main


def guarded(fn, *args, **kwargs):
    """Run one benchmark; a failure is printed and the rest still run."""
    try:
        fn(*args, **kwargs)
    except Exception as exc:  # noqa: BLE001 - a benchmark script reports and goes on
        import traceback

        traceback.print_exc()
        print(f"BENCH FAILED {fn.__name__}{args[2:4]}: {exc!r}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--quick", action="store_true", help="small subset (for the CPU interpreter)")
    parser.add_argument("--no-bench", action="store_true")
    args = parser.parse_args()
    interpret = os.environ.get("TRITON_INTERPRET") == "1"
    device = torch.device("cuda" if torch.cuda.is_available() and not interpret else "cpu")

    print(f"python {platform.python_version()} torch {torch.__version__} triton {triton.__version__} device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    quick = args.quick or device.type == "cpu"
    torch.backends.cuda.matmul.allow_tf32 = False
    t0 = time.time()
    failures = 0
    results = []
    for i, (dec, pre, hq, hkv, d, bs, dtype, window) in enumerate(correctness_cases(quick)):
        case = make_case(dec, pre, hq, hkv, d, bs, dtype, device, seed=100 + i)
        ok, err, maxabs, splits, cache_ok, nan_free, same = run_check(case, d ** -0.5, window, dtype)
        failures += not ok
        maxlen = max(case[5].seq_lens_host)
        line = (f"{'ok ' if ok else 'FAIL'} {str(dtype)[6:]:8s} Hq/Hkv={hq}/{hkv} D={d} bs={bs} win={window} "
                f"dec={len(dec)} pre={len(pre)} maxlen={maxlen} splits={splits} rel={err:.2e} maxabs={maxabs:.2e}"
                + ("" if cache_ok else " CACHE-MISMATCH") + ("" if nan_free else " NaN/UNWRITTEN")
                + ("" if same else " NONDETERMINISTIC"))
        results.append(line)
        print(line, flush=True)
    if device.type == "cuda":
        ok, worst, splits = check_graph_capture(device)
        failures += not ok
        print(f"{'ok ' if ok else 'FAIL'} CUDA graph capture of decode (8 seqs, ctx up to 4096, splits={splits}) "
              f"worst rel={worst:.2e}", flush=True)
    ncases = len(results) + (device.type == "cuda")
    print(f"correctness: {ncases - failures}/{ncases} passed ({time.time() - t0:.0f} s)", flush=True)
    if args.no_bench or device.type != "cuda":
        return 1 if failures else 0

    rows = []
    bw = copy_bandwidth(device)
    rows.append(("device copy 1 GiB", "torch copy_ (read+write)", float("nan"), bw))
    qwen, llama = (16, 8, 128), (32, 8, 128)
    bf16 = torch.bfloat16
    guarded(decode_bench, device, rows, "decode 256x1024 16/8/128 bf16", 256, 1024, *qwen, bf16, layers=8,
            variants=[dict(), dict(num_stages=2), dict(num_stages=4)])
    guarded(decode_bench, device, rows, "decode 64x4096 16/8/128 bf16", 64, 4096, *qwen, bf16, layers=8,
            variants=[dict(num_splits=1)])
    guarded(decode_bench, device, rows, "decode 1x4096 32/8/128 bf16", 1, 4096, *llama, bf16, layers=16,
            variants=[dict(num_splits=32)])
    guarded(decode_bench, device, rows, "decode 1x32768 32/8/128 bf16", 1, 32768, *llama, bf16, layers=8,
            variants=[dict(num_splits=64), dict(num_splits=64, num_stages=4)])
    guarded(decode_bench, device, rows, "decode 32x2048 32/8/128 bf16", 32, 2048, *llama, bf16, layers=8,
            variants=[dict(num_splits=2)])
    cfgs = [None, (128, 128, 8, 3)]
    guarded(prefill_bench, device, rows, "prefill 8x512 16/8/128 bf16", 8, 512, 0, *qwen, bf16, configs=cfgs)
    guarded(prefill_bench, device, rows, "prefill 8x512 32/8/128 bf16", 8, 512, 0, *llama, bf16, configs=cfgs)
    guarded(prefill_bench, device, rows, "prefill 8x512 +1536 prefix 32/8/128", 8, 512, 1536, *llama, bf16,
            configs=cfgs)
    guarded(write_bench, device, rows, 256, 8, 128, torch.bfloat16)
    guarded(write_bench, device, rows, 4096, 8, 128, torch.bfloat16)
    guarded(host_overhead, device, rows)

    print(f"\n== {torch.cuda.get_device_name(device)} | copy bandwidth {bw:.0f} GB/s | "
          f"correctness {ncases - failures}/{ncases} ==")
    print(f"{'case':38s} {'variant':34s} {'us':>9s} {'GB/s|GFLOP/s':>13s} {'%copy':>6s}")
    for label, tag, us, rate in rows:
        pct = f"{100 * rate / bw:5.0f}%" if ("decode" in label or "write" in label) and rate == rate else ""
        print(f"{label:38s} {tag:34s} {us:9.1f} {rate:13.0f} {pct:>6s}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
