"""Benchmark outputs: one JSON file, one markdown file and PNG plots per run, plus the printed report.

Files are ``<name>.json``, ``<name>.md`` and ``<name>_<plot>.png`` in the output directory.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import attrs

from sagellm_bench.environment import format_environment


def fmt(value: Any) -> str:
    """Numbers for tables: integers as is, floats with 3-4 significant digits."""
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isinf(value) or math.isnan(value):
            return str(value)
        if value == 0:
            return "0"
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 1:
            return f"{value:.2f}"
        return f"{value:.3g}"
    return str(value)


@attrs.define
class Table:
    """A titled table rendered as markdown (printed and written)."""

    title: str
    headers: list[str]
    rows: list[list[Any]] = attrs.field(factory=list)

    def markdown(self) -> str:
        lines = [f"### {self.title}", "", "| " + " | ".join(self.headers) + " |",
                 "|" + "|".join(" --- " for _ in self.headers) + "|"]
        lines += ["| " + " | ".join(fmt(cell) for cell in row) + " |" for row in self.rows]
        return "\n".join(lines)


@attrs.define
class BenchReport:
    """Everything one benchmark run produced. ``results`` is the machine-readable part of the JSON."""

    name: str
    environment: dict[str, Any]
    setup: dict[str, Any]
    results: dict[str, Any]
    tables: list[Table] = attrs.field(factory=list)
    comparisons: list[str] = attrs.field(factory=list)
    notes: list[str] = attrs.field(factory=list)

    def to_json(self) -> dict[str, Any]:
        return {"benchmark": self.name, "environment": self.environment, "setup": self.setup,
                "results": self.results, "comparisons": self.comparisons, "notes": self.notes}

    def markdown(self) -> str:
        parts = [f"## sagellm bench {self.name}", ""]
        parts += [f"- {line}" for line in format_environment(self.environment)]
        parts += [f"- {key}: {value}" for key, value in self.setup.items() if not isinstance(value, (dict, list))]
        for table in self.tables:
            parts += ["", table.markdown()]
        if self.comparisons:
            parts += ["", "### Peers measured in the same run", ""] + [f"- {line}" for line in self.comparisons]
        if self.notes:
            parts += ["", "### Notes", ""] + [f"- {line}" for line in self.notes]
        return "\n".join(parts) + "\n"


def _json_default(value: Any) -> Any:
    if attrs.has(type(value)):
        return attrs.asdict(value)
    if isinstance(value, Path):
        return str(value)
    return repr(value)


def write_report(report: BenchReport, output_dir: str | Path, figures: dict[str, Any] | None = None
                 ) -> list[Path]:
    """Write JSON, markdown and each matplotlib figure as PNG; print the markdown; return the paths."""
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{report.name}.json", out / f"{report.name}.md"]
    figure_paths = {key: out / f"{report.name}_{key}.png" for key in (figures or {})}
    data = report.to_json()
    data["files"] = [str(p) for p in paths + list(figure_paths.values())]
    paths[0].write_text(json.dumps(data, indent=2, default=_json_default) + "\n", encoding="utf-8")
    text = report.markdown()
    paths[1].write_text(text, encoding="utf-8")
    for key, figure in (figures or {}).items():
        save_figure(figure, figure_paths[key])
    paths += list(figure_paths.values())
    print("\n" + text)
    print("wrote: " + ", ".join(str(p) for p in paths), flush=True)
    return paths


# ---- plots ---------------------------------------------------------------------------------------
def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(figure: Any, path: Path) -> None:
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    _pyplot().close(figure)


def panel_bars(panels: dict[str, dict[str, float]], title: str, floors: dict[str, tuple[str, float]] | None = None
               ) -> Any:
    """One subplot per metric (panel title -> {bar label: value}); optional labelled floor line per panel."""
    plt = _pyplot()
    figure, axes_list = plt.subplots(1, len(panels), figsize=(3.6 * len(panels) + 1, 4), squeeze=False)
    for axes, (name, values) in zip(axes_list[0], panels.items()):
        labels = list(values)
        bars = axes.bar(range(len(labels)), [values[k] for k in labels], color=[f"C{i}" for i in range(len(labels))])
        axes.bar_label(bars, labels=[fmt(float(values[k])) for k in labels], fontsize=8)
        floor = (floors or {}).get(name)
        if floor is not None:
            axes.axhline(floor[1], color="black", linestyle="--", linewidth=1, label=floor[0])
            axes.legend(fontsize=8)
        axes.set_xticks(range(len(labels)), labels, rotation=15, fontsize=8)
        axes.set_title(name, fontsize=10)
        axes.margins(y=0.15)
    figure.suptitle(title)
    return figure


def line_chart(series: dict[str, tuple[Sequence[float], Sequence[float]]], xlabel: str, ylabel: str, title: str,
               logy: bool = False, xticklabels: Sequence[str] | None = None) -> Any:
    """One line per series of (x values, y values); ``xticklabels`` names positions 0..n-1."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7, 4))
    for name, (xs, ys) in series.items():
        axes.plot(xs, ys, marker="o" if len(xs) < 20 else None, markersize=4, label=name)
    if logy:
        axes.set_yscale("log")
    if xticklabels is not None:
        axes.set_xticks(range(len(xticklabels)), list(xticklabels))
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.legend(fontsize=8)
    axes.grid(alpha=0.3)
    return figure


def labelled_scatter(points: dict[str, tuple[float, float]], xlabel: str, ylabel: str, title: str) -> Any:
    """One labelled point per entry (e.g. TTFT vs TPOT per PD mode)."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(6, 4.5))
    for name, (x, y) in points.items():
        axes.scatter([x], [y], s=60)
        axes.annotate(name, (x, y), textcoords="offset points", xytext=(6, 6))
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.margins(0.25)
    return figure
