"""Benchmark output: the JSON file and a PNG of bar charts, one panel per metric, one bar per system.

Generic over benchmarks: results are `{system: {metric: value}}` mappings.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure  # no pyplot: no global state, no GUI backend, renders with Agg

Results = Mapping[str, Mapping[str, Any]]

THROUGHPUT_PANELS = (
    ("tok_s", "throughput (generated tok/s)"),
    ("ttft_p50_s", "time to first token, p50 (s)"),
    ("tpot_p50_s", "time per output token, p50 (s)"),
)


def write_json(path: Path, payload: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    # allow_nan=False: a NaN or inf is a bug upstream, and strict JSON readers reject it anyway.
    path.write_text(json.dumps(payload, indent=2, allow_nan=False) + "\n", encoding="utf-8")


def plot_bars(path: Path, results: Results, panels: Sequence[tuple[str, str]], title: str) -> None:
    """One bar chart per (metric key, axis label) in `panels`, systems on the x axis, values on the bars."""
    systems = list(results)
    fig = Figure(figsize=(4.2 * len(panels), 4.2), layout="constrained")
    fig.suptitle(title)
    for ax, (key, label) in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
        values = [results[s].get(key) for s in systems]
        heights = [v if v is not None else 0.0 for v in values]
        bars = ax.bar(systems, heights, color=[f"C{i}" for i in range(len(systems))])
        ax.bar_label(bars, labels=[_fmt(v) for v in values], fontsize=8)
        ax.set_ylabel(label)
        ax.tick_params(axis="x", labelrotation=30)
        ax.margins(y=0.15)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def _fmt(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
