"""Structured outputs on a CUDA GPU: the Triton token mask (`sagellm_cuda.bitmask`) against torch's,
the pinned host bitmask, and greedy constrained outputs identical with async scheduling on and off
(eager and CUDA graphs)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jsonschema
import pytest
import torch

from conftest import engine_config, save_tiny_model
from sagellm_core.engine import LLMEngine
from sagellm_core.sampling_params import SamplingParams
from sagellm_core.structured import manager
from sagellm_core.structured.bitmask import mask_logits

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
REPO = Path(__file__).resolve().parents[2]
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 8}, "kind": {"enum": ["cat", "dog"]},
                   "legs": {"type": "integer", "minimum": 0, "maximum": 8}},
    "required": ["name", "kind", "legs"], "additionalProperties": False,
}


@pytest.mark.parametrize("rows,vocab,words", [(256, 151936, 4748), (3, 151936, 1536), (5, 1000, 32), (1, 33, 1)])
def test_the_triton_mask_equals_torch(rows: int, vocab: int, words: int) -> None:
    pytest.importorskip("triton")
    from sagellm_cuda.bitmask import apply_token_bitmask

    generator = torch.Generator(device="cuda").manual_seed(rows)
    bitmask = torch.randint(-2**31, 2**31 - 1, (rows, words), dtype=torch.int32, device="cuda", generator=generator)
    with torch.inference_mode():  # the model's logits are inference tensors
        logits = torch.randn(rows, vocab, device="cuda", generator=generator)
    got = apply_token_bitmask(logits, bitmask)
    assert torch.equal(got, mask_logits(logits, bitmask))
    assert torch.isinf(got[:, 32 * words:]).all()


@pytest.fixture(scope="module")
def text_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama with a real tokenizer: the carried one (.whl/tokenizer) or the default
    model's."""
    from transformers import AutoTokenizer

    carried = REPO / ".whl" / "tokenizer"
    if not (carried / "tokenizer.json").exists():
        from sagellm_core.models.loader import default_model_dir

        carried = default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(carried)
    directory = save_tiny_model("llama", tmp_path_factory.mktemp("structured") / "llama", len(tokenizer))
    tokenizer.save_pretrained(directory)
    template = carried / "chat_template.jinja"
    if template.exists():
        shutil.copy(template, directory / template.name)
    return directory


def _greedy(model: Path, async_scheduling: str, graphs: bool) -> tuple[list[list[int]], LLMEngine]:
    engine = LLMEngine(engine_config(model, backend={"name": "cuda", "cuda_graphs": graphs},
                                     kv_cache={"block_size": 16, "num_blocks": 128},
                                     scheduler={"async_scheduling": async_scheduling}))
    constrained = SamplingParams(max_tokens=60, temperature=0.0, structured_outputs={"json": SCHEMA})
    free = SamplingParams(max_tokens=20, temperature=0.0, ignore_eos=True)
    prompts = ["Write something:", "A pet:", "Hello", "Another pet:"]
    ids = [engine.add_request(engine.encode(p), free if i == 2 else constrained) for i, p in enumerate(prompts)]
    finals = {}
    while engine.has_unfinished():
        finals.update({o.request_id: o for o in engine.step() if o.finished})
    for i, request_id in enumerate(ids):
        if i != 2:
            jsonschema.validate(json.loads(finals[request_id].outputs[0].text), SCHEMA)
    return [list(finals[i].outputs[0].token_ids) for i in ids], engine


@pytest.mark.parametrize("graphs", [False, True])
def test_greedy_constrained_tokens_are_the_same_with_async_scheduling_on_and_off(
        text_model: Path, graphs: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Async: the masks are prepared on the helper thread (any batch size here) while the forward
    pass runs; sync: computed when applied. A mask from a stale grammar would change the tokens."""
    monkeypatch.setattr(manager, "mask_threads", lambda: 2)
    monkeypatch.setattr(manager, "PARALLEL_MIN_ROWS", 1)
    sync, _ = _greedy(text_model, "off", graphs)
    pipelined, engine = _greedy(text_model, "on", graphs)
    assert pipelined == sync
    assert engine.structured._staging._pinned  # the host bitmask is pinned and reused
    assert engine.structured.stats.masked_steps > 0 and engine.structured.stats.helper_seconds > 0
