"""The fused Triton kernels of `sagellm_cuda.fused` against transformers' modules, and the patched engine
against the unpatched one (needs a CUDA GPU; the module imports Triton only inside the tests)."""

from __future__ import annotations

import copy
import importlib
import random
import sys
from pathlib import Path

import pytest
import torch

from conftest import ARCHITECTURES, engine_config, run_engine, tiny_config
from hf_oracle import agreement, hf_greedy
from sagellm_core.sampling_params import SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
HALF = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]
MAX_NEW = 12


def _fused():
    pytest.importorskip("triton")
    try:
        return importlib.import_module("sagellm_cuda.fused")
    except ImportError:  # running from a checkout without `pip install -e sagellm_cuda`
        sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "sagellm_cuda"))
        return importlib.import_module("sagellm_cuda.fused")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _rand(shape, dtype, seed, scale=1.0, shift=0.0) -> torch.Tensor:
    return (torch.randn(shape, generator=_gen(seed)) * scale + shift).to(dtype).cuda()


def _assert_within_ulp(got: torch.Tensor, ref: torch.Tensor, scale: torch.Tensor | None = None) -> None:
    """Equal up to rounding flips: fp32 reduction order or ``rsqrt`` / ``exp`` precision may round the
    intermediate half-precision value (the normalised x, silu(gate)) the other way, one unit in its last
    place; after the multiply by the weight (or ``up``) that is at most two units of the result's. Where
    the result is a difference (rotary after a q/k norm), ``scale`` gives the magnitude of its terms."""
    assert got.shape == ref.shape and got.dtype == ref.dtype
    g, r = got.float(), ref.float()
    magnitude = torch.maximum(g.abs(), r.abs()) if scale is None else scale.float()
    ulp = torch.finfo(ref.dtype).eps * magnitude + torch.finfo(ref.dtype).tiny
    bad = (g - r).abs() > 2 * ulp
    assert not bad.any(), f"{int(bad.sum())} of {bad.numel()} beyond 2 ulp, max diff {float((g - r).abs().max())}"
    mismatched = float((got != ref).float().mean())
    assert mismatched < 0.02, f"{mismatched:.3%} of the elements differ (expected only rare rounding flips)"


def _norm(cls_name: str, width: int, dtype: torch.dtype, seed: int):
    import transformers

    module = getattr(transformers.models.llama.modeling_llama if cls_name == "LlamaRMSNorm"
                     else transformers.models.qwen3.modeling_qwen3, cls_name)(width, eps=1e-6)
    module.weight.data = _rand((width,), torch.float32, seed, 0.5, 1.0).cpu()
    return module.to(dtype).cuda()


# ---------------------------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("cls_name, shape", [
    ("LlamaRMSNorm", (1, 1, 4096)), ("LlamaRMSNorm", (1, 37, 1024)), ("LlamaRMSNorm", (3, 5, 100)),
    ("Qwen3RMSNorm", (1, 7, 16, 128)), ("Qwen3RMSNorm", (2, 300, 8, 64)), ("LlamaRMSNorm", (1, 2, 8192)),
])
def test_rms_norm_matches_transformers(cls_name, shape, dtype):
    fused = _fused()
    module = _norm(cls_name, shape[-1], dtype, seed=1)
    x = _rand(shape, dtype, seed=2, scale=3.0)
    _assert_within_ulp(fused.rms_norm(x, module.weight, module.variance_epsilon), module(x))
    # a non-contiguous input (a column slice) works too
    wide = _rand((*shape[:-1], shape[-1] + 8), dtype, seed=3)[..., 4:-4]
    _assert_within_ulp(fused.rms_norm(wide, module.weight, module.variance_epsilon), module(wide))


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("shape", [(1, 1, 4096), (1, 64, 1024), (2, 3, 96)])
def test_add_rms_norm_matches_add_then_norm(shape, dtype):
    fused = _fused()
    module = _norm("LlamaRMSNorm", shape[-1], dtype, seed=4)
    x, residual = _rand(shape, dtype, seed=5), _rand(shape, dtype, seed=6, scale=4.0)
    total, normed = fused.add_rms_norm(x, residual, module.weight, module.variance_epsilon)
    assert torch.equal(total, residual + x)
    _assert_within_ulp(normed, module(residual + x))


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("rows, width", [(1, 14336), (256, 3072), (5, 100)])
def test_silu_mul_matches_torch(rows, width, dtype):
    fused = _fused()
    gate_up = _rand((1, rows, 2 * width), dtype, seed=7, scale=3.0)
    gate, up = gate_up[..., :width], gate_up[..., width:]
    _assert_within_ulp(fused.silu_mul(gate, up), torch.nn.functional.silu(gate) * up)


def _cos_sin(tokens: int, dim: int, dtype: torch.dtype, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    angles = torch.rand((tokens, dim // 2), generator=_gen(seed)) * 50
    emb = torch.cat([angles, angles], -1)
    return emb.cos().to(dtype).cuda(), emb.sin().to(dtype).cuda()


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("tokens, hq, hkv, d, qk_norm", [
    (1, 32, 8, 128, False), (37, 16, 8, 128, True), (5, 4, 2, 16, False), (300, 14, 2, 64, True), (3, 6, 6, 96, False),
])
def test_rope_matches_apply_rotary_pos_emb(tokens, hq, hkv, d, qk_norm, dtype):
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    fused = _fused()
    width = (hq + 2 * hkv) * d
    qkv = _rand((tokens, width), dtype, seed=8)
    cos, sin = _cos_sin(tokens, d, dtype, seed=9)
    q = qkv[:, :hq * d].view(1, tokens, hq, d)
    k = qkv[:, hq * d:(hq + hkv) * d].view(1, tokens, hkv, d)
    q_norm = k_norm = None
    if qk_norm:
        q_norm, k_norm = _norm("Qwen3RMSNorm", d, dtype, 10), _norm("Qwen3RMSNorm", d, dtype, 11)
        q, k = q_norm(q), k_norm(k)
    ref_q, ref_k = apply_rotary_pos_emb(q.transpose(1, 2), k.transpose(1, 2), cos[None], sin[None])
    out = qkv.clone()
    fused.rope_qkv_(out, cos, sin, hq, hkv, d, q_norm.weight if qk_norm else None,
                    k_norm.weight if qk_norm else None, 1e-6)
    got_q = out[:, :hq * d].view(1, tokens, hq, d).transpose(1, 2)
    got_k = out[:, hq * d:(hq + hkv) * d].view(1, tokens, hkv, d).transpose(1, 2)
    if qk_norm:  # a rounding flip in the normed q/k is not scaled down when x*cos - x'*sin cancels
        def terms(x):
            x = x.transpose(1, 2).float()
            rotated = torch.cat((-x[..., d // 2:], x[..., :d // 2]), -1)
            return (x * cos[None, None].float()).abs() + (rotated * sin[None, None].float()).abs()

        _assert_within_ulp(got_q, ref_q, terms(q))
        _assert_within_ulp(got_k, ref_k, terms(k))
    else:  # the same three roundings as torch: bit-identical
        assert torch.equal(got_q, ref_q) and torch.equal(got_k, ref_k)
    assert torch.equal(out[:, (hq + hkv) * d:], qkv[:, (hq + hkv) * d:])  # v untouched


def test_kernels_replay_in_a_cuda_graph():
    """Captured once, replayed on new data in the same buffers: the same results as eager calls."""
    fused = _fused()
    dtype = torch.bfloat16
    x = _rand((4, 1024), dtype, 12)
    res = _rand((4, 1024), dtype, 13)
    w = _rand((1024,), dtype, 14, 0.5, 1.0)
    gu = _rand((4, 2 * 768), dtype, 15)
    qkv = _rand((4, 32 * 64), dtype, 16)
    cos, sin = _cos_sin(4, 64, dtype, 17)

    def step():
        a = fused.rms_norm(x, w, 1e-5)
        b, c = fused.add_rms_norm(x, res, w, 1e-5)
        d = fused.silu_mul(gu[:, :768], gu[:, 768:])
        fused.rope_qkv_(qkv, cos, sin, 16, 8, 64)
        return a, b, c, d

    step()  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = step()
    for seed in (20, 21):
        for i, t in enumerate((x, res, gu, qkv)):
            t.copy_(_rand(tuple(t.shape), dtype, seed * 10 + i))
        start_qkv = qkv.clone()
        graph.replay()
        after_graph = qkv.clone()
        qkv.copy_(start_qkv)
        expected = step()
        torch.cuda.synchronize()
        for got, want in zip(outs, expected):
            assert torch.equal(got, want)
        assert torch.equal(after_graph, qkv)


# ---------------------------------------------------------------------------------------------- modules


def _tiny_model(arch: str, dtype: torch.dtype, seed: int = 0):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch), dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.15) if param.ndim > 1 else param.uniform_(0.5, 1.5)
    return model.to(dtype).cuda().eval()


@pytest.mark.parametrize("arch", ARCHITECTURES)
@pytest.mark.parametrize("dtype", HALF)
def test_patched_model_matches_unpatched(arch, dtype):
    fused = _fused()
    model = _tiny_model(arch, dtype)
    reference = copy.deepcopy(model)
    patched = fused.patch_model(model, dtype)
    kinds = sorted({entry.split(": ")[1] for entry in patched})
    assert kinds == ["attention", "decoder_layer", "mlp", "rmsnorm"], patched
    norms = 2 * 2 + 1 + (2 * 2 if arch == "qwen3" else 0)
    assert sum(entry.endswith(": rmsnorm") for entry in patched) == norms
    assert fused.patch_model(model, dtype) == []  # idempotent
    # concatenated weights: gate/up and q/k/v are views into one tensor each (no extra memory)
    layer = model.model.layers[0]
    gate, up = layer.mlp.gate_proj.weight, layer.mlp.up_proj.weight
    assert up.data_ptr() == gate.data_ptr() + gate.numel() * gate.element_size()
    assert layer.self_attn.k_proj.weight.untyped_storage().data_ptr() == \
        layer.self_attn.q_proj.weight.untyped_storage().data_ptr()
    for name, tensor in reference.state_dict().items():
        assert torch.equal(model.state_dict()[name], tensor), name
    ids = torch.tensor([[random.Random(arch).randrange(256) for _ in range(41)]], device="cuda")
    with torch.no_grad():
        want = reference(input_ids=ids, use_cache=False).logits.float()
        got = model(input_ids=ids, use_cache=False).logits.float()
        # with a KV cache object (transformers' generate) the patched modules fall back to the originals
        gen_want = reference.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
        gen_got = model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0)
    rel = float((got - want).norm() / want.norm())
    assert rel < 2e-2, rel
    assert float((got.argmax(-1) == want.argmax(-1)).float().mean()) > 0.9
    assert gen_got.shape == gen_want.shape


def test_fp32_model_is_not_patched():
    fused = _fused()
    model = _tiny_model("qwen3", torch.float32)
    forwards = {name: m.forward for name, m in model.named_modules()}
    assert fused.patch_model(model, torch.float32) == []
    assert all("forward" not in m.__dict__ for m in model.modules())
    assert {name: m.forward for name, m in model.named_modules()} == forwards


def test_gemma_style_norm_is_left_alone():
    """A norm that scales by (1 + weight) disagrees at patch time and keeps its own forward."""
    fused = _fused()

    class OffsetRMSNorm(torch.nn.Module):
        def __init__(self, width: int) -> None:
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(width))
            self.variance_epsilon = 1e-6

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            xf = x.float()
            y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
            return (y * (1.0 + self.weight.float())).to(x.dtype)

    model = torch.nn.Sequential(OffsetRMSNorm(64), _norm("LlamaRMSNorm", 64, torch.bfloat16, 1).cpu()).to(
        torch.bfloat16).cuda()
    assert fused.patch_model(model, torch.bfloat16) == ["1: rmsnorm"]
    assert "forward" not in model[0].__dict__


# ---------------------------------------------------------------------------------------------- engine


def _prompts(seed: int, count: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(1, 256) for _ in range(rng.choice([1, 2, 7, 16, 33, 70]))] for _ in range(count)]




def _engine_tokens(model_dir: Path, prompts: list[list[int]], dtype: str, fused_on: bool,
                   monkeypatch: pytest.MonkeyPatch) -> tuple[list[list[int]], object]:
    from sagellm_core.engine import LLMEngine

    monkeypatch.setenv("SAGELLM_FUSED", "1" if fused_on else "0")
    engine = LLMEngine(engine_config(model_dir, model={"dtype": dtype}, backend={"name": "cuda"},
                                     kv_cache={"block_size": 16, "num_blocks": 128}))
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    half = len(prompts) // 2  # two waves: mixed prefill + decode steps, then graph-replayed decodes
    outs = run_engine(engine, prompts[:half], params) + run_engine(engine, prompts[half:], params)
    return [o.outputs[0].token_ids for o in outs], engine


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_fused_engine_bf16_agrees_at_transformers_self_agreement_level(arch, tiny_models, monkeypatch):
    prompts = _prompts(seed=3, count=16)
    hf_single = hf_greedy(tiny_models[arch], prompts, torch.bfloat16, MAX_NEW, batch=1)
    hf_batched = hf_greedy(tiny_models[arch], prompts, torch.bfloat16, MAX_NEW, batch=8)
    baseline = agreement(hf_single, hf_batched)
    fused_out, engine = _engine_tokens(tiny_models[arch], prompts, "bfloat16", True, monkeypatch)
    plain_out, plain_engine = _engine_tokens(tiny_models[arch], prompts, "bfloat16", False, monkeypatch)
    assert engine.backend.fused_modules and not plain_engine.backend.fused_modules
    assert engine.runner.graphs is not None and engine.runner.graphs.num_replays > 0
    vs_plain, vs_hf = agreement(plain_out, fused_out), agreement(hf_single, fused_out)
    print(f"{arch} bf16 agreement: transformers batch1 vs batch8 {baseline:.3f}; fused vs unfused engine "
          f"{vs_plain:.3f}; fused engine vs transformers {vs_hf:.3f}")
    assert vs_plain >= baseline - 0.1
    assert vs_hf >= baseline - 0.1


def test_fp32_engine_is_not_patched_and_matches_transformers(tiny_models, monkeypatch):
    prompts = _prompts(seed=4, count=6)
    expected = hf_greedy(tiny_models["qwen3"], prompts, torch.float32, MAX_NEW, batch=1)
    got, engine = _engine_tokens(tiny_models["qwen3"], prompts, "float32", True, monkeypatch)
    assert engine.backend.fused_modules == []
    assert all("forward" not in m.__dict__ for m in engine.model.modules())
    assert got == expected
