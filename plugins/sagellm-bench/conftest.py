"""Lets ``pytest`` import ``sagellm_bench`` from a source checkout (pytest puts the directory of this
conftest on ``sys.path``), and the tiny model the benchmark tests run. The CLI tests need the
distribution installed, since its entry point adds ``sagellm bench``:
``pip install --no-deps -e plugins/sagellm-bench`` (scripts/setup.sh does it)."""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import pytest


@pytest.fixture(scope="session", autouse=True)
def bench_plugin_installed() -> None:
    """Fail with the fix, not with "invalid choice: 'bench'", where the distribution is missing."""
    try:
        metadata.distribution("sagellm-bench")
    except metadata.PackageNotFoundError:
        pytest.fail("the sagellm-bench distribution is not installed (its entry point adds `sagellm bench`): "
                    "run scripts/setup.sh, or pip install --no-deps -e plugins/sagellm-bench", pytrace=False)


@pytest.fixture(scope="session")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A two-layer random Llama with a 512-token vocabulary and no tokenizer (benchmarks feed token ids)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=512, max_position_embeddings=512)
    directory = tmp_path_factory.mktemp("bench-tiny-llama")
    LlamaForCausalLM(config).save_pretrained(directory)
    return directory
