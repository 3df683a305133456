"""The training curves of a run: a PNG of the losses and metrics that Lightning's CSVLogger wrote.

matplotlib is an optional extra (``pip install "lightning-peft[plot]"``); without it the run
still has its ``metrics.csv``.
"""

from __future__ import annotations

import csv
from pathlib import Path

from lightning_peft.core.checks import import_optional
from lightning_peft.core.files import atomic_write


def read_metrics(path: Path) -> dict[str, list[tuple[int, float]]]:
    """Each logged quantity of a CSVLogger ``metrics.csv`` as ``(step, value)`` points, in file order."""
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    series: dict[str, list[tuple[int, float]]] = {}
    for row in rows:
        for name, value in row.items():
            if name not in ("step", "epoch") and value not in (None, ""):
                series.setdefault(name, []).append((int(row["step"]), float(value)))
    return series


def plot_curves(metrics_csv: Path, out: Path, title: str = "") -> Path:
    """Draw the losses (left) and the other metrics (right) of ``metrics_csv`` over steps into the PNG ``out``."""
    figure_module = import_optional("matplotlib.figure", "plot", "the training curves")
    series = read_metrics(metrics_csv)
    figure = figure_module.Figure(figsize=(11, 4), layout="constrained")
    losses, metrics = figure.subplots(1, 2)
    for name, points in series.items():
        axes = losses if name.endswith("loss") else metrics
        steps, values = zip(*points, strict=True)
        axes.plot(steps, values, marker="o" if len(points) < 20 else None, label=name)
    for axes, what in ((losses, "loss"), (metrics, "metric")):
        axes.set_xlabel("optimizer step")
        axes.set_ylabel(what)
        axes.grid(alpha=0.3)
        if axes.has_data():
            axes.legend()
    figure.suptitle(title or str(metrics_csv.parent))
    atomic_write(out, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
    return out
