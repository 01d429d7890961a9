"""Time the fused Triton kernels of sagellm_cuda/sagellm_cuda/fused.py against transformers' modules.

Run from the repository root on a CUDA machine:

    PYTHONPATH=.:sagellm_cuda python3 bench/kernels/check_fused.py [--layers-only]

Every number is GPU time per call from a CUDA graph holding 20 calls (the way decode steps run), the
median of 5 replays, bf16, random weights:
(a) each op, transformers module vs fused kernel: RMSNorm, residual add + RMSNorm, SiLU(gate)*up,
    rotary (Qwen3: with q/k norm), at 1 and 256 tokens, Llama-3-8B and Qwen3-0.6B widths;
(b) GEMMs: separate gate/up and q/k/v projections vs one GEMM over the concatenated weight;
    and down_proj followed by the residual add vs ``addmm_`` into the residual;
(c) one whole decoder layer (attention through SDPA over the step's own tokens), unpatched vs
    `patch_model` (with and without the residual GEMM), with the relative difference of the outputs.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "sagellm_cuda"))
from sagellm_cuda import fused  # noqa: E402

SHAPES = {
    "llama-3-8b": dict(hidden=4096, inter=14336, hq=32, hkv=8, d=128, arch="llama"),
    "qwen3-0.6b": dict(hidden=1024, inter=3072, hq=16, hkv=8, d=128, arch="qwen3"),
}
DT = torch.bfloat16


def graph_time_us(fn: Callable[[], object], calls: int = 20, replays: int = 5) -> float:
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000 / calls)
    return sorted(times)[len(times) // 2]


def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(*shape, device="cuda", dtype=DT) * scale


def ops(name: str, s: dict, tokens: int) -> None:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, apply_rotary_pos_emb

    h, inter, hq, hkv, d = s["hidden"], s["inter"], s["hq"], s["hkv"], s["d"]
    norm = LlamaRMSNorm(h, 1e-5).to(DT).cuda()
    x, res = rand(1, tokens, h), rand(1, tokens, h)
    gu = rand(1, tokens, 2 * inter)
    act = torch.nn.SiLU()
    qkv = rand(tokens, (hq + 2 * hkv) * d)
    cos, sin = rand(1, tokens, d), rand(1, tokens, d)
    qn, kn = LlamaRMSNorm(d, 1e-6).to(DT).cuda(), LlamaRMSNorm(d, 1e-6).to(DT).cuda()
    qk_norm = s["arch"] == "qwen3"

    def torch_rope():
        q = qkv[:, :hq * d].view(1, tokens, hq, d)
        k = qkv[:, hq * d:(hq + hkv) * d].view(1, tokens, hkv, d)
        if qk_norm:
            q, k = qn(q), kn(k)
        return apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos, sin)

    cases = [
        ("rmsnorm", lambda: norm(x), lambda: fused.rms_norm(x, norm.weight, 1e-5)),
        ("add+rmsnorm", lambda: norm(res + x), lambda: fused.add_rms_norm(x, res, norm.weight, 1e-5)),
        ("silu*up", lambda: act(gu[..., :inter]) * gu[..., inter:],
         lambda: fused.silu_mul(gu[..., :inter], gu[..., inter:])),
        ("rope" + ("+qk_norm" if qk_norm else ""), torch_rope,
         lambda: fused.rope_qkv_(qkv, cos[0], sin[0], hq, hkv, d, qn.weight if qk_norm else None,
                                 kn.weight if qk_norm else None, 1e-6)),
    ]
    for op, ref, new in cases:
        t_ref, t_new = graph_time_us(ref), graph_time_us(new)
        print(f"  {name:11s} T={tokens:<4d} {op:16s} torch {t_ref:7.2f} us   fused {t_new:7.2f} us   "
              f"x{t_ref / t_new:5.2f}")


def gemms(name: str, s: dict, tokens: int) -> None:
    h, inter, hq, hkv, d = s["hidden"], s["inter"], s["hq"], s["hkv"], s["d"]
    x = rand(tokens, h)
    for label, outs in (("gate/up", [inter, inter]), ("q/k/v", [hq * d, hkv * d, hkv * d])):
        ws = [rand(n, h, scale=0.02) for n in outs]
        cat = torch.cat(ws)
        t_sep = graph_time_us(lambda: [torch.nn.functional.linear(x, w) for w in ws])
        t_cat = graph_time_us(lambda: torch.nn.functional.linear(x, cat))
        gb = cat.numel() * cat.element_size() / 1e9
        print(f"  {name:11s} T={tokens:<4d} {label:8s} separate {t_sep:7.2f} us   concatenated {t_cat:7.2f} us "
              f"({gb / t_cat * 1e6:5.0f} GB/s of weights)")
    act, down, res = rand(tokens, inter), rand(h, inter, scale=0.02), rand(tokens, h)
    t_add = graph_time_us(lambda: res + torch.nn.functional.linear(act, down))
    t_addmm = graph_time_us(lambda: res.addmm_(act, down.t()))
    print(f"  {name:11s} T={tokens:<4d} down_proj + residual: linear then add {t_add:7.2f} us   "
          f"addmm_ {t_addmm:7.2f} us")


def layer(name: str, s: dict, tokens: int) -> None:
    import transformers

    arch = s["arch"]
    cfg_cls = transformers.LlamaConfig if arch == "llama" else transformers.Qwen3Config
    cfg = cfg_cls(hidden_size=s["hidden"], intermediate_size=s["inter"], num_attention_heads=s["hq"],
                  num_key_value_heads=s["hkv"], head_dim=s["d"], num_hidden_layers=1, vocab_size=1024)
    cfg._attn_implementation = "sdpa"
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=DT).cuda().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02) if p.ndim > 1 else p.fill_(1.0)
    rotary = model.model.rotary_emb
    x = rand(1, tokens, s["hidden"])
    pos = torch.arange(tokens, device="cuda")[None] + 100
    cos, sin = rotary(x, pos)
    kwargs = dict(attention_mask=None, position_ids=pos, position_embeddings=(cos, sin), use_cache=False)
    plain = copy.deepcopy(model.model.layers[0])
    patched = fused.patch_model(model, DT)
    fast = model.model.layers[0]
    with torch.inference_mode():
        want, got = plain(x, **kwargs), fast(x, **kwargs)
        rel = float((got.float() - want.float()).norm() / want.float().norm())
        t_plain = graph_time_us(lambda: plain(x, **kwargs))
        t_fast = graph_time_us(lambda: fast(x, **kwargs))
        default = fast._sagellm_residual_gemm
        fast._sagellm_residual_gemm = not default
        t_other = graph_time_us(lambda: fast(x, **kwargs))
        fast._sagellm_residual_gemm = default
    print(f"  {name:11s} T={tokens:<4d} decoder layer  transformers {t_plain:7.1f} us   patched {t_fast:7.1f} us   "
          f"({'without' if default else 'with'} residual GEMM {t_other:7.1f} us)   "
          f"saves {t_plain - t_fast:6.1f} us/layer"
          f"   rel diff {rel:.1e}   ({len(patched)} modules patched)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--layers-only", action="store_true")
    args = parser.parse_args()
    import transformers
    import triton

    print(f"{torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  "
          f"transformers {transformers.__version__}")
    with torch.inference_mode():
        if not args.layers_only:
            print("(a) ops")
            for name, s in SHAPES.items():
                for tokens in (1, 256):
                    ops(name, s, tokens)
            print("(b) GEMMs")
            for name, s in SHAPES.items():
                for tokens in (1, 256):
                    gemms(name, s, tokens)
    print("(c) decoder layer")
    for name, s in SHAPES.items():
        for tokens in (1, 256):
            layer(name, s, tokens)


if __name__ == "__main__":
    main()
