"""The architecture parity set: tiny random fp32 models of every covered architecture either generate
exactly what transformers' own greedy ``generate`` does, or are refused at load with a message naming
what is missing. None crashes at request time; none silently differs."""

from __future__ import annotations

import random
import re
from pathlib import Path
from typing import Any

import pytest
import torch

import model_zoo
from conftest import engine_config, run_engine
from sagellm_core.attention.features import ALL_FEATURES, SLIDING_WINDOW
from sagellm_core.attention.reference import reference_paged_attention
from sagellm_core.builtin.cpu_backend import CPUBackend
from sagellm_core.engine import LLMEngine
from sagellm_core.models import support
from sagellm_core.models.support import AttentionCall, UnsupportedModelError
from sagellm_core.sampling_params import SamplingParams

MAX_NEW = 6

IDENTICAL = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "mixtral", "qwen2_moe",
             "qwen3_moe", "olmo", "olmo2", "gpt_neox", "cohere", "granite", "starcoder2", "gpt_oss", "phi", "gpt2",
             "gptj")
REFUSED = {
    "falcon": "FalconForCausalLM .*_supports_attention_backend = False",
    "stablelm": "StableLmForCausalLM .*_supports_attention_backend = False",
    "deepseek_v2": "key heads of size 24 and 4 value heads of size 16.*multi-head latent attention",
    "bert": "BertLMHeadModel .*bidirectional",
}


def test_the_set_covers_every_built_architecture() -> None:
    assert set(IDENTICAL) | set(REFUSED) == set(model_zoo.CONFIGS)
    assert len(IDENTICAL) + len(REFUSED) >= 22


def make_prompts() -> list[list[int]]:
    """Prompts longer than the windowed layers' window; the last shares two full KV blocks (block
    size 4) with the third, so it prefills behind a cached prefix."""
    rng = random.Random(0)
    prompts = [[rng.randrange(1, model_zoo.VOCAB) for _ in range(n)] for n in (3, 9, 14)]
    return prompts + [prompts[2][:8] + [rng.randrange(1, model_zoo.VOCAB) for _ in range(5)]]


def hf_greedy(model: Any, prompts: list[list[int]]) -> list[list[int]]:
    outs = []
    with torch.no_grad():
        for prompt in prompts:
            ids = torch.tensor([prompt])
            gen = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=MAX_NEW,
                                 min_new_tokens=MAX_NEW, eos_token_id=None, pad_token_id=0)
            outs.append(gen[0, len(prompt):].tolist())
    return outs


def load_hf(directory: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()


def sagellm_greedy(directory: Path, prompts: list[list[int]]) -> list[list[int]]:
    # Prefill chunks of at most 8 tokens: chunked prefill, cached prefixes and decodes all run.
    engine = model_zoo.engine_unless_class_refused(engine_config(directory, scheduler={"max_num_batched_tokens": 8}))
    params = SamplingParams(temperature=0.0, max_tokens=MAX_NEW, ignore_eos=True)
    first = run_engine(engine, prompts[:3], params)
    second = run_engine(engine, prompts[3:], params)
    return [out.outputs[0].token_ids for out in first + second]


@pytest.mark.parametrize("arch", IDENTICAL)
def test_architecture_is_token_identical_to_transformers(arch: str, tmp_path: Path) -> None:
    directory = model_zoo.save_model(arch, tmp_path / arch)
    prompts = make_prompts()
    assert sagellm_greedy(directory, prompts) == hf_greedy(load_hf(directory), prompts)


@pytest.mark.parametrize("arch", sorted(REFUSED))
def test_architecture_is_refused_at_load_with_the_reason(arch: str, tmp_path: Path) -> None:
    directory = model_zoo.save_model(arch, tmp_path / arch)
    with pytest.raises(UnsupportedModelError, match=REFUSED[arch]):
        LLMEngine(engine_config(directory))


@pytest.mark.parametrize(("arch", "neutralize"), [
    ("gemma2", lambda model: setattr(model.config, "attn_logit_softcapping", None)),
    ("gpt_oss", lambda model: [layer.self_attn.sinks.data.fill_(-1e9) for layer in model.model.layers]),
])
def test_the_soft_cap_and_the_sinks_change_the_tokens(arch: str, neutralize: Any, tmp_path: Path) -> None:
    """Without these features the parity models would generate other tokens: parity tests them."""
    directory = model_zoo.save_model(arch, tmp_path / arch)
    prompts = make_prompts()
    model = load_hf(directory)
    with_feature = hf_greedy(model, prompts)
    neutralize(model)
    if arch == "gemma2":
        for layer in model.model.layers:
            layer.self_attn.attn_logit_softcapping = None
    assert hf_greedy(model, prompts) != with_feature


class SlidingWindowOnlyOp:
    """An op implementing what the Triton op implements (sliding windows, no sinks, no soft cap)."""

    supported_features = frozenset({SLIDING_WINDOW})

    def __call__(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return reference_paged_attention(*args, **kwargs)


def undeclared_op() -> Any:
    """An op that does not declare ``supported_features``: taken to implement the sliding window only."""
    return lambda *args, **kwargs: reference_paged_attention(*args, **kwargs)


@pytest.mark.parametrize(("arch", "missing"), [
    ("gpt_oss", r"attention sinks \(s_aux\)"),
    ("gemma2", r"attention logit soft-capping \(softcap\)"),
])
@pytest.mark.parametrize("op", [SlidingWindowOnlyOp, undeclared_op], ids=["declared", "undeclared"])
def test_backend_without_a_feature_refuses_the_model_naming_it(arch: str, missing: str, op: Any, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    directory = model_zoo.save_model(arch, tmp_path / arch)
    monkeypatch.setattr(CPUBackend, "attention_op", lambda self: op())
    with pytest.raises(UnsupportedModelError,
                       match=f"on sageLLM's 'cpu' backend: it needs {missing}, which this backend's attention op "
                             f"does not implement \\(it implements: sliding_window\\)"):
        LLMEngine(engine_config(directory))


def test_backend_without_sinks_or_soft_cap_still_runs_sliding_window_models(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    directory = model_zoo.save_model("gemma3_text", tmp_path / "gemma3_text")
    monkeypatch.setattr(CPUBackend, "attention_op", lambda self: SlidingWindowOnlyOp())
    prompts = make_prompts()
    assert sagellm_greedy(directory, prompts) == hf_greedy(load_hf(directory), prompts)


@pytest.mark.parametrize(("arch", "reason"), [
    ("stablelm", "do not receive the keyword arguments of the model's forward"),
    # transformers up to 5.24: the probe's forward fails; from 5.25 falcon's layers also miss the kwargs
    ("falcon", "a forward pass through sageLLM's attention function failed|do not receive the keyword arguments"),
])
def test_the_probe_refuses_without_trusting_the_class_flag(arch: str, reason: str, tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Were transformers to flag these classes as supporting the attention interface, the load-time
    probe would still see what they do and refuse them."""
    directory = model_zoo.save_model(arch, tmp_path / arch)
    cls = support.causal_lm_class(model_zoo.CONFIGS[arch]())
    monkeypatch.setattr(cls, "_supports_attention_backend", True)
    with pytest.raises(UnsupportedModelError, match=reason):
        LLMEngine(engine_config(directory))


@pytest.mark.parametrize(("config_class", "reason"), [
    ("T5Config", "model type 't5' is an encoder-decoder model; sageLLM runs decoder-only causal language models"),
    ("BartConfig", "model type 'bart' is an encoder-decoder model"),
    ("ViTConfig", "model type 'vit' .*is not a causal language model"),
])
def test_non_causal_lm_configs_are_refused_before_weights_load(config_class: str, reason: str,
                                                               tmp_path: Path) -> None:
    import transformers

    getattr(transformers, config_class)().save_pretrained(tmp_path)  # a config, no weights at all
    with pytest.raises(UnsupportedModelError, match=reason):
        LLMEngine(engine_config(tmp_path))


def test_a_refused_model_stops_the_library_and_the_server_before_they_start(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch,
                                                                            capsys: pytest.CaptureFixture[str]) -> None:
    from sagellm_core import LLM
    from sagellm_core.cli import main

    directory = model_zoo.save_model("stablelm", tmp_path / "stablelm")
    with pytest.raises(UnsupportedModelError, match="StableLmForCausalLM"):
        LLM(model=str(directory), config={"backend": {"name": "cpu"}})

    def never_bind(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the server bound a port for a refused model")

    monkeypatch.setattr("uvicorn.run", never_bind)
    assert main(["serve", "--model", str(directory), "--backend", "cpu", "--port", "0"]) == 2
    assert "StableLmForCausalLM (stablelm) cannot run on sageLLM" in capsys.readouterr().err


def _call(**changes: Any) -> AttentionCall:
    fields: dict[str, Any] = dict(module="Attn", layer_idx=0, causal=True, dropout=0.0, kv_layout=(2, 16, 2, 16),
                                  features=frozenset(), unhandled=frozenset(), received_step=True)
    return AttentionCall(**{**fields, **changes})


class _TwoLayerModel:
    """Stands in for a loaded model where only the recorded calls matter (config for `kv_shape`)."""

    class config:  # noqa: N801 - mirrors a transformers config
        num_hidden_layers = 2
        num_attention_heads = 4
        num_key_value_heads = 2
        head_dim = 16
        hidden_size = 64


@pytest.mark.parametrize(("calls", "reason"), [
    ([], "none of its layers calls transformers' attention interface"),
    ([_call(), _call(layer_idx=1, unhandled=frozenset({"alibi"}))],
     "passes arguments sageLLM does not handle: alibi"),
    ([_call(), _call(layer_idx=1, dropout=0.1)], r"applies dropout \[0.1\] at inference"),
    ([_call()], r"attention layers \[0\] are not one per layer of its 2 layers"),
    ([_call(), _call(layer_idx=0)], r"attention layers \[0\] are not one per layer"),
    ([_call(), _call(layer_idx=None)], "no layer_idx"),
    ([_call(), _call(layer_idx=1, causal=False)], "bidirectional"),
    ([_call(), _call(layer_idx=1, kv_layout=(1, 16, 1, 16))], "1 key heads of size 16 and 1 value heads of size 16"),
])
def test_each_recorded_problem_is_named(calls: list[AttentionCall], reason: str) -> None:
    problems = support.model_problems(_TwoLayerModel(), calls, ALL_FEATURES)
    assert any(re.search(reason, problem) for problem in problems), problems


def test_supported_calls_have_no_problems() -> None:
    calls = [_call(features=frozenset(ALL_FEATURES)), _call(layer_idx=1)]
    assert support.model_problems(_TwoLayerModel(), calls, ALL_FEATURES) == []
