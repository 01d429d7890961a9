"""Several engines' Prometheus text as one exposition, each sample labelled with its engine's index
(data-parallel replicas behind one server: ``sagellm_num_requests_running{engine="1"}``)."""

from __future__ import annotations

from typing import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample


class _Relabeled:
    """A collector that yields the families parsed from several texts, with a label per text."""

    def __init__(self, texts: list[bytes], label: str) -> None:
        self.texts = texts
        self.label = label

    def collect(self) -> Iterator[Metric]:
        merged: dict[str, Metric] = {}
        for index, text in enumerate(self.texts):
            for family in text_string_to_metric_families(text.decode()):
                target = merged.get(family.name)
                if target is None:
                    target = merged[family.name] = Metric(family.name, family.documentation, family.type)
                for sample in family.samples:
                    target.samples.append(Sample(sample.name, {**sample.labels, self.label: str(index)},
                                                 sample.value, sample.timestamp, sample.exemplar))
        yield from merged.values()


def merge_expositions(texts: list[bytes], label: str) -> bytes:
    """One Prometheus text of ``texts``, the samples of ``texts[i]`` labelled ``label="i"``."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Relabeled(texts, label))  # type: ignore[arg-type]
    return generate_latest(registry)
