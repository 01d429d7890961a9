"""Shared fixtures: tiny randomly initialised models of real architectures, and engine helpers."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TINY_VOCAB = 256
ARCHITECTURES = ("llama", "qwen2", "qwen3", "mistral")


def tiny_config(arch: str, vocab_size: int = TINY_VOCAB) -> Any:
    """A small config of a real architecture (GQA 4:2, two layers)."""
    import transformers

    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  eos_token_id=None, bos_token_id=None, pad_token_id=0, tie_word_embeddings=False)
    classes = {
        "llama": transformers.LlamaConfig,
        "qwen2": transformers.Qwen2Config,
        "qwen3": transformers.Qwen3Config,
        "mistral": transformers.MistralConfig,
    }
    extra: dict[str, Any] = {"head_dim": 16} if arch in ("qwen3", "mistral") else {}
    if arch == "mistral":
        extra["sliding_window"] = None
    return classes[arch](**common, **extra)


def save_tiny_model(arch: str, directory: Path, vocab_size: int = TINY_VOCAB, seed: int = 0) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(arch, vocab_size), dtype=torch.float32)
    # Larger-than-default weights make the logits peaky, so greedy ties (and flaky argmax flips) are unlikely.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim > 1:
                param.normal_(0.0, 0.15)
    model.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny-models")
    return {arch: save_tiny_model(arch, root / arch) for arch in ARCHITECTURES}


def engine_config(model_dir: Path, **sections: Any) -> Any:
    from sagellm_core.config import EngineConfig

    base: dict[str, Any] = {
        "model": {"path": str(model_dir), "dtype": "float32"},
        "backend": {"name": "cpu"},
        "kv_cache": {"block_size": 4, "num_blocks": 256},
        "scheduler": {"max_num_seqs": 16, "max_num_batched_tokens": 256},
    }
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return EngineConfig.from_dict(base)


def run_engine(engine: Any, prompts: list[list[int]], params: Any, check_every_step: bool = True) -> list[Any]:
    """Add all prompts, step to completion, return final outputs in prompt order."""
    ids = [engine.add_request(p, params) for p in prompts]
    finals: dict[str, Any] = {}
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                finals[out.request_id] = out
        if check_every_step:
            for pool in engine.kv_pools:
                pool.check_invariants()
    return [finals[i] for i in ids]


def drive_with_aborts(engine: Any, rng: Any, abort_rate: float, max_steps: int = 2000) -> dict[str, Any]:
    """Step to completion, aborting a random live request with probability ``abort_rate`` per step and
    checking the KV invariants after every step; the final outputs by id (each exactly once), every
    block free at the end."""
    finals: dict[str, Any] = {}
    steps = 0
    while engine.has_unfinished():
        steps += 1
        assert steps < max_steps, "no progress"
        if rng.random() < abort_rate and engine.groups:
            engine.abort(rng.choice(sorted(engine.groups)))
        for out in engine.step():
            assert all(t >= 0 for c in out.outputs for t in c.token_ids)
            if out.finished:
                assert out.request_id not in finals, "finished twice"
                finals[out.request_id] = out
        for pool in engine.kv_pools:
            pool.check_invariants()
    assert all(pool.stats().used_blocks == 0 for pool in engine.kv_pools)
    return finals


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    """The embedded SmolLM2 checkpoint converted to safetensors (converted once per machine)."""
    from sagellm_core.models.loader import default_model_dir as resolve_default

    return resolve_default()


@pytest.fixture(scope="session")
def tokenizer_model(tmp_path_factory: pytest.TempPathFactory, default_model_dir: Path) -> Path:
    """A tiny random Llama with the default model's real tokenizer (for text-level tests)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(default_model_dir)
    directory = save_tiny_model("llama", tmp_path_factory.mktemp("tok-model") / "llama", len(tokenizer))
    tokenizer.save_pretrained(directory)
    return directory


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """GPU tests run only where torch sees a CUDA device."""
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tiny_engine_dir(tiny_models: dict[str, Path]) -> Path:
    return tiny_models["llama"]


class ReplayByRerun:
    """Stands in for a device graph on the CPU: a replay re-runs the captured function, which reads
    the static input buffers at replay time -- the property real graph replays rely on."""

    def __init__(self) -> None:
        self.captured = 0

    def capture(self, fn):  # type: ignore[no-untyped-def]
        self.captured += 1
        return fn


def graph_engine(model_dir: Path, capture: ReplayByRerun | None = None, **sections: Any) -> Any:
    """An engine on a CPU backend that "captures" decode graphs (as on CUDA: decode steps replay
    graphs, prefill steps run eagerly); select it with ``backend={"name": "cpu_graphs"}``."""
    from sagellm_core.backend import BackendSpec, ProbeResult
    from sagellm_core.builtin.cpu_backend import CPUBackend
    from sagellm_core.engine import LLMEngine
    from sagellm_core.hookspecs import hookimpl
    from sagellm_core.plugin_manager import create_plugin_manager

    graphs = capture or ReplayByRerun()

    class GraphCPU(CPUBackend):
        name = "cpu_graphs"

        def graph_capture(self):  # type: ignore[no-untyped-def]
            return graphs

    class Plugin:
        @staticmethod
        @hookimpl
        def sagellm_register_backends(register):  # type: ignore[no-untyped-def]
            register(BackendSpec("cpu_graphs", -1, lambda: ProbeResult(True, "test"), GraphCPU, "cpu", "gloo"))

    manager = create_plugin_manager(entry_points=False, extra={"graphs": Plugin})
    backend = {"name": "cpu_graphs", **sections.pop("backend", {})}
    return LLMEngine(engine_config(model_dir, backend=backend, **sections), plugin_manager=manager)


def assert_seeded_request_ignores_its_batch(alone: Any, batched: Any, seeded: Any) -> None:
    """A seeded request run alone on ``alone`` and amid unseeded ones on ``batched`` (both engines)
    yields the same tokens; the unseeded requests do differ from each other."""
    import random

    rng = random.Random(0)
    prompt = [rng.randrange(1, 256) for _ in range(7)]
    expected = run_engine(alone, [prompt], seeded)[0].outputs[0].token_ids
    others = [[rng.randrange(1, 256) for _ in range(rng.randint(1, 20))] for _ in range(5)]
    noisy = seeded.replace(seed=None, top_p=1.0, max_tokens=15)
    ids = [batched.add_request(p, noisy) for p in others[:3]]
    target = batched.add_request(prompt, seeded)
    ids += [batched.add_request(p, noisy) for p in others[3:]]
    finals = {}
    while batched.has_unfinished():
        finals.update({o.request_id: o for o in batched.step() if o.finished})
    assert finals[target].outputs[0].token_ids == expected
    assert len({tuple(finals[i].outputs[0].token_ids) for i in ids}) > 1


def unvalidated(params: Any, **fields: Any) -> Any:
    """A copy of ``params`` with ``fields`` set past `SamplingParams`' validation: a request that reached
    the engine without the front end's checks (built by a plugin, or by a bug), which the engine must
    still survive."""
    copy = params.replace()
    for name, value in fields.items():
        object.__setattr__(copy, name, value)
    return copy


class ExitingSink:
    """A metric plugin that calls ``sys.exit`` inside the step."""

    def on_step(self, event: Any) -> None:
        raise SystemExit(3)

    def on_request_finished(self, event: Any) -> None:
        pass

    def snapshot(self) -> dict[str, Any]:
        return {}
