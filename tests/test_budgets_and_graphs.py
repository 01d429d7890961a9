"""Scheduler budgets derived from the device (explicit values win), reported in get_stats; decode
graphs captured at start-up for every bucket; ``--enforce-eager``; bad words resolved at admission."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from conftest import ReplayByRerun, engine_config, graph_engine, run_engine
from sagellm_core.cli.common import add_engine_options
from sagellm_core.cli.common import engine_config as cli_engine_config
from sagellm_core.config import EngineConfig
from sagellm_core.engine import LLMEngine
from sagellm_core.engine.budgets import GIB, device_budgets, resolve_budgets
from sagellm_core.errors import InvalidRequestError
from sagellm_core.models.graphs import bucket_sizes
from sagellm_core.sampling_params import SamplingParams


class FakeDevice:
    """What `device_budgets` reads of a backend."""

    def __init__(self, device_type: str, total_gib: float) -> None:
        self.device_type = device_type
        self.total = int(total_gib * GIB)

    def memory_info(self) -> tuple[int, int]:
        return self.total // 2, self.total


@pytest.mark.parametrize("device_type,gib,expected", [
    ("cuda", 141, (512, 16384)), ("cuda", 80, (512, 16384)), ("cuda", 40, (256, 8192)), ("cuda", 16, (128, 4096)),
    ("cuda", 8, (64, 2048)), ("cpu", 512, (128, 2048)),
])
def test_budgets_follow_the_device_class(device_type: str, gib: float, expected: tuple[int, int]) -> None:
    assert device_budgets(FakeDevice(device_type, gib))[:2] == expected  # type: ignore[arg-type]


def test_explicit_budgets_win_and_the_source_is_reported() -> None:
    config = EngineConfig.from_dict({"scheduler": {"max_num_seqs": 7}})
    resolved, budgets = resolve_budgets(config, FakeDevice("cuda", 141))  # type: ignore[arg-type]
    assert (resolved.scheduler.max_num_seqs, resolved.scheduler.max_num_batched_tokens) == (7, 16384)
    assert resolved.backend.max_graph_batch_size == 7
    assert budgets.source == {"max_num_seqs": "config", "max_num_batched_tokens": "derived",
                              "max_graph_batch_size": "derived"}


def test_an_engine_reports_its_derived_budgets(tiny_engine_dir: Path) -> None:
    base = engine_config(tiny_engine_dir)
    config = base.evolve(scheduler={"max_num_seqs": None, "max_num_batched_tokens": None})
    engine = LLMEngine(config)
    assert (engine.config.scheduler.max_num_seqs, engine.config.scheduler.max_num_batched_tokens) == (128, 2048)
    stats = engine.get_stats()
    assert stats["budgets"]["max_num_seqs"] == 128 and stats["budgets"]["source"]["max_num_seqs"] == "derived"
    assert stats["graph_capture"]["graphs"] == 0


def test_decode_graphs_are_captured_at_start_up(tiny_engine_dir: Path) -> None:
    capture = ReplayByRerun()
    engine = graph_engine(tiny_engine_dir, capture, backend={"max_graph_batch_size": 12})
    buckets = bucket_sizes(12)
    assert capture.captured == len(buckets) and engine.get_stats()["graph_capture"]["graphs"] == len(buckets)
    run_engine(engine, [[1, 2, 3], [4, 5]], SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True))
    assert capture.captured == len(buckets)  # nothing captured lazily
    assert engine.runner.graphs.num_replays > 0


def _cli(*argv: str) -> EngineConfig:
    parser = argparse.ArgumentParser()
    add_engine_options(parser)
    return cli_engine_config(parser.parse_args(list(argv)))


def test_enforce_eager_turns_graphs_off() -> None:
    assert _cli("--enforce-eager").backend.cuda_graphs is False
    assert _cli().backend.cuda_graphs is True
    assert _cli().scheduler.max_num_seqs is None  # derived when the engine starts


def test_bad_words_are_banned_and_multi_token_words_refused(tokenizer_model: Path) -> None:
    engine = LLMEngine(engine_config(tokenizer_model))
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    free = run_engine(engine, [engine.encode("Once upon a time")], params)[0].outputs[0]
    word = engine.tokenizer.decode([free.token_ids[0]]).strip()
    banned = run_engine(engine, [engine.encode("Once upon a time")], params.replace(bad_words=[word]))[0].outputs[0]
    ids = engine.admission.check_token_params(params.replace(bad_words=[word]))
    assert free.token_ids[0] in ids and not ids & set(banned.token_ids)
    with pytest.raises(InvalidRequestError) as error:
        engine.add_request("Hi", params.replace(bad_words=["antidisestablishmentarianism"]))
    assert error.value.param == "bad_words"
    with pytest.raises(InvalidRequestError):
        engine.add_request("Hi", params.replace(logit_bias={10**7: 1.0}))


