"""The CPU backend's lean decoder forward: the same logits, bit for bit, as transformers' modules (per
family, per quantization, through chunked prefill, a cached prefix and decode), fused projections
equal to their parts, and refusal of everything it does not cover."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch

import model_zoo
from conftest import engine_config, run_engine
from sagellm_core import SamplingParams
from sagellm_core.builtin.cpu_backend import CPUBackend, CPUOptions
from sagellm_core.engine import LLMEngine
from sagellm_core.models.lean_decoder import LeanDecoder, RMSNorm, lean_decoder, rms_norm
from sagellm_core.models.lean_projection import Projections
from sagellm_core.models.lean_support import lean_refusal
from sagellm_core.models.runner import ModelRunner
from sagellm_core.quant.cpu_linear import Int4WeightOnlyLinear, Int8WeightOnlyLinear
from sagellm_core.quant.weights import quantize_int4, quantize_int8

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")
MAX_NEW = 6


def _prompts() -> list[list[int]]:
    rng = random.Random(1)
    prompts = [[rng.randrange(1, model_zoo.VOCAB) for _ in range(n)] for n in (3, 9, 14)]
    return prompts + [prompts[2][:8] + [rng.randrange(1, model_zoo.VOCAB) for _ in range(5)]]


def _run(directory: Path, lean: bool, monkeypatch: pytest.MonkeyPatch, chunk: int = 8, dense_rows: int = 0,
         **model: Any) -> tuple[list[list[int]], list[torch.Tensor], LLMEngine]:
    """Greedy tokens and every forward's logits, prefill chunks of at most ``chunk`` tokens."""
    logits: list[torch.Tensor] = []
    forward = ModelRunner.forward

    def recording(self: ModelRunner, *args: Any) -> torch.Tensor:
        out = forward(self, *args)
        logits.append(out.clone())
        return out

    monkeypatch.setattr(ModelRunner, "forward", recording)
    config = engine_config(directory, model=model, scheduler={"max_num_batched_tokens": chunk},
                           backend={"options": {"lean_decoder": lean, "quantized_dense_rows": dense_rows}})
    engine = LLMEngine(config)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    prompts = _prompts()
    outs = run_engine(engine, prompts[:3], params) + run_engine(engine, prompts[3:], params)
    monkeypatch.setattr(ModelRunner, "forward", forward)
    return [o.outputs[0].token_ids for o in outs], logits, engine


@pytest.mark.parametrize("quantization", ["none", "int4", "int8"])
@pytest.mark.parametrize("arch", FAMILIES)
def test_lean_logits_equal_the_transformers_forward_bit_for_bit(arch: str, quantization: str, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    directory = model_zoo.save_model(arch, tmp_path / arch)
    tokens, logits, engine = _run(directory, True, monkeypatch, quantization=quantization)
    assert isinstance(engine.runner.lean, LeanDecoder)  # type: ignore[attr-defined]
    ref_tokens, ref_logits, ref_engine = _run(directory, False, monkeypatch, quantization=quantization)
    assert ref_engine.runner.lean is None  # type: ignore[attr-defined]
    assert tokens == ref_tokens
    assert len(logits) == len(ref_logits)
    assert all(torch.equal(a, b) for a, b in zip(logits, ref_logits))


@pytest.mark.parametrize("quantization", ["int4", "int8"])
@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_lean_logits_equal_the_transformers_forward_on_the_dense_gemm_path(
        arch: str, quantization: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With ``quantized_dense_rows: 16``, steps of 16 tokens and more run the bf16 GEMM over the
    de-quantized weights (fused in the lean forward, per module in transformers'): still the same bits."""
    directory = model_zoo.save_model(arch, tmp_path / arch)
    tokens, logits, _ = _run(directory, True, monkeypatch, chunk=32, dense_rows=16, quantization=quantization)
    ref_tokens, ref_logits, _ = _run(directory, False, monkeypatch, chunk=32, dense_rows=16, quantization=quantization)
    assert tokens == ref_tokens
    assert all(torch.equal(a, b) for a, b in zip(logits, ref_logits, strict=True))


def test_default_model_int4_logits_are_unchanged(monkeypatch: pytest.MonkeyPatch, default_model_dir: Path) -> None:
    """The default model as it runs by default (GGUF int4 + int8 head), decode included."""
    from sagellm_core.config import EngineConfig

    def run(lean: bool) -> tuple[list[int], list[torch.Tensor]]:
        logits: list[torch.Tensor] = []
        forward = ModelRunner.forward
        monkeypatch.setattr(ModelRunner, "forward", lambda self, *a: logits.append(forward(self, *a)) or logits[-1])
        engine = LLMEngine(EngineConfig.from_dict({"backend": {"name": "cpu", "options": {"lean_decoder": lean}}}))
        assert engine.quantization.method == "gguf"
        assert (engine.runner.lean is not None) == lean  # type: ignore[attr-defined]
        out = run_engine(engine, [engine.encode("The capital of France is")],
                         SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
        monkeypatch.setattr(ModelRunner, "forward", forward)
        return out[0].outputs[0].token_ids, logits

    tokens, logits = run(True)
    ref_tokens, ref_logits = run(False)
    assert tokens == ref_tokens
    assert all(torch.equal(a, b) for a, b in zip(logits, ref_logits, strict=True))


@pytest.mark.parametrize("rows", [5, 20])
@pytest.mark.parametrize("kind", ["int4", "int8"])
def test_fused_projections_equal_their_parts_and_share_the_codes(kind: str, rows: int) -> None:
    torch.manual_seed(0)
    make = (lambda w: Int4WeightOnlyLinear(quantize_int4(w), 16)) if kind == "int4" else (
        lambda w: Int8WeightOnlyLinear(quantize_int8(w), 16))
    modules = [make(torch.randn(n, 128)) for n in (128, 64, 64)]
    own = [m.qweight.clone() for m in modules]
    fused = Projections(modules)
    assert fused.fused is not None and fused.fused.dense is not None
    x = torch.randn(rows, 128)  # 20 rows: the bf16 GEMM over the stacked de-quantized weights
    for part, module, codes in zip(fused(x), modules, own):
        assert torch.equal(part, module(x))
        assert torch.equal(module.qweight, codes)
        assert module.qweight.data_ptr() >= fused.fused.qweight.data_ptr()  # a view, not a copy
        assert module.dense.data_ptr() >= fused.fused.dense.data_ptr()


def test_projections_stay_separate_when_they_cannot_fuse() -> None:
    torch.manual_seed(0)
    dense = [torch.nn.Linear(32, 32), torch.nn.Linear(32, 16)]
    assert Projections(dense).fused is None
    mixed = [Int4WeightOnlyLinear(quantize_int4(torch.randn(64, 64))), Int8WeightOnlyLinear(quantize_int8(torch.randn(64, 64)))]
    projections = Projections(mixed)
    assert projections.fused is None
    x = torch.randn(2, 64)
    assert all(torch.equal(a, m(x)) for a, m in zip(projections(x), mixed))


def test_rms_norm_is_transformers_rms_norm() -> None:
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    torch.manual_seed(0)
    norm = LlamaRMSNorm(48, eps=1e-5)
    with torch.no_grad():
        norm.weight.normal_()
    for dtype in (torch.float32, torch.bfloat16):
        norm = norm.to(dtype)
        for rows in (1, 3, 17):
            x = (torch.randn(rows, 48) * 3).to(dtype)
            assert torch.equal(RMSNorm(norm)(x), norm(x))
            assert torch.equal(rms_norm(x, norm.weight, torch.tensor(1e-5), torch.tensor(48.0)), norm(x))


def _model(arch: str) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(model_zoo.CONFIGS[arch](), dtype=torch.float32).eval()


@pytest.mark.parametrize("arch", ["gemma", "phi3", "gpt2", "mixtral"])
def test_other_architectures_are_refused(arch: str) -> None:
    model = _model(arch)
    assert "is not one of" in (lean_refusal(model) or "")
    assert lean_decoder(model) is None
    assert CPUBackend().lean_forward(model) is None


def test_changed_models_are_refused_with_the_reason() -> None:
    from transformers import LlamaForCausalLM

    class Custom(LlamaForCausalLM):
        pass

    custom = Custom(model_zoo.CONFIGS["llama"]()).eval()
    assert "not one of" in (lean_refusal(custom) or "")

    hooked = _model("llama")
    hooked.model.layers[1].mlp.register_forward_hook(lambda *args: None)
    assert lean_refusal(hooked) == "layer 1 MLP has a replaced forward or hooks"

    class Sharded(torch.nn.Module):
        def __init__(self, linear: torch.nn.Linear) -> None:
            super().__init__()
            self.linear = linear
            self.out_features = linear.out_features

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.linear(x)

    sharded = _model("llama")
    sharded.model.layers[0].self_attn.o_proj = Sharded(sharded.model.layers[0].self_attn.o_proj)
    assert lean_refusal(sharded) == "projection of type Sharded"

    gelu = _model("llama")
    gelu.config.hidden_act = "gelu"
    assert "hidden_act" in (lean_refusal(gelu) or "")

    training = _model("qwen3").train()
    assert lean_refusal(training) == "the model is in training mode"
    with pytest.raises(ValueError, match="lean decoder"):
        LeanDecoder(training)


def test_the_backend_option_turns_it_off() -> None:
    model = _model("llama")
    assert isinstance(CPUBackend().lean_forward(model), LeanDecoder)
    assert CPUBackend(None, CPUOptions(lean_decoder=False)).lean_forward(model) is None
