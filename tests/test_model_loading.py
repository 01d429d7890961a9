"""Model sources: local directories, the offline Hugging Face hub cache, GGUF files; clear errors."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from conftest import engine_config, run_engine
from sagellm_core.engine import LLMEngine
from sagellm_core.errors import ModelLoadError
from sagellm_core.models import loader
from sagellm_core.sampling_params import SamplingParams


def test_hub_id_resolves_from_the_offline_cache(tmp_path: Path, tiny_models: dict[str, Path],
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    cache = tmp_path / "hub"
    snapshot = cache / "models--acme--tiny-llama" / "snapshots" / "0123abcd"
    shutil.copytree(tiny_models["llama"], snapshot)
    (cache / "models--acme--tiny-llama" / "refs").mkdir(parents=True)
    (cache / "models--acme--tiny-llama" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    source = loader.resolve("acme/tiny-llama")
    assert source.directory == snapshot
    engine = LLMEngine(engine_config(snapshot).evolve(model={"path": "acme/tiny-llama"}))
    out = run_engine(engine, [[1, 2, 3]], SamplingParams(max_tokens=3, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 3
    with pytest.raises(ModelLoadError, match="not in the local Hugging Face cache"):
        loader.resolve("acme/missing-model")


def test_gguf_file_is_converted_once_and_generates(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                   default_model_dir: Path) -> None:
    monkeypatch.setenv("SAGELLM_CACHE_DIR", str(tmp_path))
    gguf = loader.default_gguf_path()
    source = loader.resolve(str(gguf))
    assert (source.directory / "model.safetensors").is_file() and source.directory.parent == tmp_path / "models"
    stamp = (source.directory / "model.safetensors").stat().st_mtime_ns
    assert loader.resolve(str(gguf)).directory == source.directory  # cached: no second conversion
    assert (source.directory / "model.safetensors").stat().st_mtime_ns == stamp
    tokenizer = loader.load_tokenizer(source)
    assert tokenizer is not None and tokenizer.chat_template


def test_directory_without_config_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ModelLoadError, match="no config.json"):
        loader.resolve(str(tmp_path))
