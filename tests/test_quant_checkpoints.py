"""Quantized checkpoints: GGUF blocks mapped onto the converted model's layers, and a tiny FP8
compressed-tensors checkpoint that loads and generates the tokens of its de-quantized twin."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch

from sagellm_core.quant.gguf import hf_linear_name, read_quantized_linears
from sagellm_core.quant.weights import quantize_fp8


def test_gguf_names() -> None:
    assert hf_linear_name("blk.3.attn_q.weight") == "model.layers.3.self_attn.q_proj"
    assert hf_linear_name("blk.0.ffn_down.weight") == "model.layers.0.mlp.down_proj"
    assert hf_linear_name("output.weight") == "lm_head"
    assert hf_linear_name("blk.0.attn_norm.weight") is None


def test_gguf_blocks_are_the_converted_weights(default_model_dir: Path) -> None:
    """The int4 codes read from the Q4_1 blocks (q/k rows un-permuted) de-quantize to exactly the
    weights transformers' GGUF converter wrote; the Q8_0 head re-scaled per channel stays within half
    an int8 step."""
    from safetensors import safe_open

    from sagellm_core.models.loader import default_gguf_path

    names = {"model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj", "model.layers.5.mlp.down_proj",
             "model.layers.29.self_attn.v_proj", "lm_head"}
    weights = read_quantized_linears(default_gguf_path(), 9, 3, only=names)
    assert set(weights) == names
    with safe_open(str(default_model_dir / "model.safetensors"), "pt") as f:
        for name in names - {"lm_head"}:
            qw = weights[name]
            assert qw.kind == "int4" and qw.group_size == 32
            assert torch.equal(qw.dequantize(), f.get_tensor(name + ".weight").float()), name
        head = weights["lm_head"]
        tied = "model.embed_tokens.weight" if "model.embed_tokens.weight" in f.keys() else "lm_head.weight"
        embedding = f.get_tensor(tied).float()
    assert head.kind == "int8" and head.codes.shape == embedding.shape
    assert torch.all((head.dequantize() - embedding).abs() <= head.scales[:, None] / 2 + 1e-6)


# ---- compressed-tensors FP8 -------------------------------------------------------------------------
FP8_QUANTIZATION_CONFIG = {
    "quant_method": "compressed-tensors", "format": "float-quantized", "quantization_status": "compressed",
    "config_groups": {"group_0": {
        "targets": ["Linear"],
        "weights": {"num_bits": 8, "type": "float", "strategy": "channel", "symmetric": True, "dynamic": False},
        "input_activations": {"num_bits": 8, "type": "float", "strategy": "token", "symmetric": True,
                              "dynamic": True},
    }},
    "ignore": ["lm_head"],
}


def _write_fp8_pair(tiny_model: Path, root: Path) -> tuple[Path, Path]:
    """An FP8 compressed-tensors checkpoint (E4M3 weights, per-channel scales) and its twin whose
    weights are those codes times their scales, in float32."""
    import shutil

    from safetensors.torch import load_file, save_file

    state = load_file(str(tiny_model / "model.safetensors"))
    fp8_dir, twin_dir = root / "fp8", root / "twin"
    for d in (fp8_dir, twin_dir):
        shutil.copytree(tiny_model, d)
    fp8_state: dict[str, torch.Tensor] = {}
    twin_state: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key.endswith("_proj.weight"):
            qw = quantize_fp8(value)
            fp8_state[key] = qw.codes
            fp8_state[key.removesuffix("weight") + "weight_scale"] = qw.scales[:, None].contiguous()
            twin_state[key] = qw.dequantize()
        else:
            fp8_state[key] = twin_state[key] = value
    save_file(fp8_state, str(fp8_dir / "model.safetensors"), metadata={"format": "pt"})
    save_file(twin_state, str(twin_dir / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((fp8_dir / "config.json").read_text())
    config["quantization_config"] = FP8_QUANTIZATION_CONFIG
    (fp8_dir / "config.json").write_text(json.dumps(config))
    return fp8_dir, twin_dir


@pytest.fixture(scope="module")
def fp8_pair(tiny_engine_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    pytest.importorskip("compressed_tensors")
    return _write_fp8_pair(tiny_engine_dir, tmp_path_factory.mktemp("ct"))


def test_fp8_checkpoint_generates_like_its_dequantized_twin(fp8_pair: tuple[Path, Path]) -> None:
    from sagellm_core import SamplingParams
    from sagellm_core.engine import LLMEngine
    from tests.conftest import engine_config, run_engine

    fp8_dir, twin_dir = fp8_pair
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    prompts = [[1, 2, 3, 4, 5], [7, 11, 13], [40, 41, 42, 43, 44, 45, 46]]
    outs = {}
    for name, directory in (("fp8", fp8_dir), ("twin", twin_dir)):
        engine = LLMEngine(engine_config(directory))
        if name == "fp8":  # de-quantized at load by transformers' compressed-tensors integration
            q_proj = engine.model.model.layers[0].self_attn.q_proj
            assert isinstance(q_proj, torch.nn.Linear) and q_proj.weight.dtype == torch.float32
            assert engine.quantization.method == "none"  # no FP8 GEMM on the CPU
        outs[name] = [o.outputs[0].token_ids for o in run_engine(engine, prompts, params)]
    assert outs["fp8"] == outs["twin"]


def test_fp8_checkpoint_runs_fp8_where_the_backend_has_an_fp8_gemm(fp8_pair: tuple[Path, Path]) -> None:
    """With a backend that offers an FP8 factory, ``auto`` picks fp8 for the checkpoint and hands the
    factory codes equal to the checkpoint's (per-channel scales re-quantize exactly)."""
    from safetensors.torch import load_file

    from sagellm_core.builtin.cpu_backend import CPUBackend
    from sagellm_core.config import ModelConfig
    from sagellm_core.models import loader
    from sagellm_core.quant import quantize_loaded_model

    seen: dict[str, Any] = {}

    class Fp8Backend(CPUBackend):
        def quantized_linear(self, kind: str) -> Any:
            if kind != "fp8":
                return None

            def factory(qw: Any, dtype: torch.dtype) -> None:
                seen[len(seen)] = qw
                return None  # then the layer runs de-quantized
            return factory

    fp8_dir, _ = fp8_pair
    source = loader.resolve(str(fp8_dir))
    model = loader.load_model(source, torch.float32, torch.device("cpu"))
    report = quantize_loaded_model(model, ModelConfig(path=str(fp8_dir), dtype="float32"), Fp8Backend(),
                                   torch.float32, source)
    assert report.method == "fp8" and report.layers == {"fp8 (de-quantized)": 14}
    stored = load_file(str(fp8_dir / "model.safetensors"))
    first = seen[0]
    codes = stored["model.layers.0.self_attn.q_proj.weight"]
    assert torch.equal(first.codes.view(torch.uint8), codes.view(torch.uint8))
