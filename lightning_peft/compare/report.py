"""The report of ``lightning-peft compare``: report.csv, report.json, report.md and plots of quality against cost.

``write_report`` is a pure function of the result rows (one per method and seed) and the run's context: it
measures nothing and every number it writes comes from the rows. A method's aggregates are over its ok seeds;
its metric std is the sample standard deviation, None (``null`` in the JSON, no ``±`` in report.md) with fewer
than two ok seeds, since one seed says nothing about the spread. All files are written atomically and renamed into
place together, so a killed run leaves the previous report whole. matplotlib is optional (the ``plot`` extra):
without it the report has no plots and report.md says how to get them.
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from lightning_peft.core.files import atomic_write_all

FIELDS = ("method", "seed", "status", "error", "learning_rate", "metric_name", "metric", "higher_is_better",
          "trainable_params", "total_params", "trainable_percent", "adapter_bytes", "peak_memory_mib", "memory_kind",
          "estimate_mib", "steps", "train_time_s", "step_time_s", "samples_per_s", "tokens_per_s", "batch_size",
          "latency_b1_ms", "latency_b1_merged_ms", "base_latency_b1_ms", "latency_batch_ms", "latency_batch_merged_ms",
          "base_latency_batch_ms", "forgetting_base_ppl", "forgetting_tuned_ppl", "wall_s")
LABELS = ("metric_name", "higher_is_better", "memory_kind")  # the same for every seed of a method: taken, not averaged
AVERAGED = tuple(f for f in FIELDS if f not in ("method", "seed", "status", "error", "metric", *LABELS))
FULL = "full"  # the method every other one is measured against, when it ran
PLOT_EXTRA = 'plots: pip install "lightning-peft[plot]"'


class TradeOff(NamedTuple):
    """Quality against one cost: the plot's file, the summary key on x, what x is, whether x is drawn log-scaled."""

    file: str
    key: str
    cost: str
    log: bool


TRADE_OFFS = (TradeOff("quality_vs_params.png", "trainable_params", "trainable parameters", True),
              TradeOff("quality_vs_memory.png", "peak_memory_mib", "peak memory (MiB)", False),
              TradeOff("quality_vs_time.png", "train_time_s", "training time (s)", False))

Point = tuple[str, float, float]  # method, cost (lower is better), quality


def _json_safe(value: Any) -> Any:
    """``value`` with NaN and infinities as None (JSON's null): strict JSON has no NaN, and a diverged run has one."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def write_report(rows: list[dict], out: Path | str, context: dict) -> dict[str, Path]:
    """Write report.csv, report.json, report.md and the plots into ``out``; return their paths by kind.

    The keys are ``md``, ``csv``, ``json`` and one per plot written, named after its file (``quality_vs_params``).
    """
    out = Path(out)
    summary = summarize(rows)
    paths = {"md": out / "report.md", "csv": out / "report.csv", "json": out / "report.json"}
    figures = plot_figures(summary, context.get("recipe")) if _matplotlib_installed() else None
    plots = {Path(file).stem: out / file for file in figures or {}}
    report = {"context": context, "rows": rows, "summary": summary}
    as_json = json.dumps(_json_safe(report), indent=2, default=str, allow_nan=False) + "\n"
    texts = {paths["csv"]: csv_text(rows), paths["json"]: as_json,
             paths["md"]: markdown(rows, summary, context, figures)}
    writers = {path: _bytes_writer(text) for path, text in texts.items()}
    writers.update({out / file: _png_writer(figure) for file, figure in (figures or {}).items()})
    atomic_write_all(writers)
    for trade_off in TRADE_OFFS:  # a plot of an earlier report that this one has not drawn would mislead
        if Path(trade_off.file).stem not in plots:
            (out / trade_off.file).unlink(missing_ok=True)
    return {**paths, **plots}


def _bytes_writer(text: str) -> Callable[[Path], None]:
    """A writer of ``text`` as UTF-8 bytes (no newline translation) for ``atomic_write_all``."""
    return lambda tmp: tmp.write_bytes(text.encode("utf-8"))


def _png_writer(figure: Any) -> Callable[[Path], None]:
    """A writer of ``figure`` as a PNG for ``atomic_write_all`` (the temporary path has no .png to go by)."""
    return lambda tmp: figure.savefig(tmp, format="png", dpi=120)


# --- aggregates ---------------------------------------------------------------------------------------------------

def summarize(rows: list[dict]) -> dict[str, dict[str, Any]]:
    """Per method, in first-seen order: seeds ok and failed, the metric's mean and std, the mean of every number."""
    by_method: dict[str, list[dict]] = {}
    for row in rows:
        by_method.setdefault(row["method"], []).append(row)
    return {method: _aggregate(method_rows) for method, method_rows in by_method.items()}


def _aggregate(rows: list[dict]) -> dict[str, Any]:
    """One method's aggregates over its ok rows (see the module docstring for the std with one seed)."""
    ok = [row for row in rows if row.get("status") == "ok"]
    failed = [row for row in rows if row.get("status") != "ok"]
    values = _present(ok, "metric")
    names = _metric_names(ok)
    return {"seeds_ok": len(ok), "seeds_failed": len(failed), "seeds": [row.get("seed") for row in ok],
            "seeds_diverged": [row.get("seed") for row in ok if _diverged(row)],
            "errors": [{"seed": row.get("seed"), "error": row.get("error")} for row in failed],
            **{label: next((row[label] for row in ok if row.get(label) is not None), None) for label in LABELS},
            "metric_mean": statistics.fmean(values) if values else None,
            "metric_std": _spread(values),
            **{key: _mean(_present(ok, key)) for key in AVERAGED},
            "metrics": {name: _mean([row["metrics"][name] for row in ok if (row.get("metrics") or {}).get(name)
                                     is not None]) for name in names}}


def _diverged(row: dict) -> bool:
    """Whether a run's test metrics hold a value that is not finite: its training diverged (an accuracy from NaN
    logits is finite, but not its loss)."""
    values = [row.get("metric"), *(row.get("metrics") or {}).values()]
    return any(value is not None and not _finite(value) for value in values)


def _present(rows: list[dict], key: str) -> list[Any]:
    """The values of ``key`` in the rows that have one."""
    return [row[key] for row in rows if row.get(key) is not None]


def _spread(values: list[float]) -> float | None:
    """The sample standard deviation over two seeds or more; NaN when a seed diverged (stdev fails on one)."""
    if len(values) < 2:
        return None
    return statistics.stdev(values) if all(math.isfinite(v) for v in values) else math.nan


def _mean(values: list[float]) -> float | None:
    """The mean, or None without values."""
    return statistics.fmean(values) if values else None


def _metric_names(rows: list[dict]) -> list[str]:
    """Every test metric's name in the rows' ``metrics``, in first-seen order."""
    return list(dict.fromkeys(name for row in rows for name in (row.get("metrics") or {})))


# --- report.csv ---------------------------------------------------------------------------------------------------

def csv_text(rows: list[dict]) -> str:
    """One line per row: the FIELDS, then a ``metric:NAME`` column per test metric; an empty cell where unmeasured."""
    names = _metric_names(rows)
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow([*FIELDS, *(f"metric:{name}" for name in names)])
    for row in rows:
        metrics = row.get("metrics") or {}
        writer.writerow([_cell(row.get(key)) for key in FIELDS] + [_cell(metrics.get(name)) for name in names])
    return buffer.getvalue()


def _cell(value: Any) -> Any:
    """A CSV cell: the value, or empty when it is missing."""
    return "" if value is None else value


# --- Pareto fronts ------------------------------------------------------------------------------------------------

def pareto_front(points: list[tuple[str, float, float]], higher_is_better: bool) -> list[str]:
    """The names of the points no other point dominates, by increasing cost (x: lower is better; y: quality).

    A point dominates another when its quality is as good or better at a cost as low or lower, one strictly.
    Two identical points do not dominate each other: both stay on the front.
    """
    sign = 1 if higher_is_better else -1

    def dominates(a: Point, b: Point) -> bool:
        as_good = a[1] <= b[1] and sign * a[2] >= sign * b[2]
        return as_good and (a[1] < b[1] or sign * a[2] > sign * b[2])

    front = [point for point in points if not any(dominates(other, point) for other in points)]
    return [name for name, _, _ in sorted(front, key=lambda p: (p[1], -sign * p[2]))]


def quality_points(summary: dict[str, dict], trade_off: TradeOff) -> tuple[list[Point], list[str]]:
    """The (method, cost, quality) points of a trade-off, and the methods with a quality but no usable cost."""
    points, missing = [], []
    for method in _ranked_methods(summary):
        cost = summary[method][trade_off.key]
        if _finite(cost) and (cost > 0 or not trade_off.log):
            points.append((method, cost, summary[method]["metric_mean"]))
        else:
            missing.append(method)
    return points, missing


def _ranked_methods(summary: dict[str, dict]) -> list[str]:
    """The methods with a measured quality (an ok seed with a finite metric) and no diverged seed."""
    return [method for method, s in summary.items() if _finite(s["metric_mean"]) and not s.get("seeds_diverged")]


def _finished(summary: dict[str, dict]) -> list[str]:
    """The methods with an ok seed, their quality measured or not (a recipe without a test split)."""
    return [method for method, s in summary.items() if s["seeds_ok"]]


def _finite(value: Any) -> bool:
    """Whether ``value`` is a finite number (not None, NaN or infinite)."""
    return isinstance(value, int | float) and math.isfinite(value)


def _quality_labels(summary: dict[str, dict]) -> tuple[str, bool]:
    """The metric's name and direction, from the first method that measured it ("quality" when none did)."""
    measured = _ranked_methods(summary)
    if not measured:
        return "quality", True
    first = summary[measured[0]]
    return first["metric_name"] or "metric", first["higher_is_better"] is not False


# --- plots --------------------------------------------------------------------------------------------------------

def _matplotlib_installed() -> bool:
    """Whether matplotlib (the ``plot`` extra) imports."""
    try:
        import matplotlib.backends.backend_agg  # noqa: F401
    except ImportError:
        return False
    return True


def plot_figures(summary: dict[str, dict], recipe: str | None = None) -> dict[str, Any]:
    """A figure per trade-off that has a cost for at least one method, by file name."""
    if not _ranked_methods(summary):
        return {}
    name, higher = _quality_labels(summary)
    figures = {}
    for trade_off in TRADE_OFFS:
        points, _ = quality_points(summary, trade_off)
        if points:
            figures[trade_off.file] = _draw(trade_off, points, summary, name, higher, recipe)
    return figures


def _draw(trade_off: TradeOff, points: list[Point], summary: dict[str, dict], metric: str, higher: bool,
          recipe: str | None) -> Any:
    """Quality (mean, std error bars) against cost, each point named, the Pareto front a step line over red points."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 5.5), layout="constrained")
    FigureCanvasAgg(figure)  # Agg draws it: no display, no pyplot state
    axes = figure.subplots()
    front = pareto_front(points, higher)
    by_name = {point[0]: point for point in points}
    axes.step([by_name[n][1] for n in front], [by_name[n][2] for n in front], where="post", color="C3", alpha=0.5,
              linewidth=2, label="Pareto front", zorder=1)
    labels = []
    for method, cost, quality in points:
        on_front = method in front
        axes.errorbar(cost, quality, yerr=summary[method]["metric_std"], fmt="o", capsize=4, zorder=3,
                      markersize=9 if on_front else 6, color="C3" if on_front else "C0")
        labels.append(axes.annotate(method, (cost, quality), textcoords="offset points", xytext=LABEL_SPOTS[0][0],
                                    fontsize=10))
    axes.plot([], [], "o", color="C3", markersize=9, label="Pareto-optimal")
    if len(front) < len(points):
        axes.plot([], [], "o", color="C0", markersize=6, label="dominated")
    if trade_off.log:
        axes.set_xscale("log")
    axes.margins(x=0.15, y=0.15)
    axes.set_xlabel(_cost_label(trade_off, summary, [p[0] for p in points]))
    axes.set_ylabel(f"{metric}, mean ± std over seeds ({'higher' if higher else 'lower'} is better)")
    axes.set_title(f"{recipe + ': ' if recipe else ''}{metric} vs {trade_off.cost.split(' (')[0]}")
    axes.grid(alpha=0.3)
    axes.legend(loc="best")
    _spread_labels(figure, axes, labels)
    return figure


LABEL_SPOTS = (((7, 5), "left"), ((7, -14), "left"), ((-7, 5), "right"), ((-7, -14), "right"), ((0, 9), "center"),
               ((0, -20), "center"), ((7, 18), "left"), ((7, -27), "left"))  # around a point, in order of preference


def _spread_labels(figure: Any, axes: Any, labels: list[Any]) -> None:
    """Put each point's name in the first spot beside it that covers no point and no name placed before."""
    from matplotlib.transforms import Bbox

    figure.canvas.draw()  # the layout settles the axes, and so where each name lands
    renderer = figure.canvas.get_renderer()
    marker = 6 * figure.dpi / 72  # half a marker's width in pixels
    placed = [Bbox.from_bounds(x - marker, y - marker, 2 * marker, 2 * marker)
              for x, y in (axes.transData.transform(label.xy) for label in labels)]
    for label in labels:
        spots = []
        for offset, align in LABEL_SPOTS:
            label.set_position(offset)
            label.set_horizontalalignment(align)
            box = label.get_window_extent(renderer)
            spots.append((sum(_overlap(box, other) for other in placed), offset, align))
            if spots[-1][0] == 0:
                break
        _, offset, align = min(spots, key=lambda spot: spot[0])  # the first free spot, else the least covered
        label.set_position(offset)
        label.set_horizontalalignment(align)
        placed.append(label.get_window_extent(renderer))


def _overlap(a: Any, b: Any) -> float:
    """The area two boxes share, in pixels."""
    return max(0.0, min(a.x1, b.x1) - max(a.x0, b.x0)) * max(0.0, min(a.y1, b.y1) - max(a.y0, b.y0))


def _cost_label(trade_off: TradeOff, summary: dict[str, dict], methods: list[str]) -> str:
    """The x axis label: what the cost is, its unit, its scale, and for memory what was measured (rss, cuda)."""
    label = trade_off.cost + (", log scale" if trade_off.log else "")
    if trade_off.key == "peak_memory_mib":
        kinds = sorted({summary[m]["memory_kind"] for m in methods if summary[m]["memory_kind"]})
        label += f", {' / '.join(kinds)}" if kinds else ""
    return label


# --- report.md ----------------------------------------------------------------------------------------------------

def markdown(rows: list[dict], summary: dict[str, dict], context: dict, figures: dict[str, Any] | None) -> str:
    """report.md: the context, the verdict, the table, the failures, the plots (``figures`` None: no matplotlib)."""
    lines = _header(context) + ["## Verdict", ""] + _verdict(summary) + [""]
    if _finished(summary):
        lines += ["## Results", ""] + _table(summary) + [""]
    settings = _settings_lines(rows)
    if settings:
        lines += ["## Settings", ""] + settings + [""]
    sweeps = _sweep_table(rows)
    if sweeps:
        lines += ["## Learning rates", "", "Chosen per method on a validation split cut from the training rows "
                  "(the test rows were not used), the first seed's training budget per rate.", ""] + sweeps + [""]
    failures = [row for row in rows if row.get("status") != "ok"]
    if failures:
        lines += ["## Failed", ""] + [f"- {row['method']} (seed {row.get('seed')}): {row.get('error') or 'no error'}"
                                      for row in failures] + [""]
    lines += ["## Plots", ""] + _plots_section(summary, figures)
    return "\n".join(lines).rstrip("\n") + "\n"


def _header(context: dict) -> list[str]:
    """The title and what was run where: command, machine, versions, date, total wall time."""
    versions = ", ".join(f"{name} {version}" for name, version in (context.get("versions") or {}).items())
    command = f"`{context['command']}`" if context.get("command") else None
    facts = [("recipe", context.get("recipe")), ("command", command), ("machine", context.get("machine")),
             ("versions", versions or None), ("started", context.get("started")),
             ("total wall time", duration(context.get("wall_s")))]
    return [f"# lightning-peft compare: {context.get('recipe') or 'report'}", ""] + [
        f"- **{name}**: {value}" for name, value in facts if value] + [""]


def _table(summary: dict[str, dict]) -> list[str]:
    """One row per method with an ok seed: quality (and distance to full), size, memory, speed, latency, forgetting."""
    methods = _finished(summary)
    metric, _ = _quality_labels(summary)
    full = summary[FULL]["metric_mean"] if FULL in _ranked_methods(summary) else None
    kinds = sorted({summary[m]["memory_kind"] for m in methods if summary[m]["memory_kind"]})
    batch = f"b{_batch_size(summary)}" if _batch_size(summary) else "batch"
    forgetting = any(summary[m]["forgetting_tuned_ppl"] is not None for m in methods)
    columns: list[tuple[str, Callable[[dict], str]]] = [
        ("seeds", lambda s: f"{s['seeds_ok']}" + (f" ({s['seeds_failed']} failed)" if s["seeds_failed"] else "")),
        (f"{metric} (mean ± std)", lambda s: _diverged_text(s) or _quality_text(s["metric_mean"], s["metric_std"]))]
    if full is not None:
        reference = summary[FULL]
        columns.append((f"vs {FULL}", lambda s: "reference" if s is reference
                        else _distance(s["metric_mean"], full, metric)))
    columns += [
        ("trainable params", lambda s: _count(s["trainable_params"])),
        ("trainable %", lambda s: f"{s['trainable_percent']:.3g}%" if _finite(s["trainable_percent"]) else "–"),
        ("adapter", lambda s: _size(s["adapter_bytes"])),
        (f"peak MiB{' (' + ' / '.join(kinds) + ')' if kinds else ''}", _memory_text),
        ("step s", lambda s: _num(s["step_time_s"])),
        ("samples/s", lambda s: _num(s["samples_per_s"])),
        ("tokens/s", lambda s: _num(s["tokens_per_s"])),
        ("latency b1 ms (unmerged / merged / base)", lambda s: _latency_text(s, "b1")),
        (f"latency {batch} ms (unmerged / merged / base)", lambda s: _latency_text(s, "batch"))]
    if forgetting:
        columns.append(("other-domain ppl (base → tuned)", _forgetting_text))
    header = ["method"] + [name for name, _ in columns]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join([m] + [text(summary[m]) for _, text in columns]) + " |" for m in methods]


def _settings_lines(rows: list[dict]) -> list[str]:
    """Per method, where its settings came from (the recipe, a built-in recipe, the defaults), its rate and --set."""
    first: dict[str, dict] = {}
    for row in rows:
        if row.get("settings_from"):
            first.setdefault(row["method"], row)
    lines = []
    for method, row in first.items():
        given = ", ".join(f"{key}={value}" for key, value in (row.get("overrides") or {}).items())
        rate = f", learning rate {row['learning_rate']:.3g}" if _finite(row.get("learning_rate")) else ""
        lines.append(f"- {method}: settings from {row['settings_from']}{rate}" + (f"; --set {given}" if given else ""))
    return lines


def _sweep_table(rows: list[dict]) -> list[str]:
    """Per method that swept its learning rate: the rate chosen, and each rate tried with its validation score."""
    swept = {row["method"]: row for row in rows if row.get("lr_sweep")}
    lines = ["| method | chosen rate | rates tried (validation score) |", "|---|---|---|"] if swept else []
    for method, row in swept.items():
        tried = ", ".join(f"{t['learning_rate']:.3g} ({_metric(t['metric']) if _finite(t['metric']) else 'failed'})"
                          for t in row["lr_sweep"])
        chosen = f"{row['learning_rate']:.3g}" if any(_finite(t["metric"]) for t in row["lr_sweep"]) else \
            f"none scored: the method's own {row['learning_rate']:.3g} kept"
        lines.append(f"| {method} | {chosen} | {tried} |")
    return lines


def _batch_size(summary: dict[str, dict]) -> int | None:
    """The batch size of the batch latencies when every method measured the same one, else None."""
    sizes = {round(s["batch_size"]) for s in summary.values() if _finite(s["batch_size"])}
    return sizes.pop() if len(sizes) == 1 else None


def _memory_text(s: dict) -> str:
    """Peak memory, with the estimate made before training beside it when there was one."""
    estimate = f" (est. {_num(s['estimate_mib'])})" if _finite(s["estimate_mib"]) else ""
    return _num(s["peak_memory_mib"]) + estimate


def _latency_text(s: dict, size: str) -> str:
    """Milliseconds per forward at batch 1 or the full batch: unmerged / merged / the base model."""
    return " / ".join(_num(s[key]) for key in (f"latency_{size}_ms", f"latency_{size}_merged_ms",
                                               f"base_latency_{size}_ms"))


def _forgetting_text(s: dict) -> str:
    """The other-domain perplexity before and after tuning, and its relative change."""
    base, tuned = s["forgetting_base_ppl"], s["forgetting_tuned_ppl"]
    if not (_finite(base) and _finite(tuned)):
        return "–"
    return f"{_num(base)} → {_num(tuned)} ({100 * (tuned - base) / base:+.1f}%)"


def _plots_section(summary: dict[str, dict], figures: dict[str, Any] | None) -> list[str]:
    """The plots embedded, and a note for each plot not drawn and each method left out of one."""
    if figures is None:
        return [PLOT_EXTRA]
    lines, notes = [], []
    metric = _quality_labels(summary)[0] if _ranked_methods(summary) else "quality"
    for trade_off in TRADE_OFFS:
        _, missing = quality_points(summary, trade_off)
        if trade_off.file in figures:
            lines += [f"![{metric} vs {trade_off.cost}]({trade_off.file})", ""]
            notes += [f"{method} has no {trade_off.key}: left out of {trade_off.file}" for method in missing]
        else:
            notes.append(f"{trade_off.file} not drawn: no method has both {trade_off.key} and a measured quality")
    return lines + [f"Note: {note}." for note in notes]


# --- the verdict --------------------------------------------------------------------------------------------------

def _verdict(summary: dict[str, dict]) -> list[str]:
    """A line per question (best quality, smallest adapter, least memory, fastest training and inference, Pareto
    fronts), each naming the winner's numbers and the runner-up's."""
    if not _finished(summary):
        return ["No method finished."]
    metric, higher = _quality_labels(summary)
    lines = [_best_quality(summary, metric, higher) if _ranked_methods(summary) else
             "- Quality: not measured, since the recipe's data has no test split (give it a test_file)"]
    diverged = [f"{method} ({_diverged_text(s).removeprefix('diverged ')})" for method, s in summary.items()
                if _diverged_text(s)]
    if diverged:
        lines.append(f"- Not ranked, a seed's test metrics not finite (training diverged): {', '.join(diverged)}")
    lines += _cheapest(summary, "Smallest adapter", "adapter_bytes", lambda s: _size(s["adapter_bytes"]))
    lines += _cheapest(summary, "Least memory", "peak_memory_mib", lambda s: f"{_num(s['peak_memory_mib'])} MiB peak"
                       + (f" {s['memory_kind']}" if s["memory_kind"] else ""))
    lines += _cheapest(summary, "Fastest training", "step_time_s", lambda s: f"{_num(s['step_time_s'])} s/step")
    batch = f"batch {_batch_size(summary)}" if _batch_size(summary) else "the measured batch"
    lines += _fastest_inference(summary, "b1", "batch 1") + _fastest_inference(summary, "batch", batch)
    for trade_off in TRADE_OFFS:
        points, _ = quality_points(summary, trade_off)
        if points:
            by_name = {point[0]: point for point in points}
            front = ", ".join(f"{name} ({_cost_text(trade_off, by_name[name][1])}, {_metric(by_name[name][2])})"
                              for name in pareto_front(points, higher))
            lines.append(f"- Pareto-optimal, {metric} vs {trade_off.cost.split(' (')[0]}: {front}")
    return lines


def _best_quality(summary: dict[str, dict], metric: str, higher: bool) -> str:
    """The best metric mean, against full fine-tuning when it ran (or, when full is best, the best other method)."""
    ranked = sorted(_ranked_methods(summary), key=lambda m: summary[m]["metric_mean"], reverse=higher)
    best = ranked[0]
    quality = _quality_text(summary[best]["metric_mean"], summary[best]["metric_std"])
    line = f"- Best quality: {best}, {metric} {quality}"
    others = [m for m in ranked if m != FULL]
    if FULL in ranked and best != FULL:
        full = summary[FULL]["metric_mean"]
        line += f" ({FULL} {_metric(full)}, {_distance(summary[best]['metric_mean'], full, metric)})"
    elif best == FULL and others:
        mean = summary[others[0]]["metric_mean"]
        distance = _distance(mean, summary[FULL]["metric_mean"], metric)
        line += f"; best PEFT method: {others[0]}, {_metric(mean)} ({distance})"
    elif len(ranked) > 1:
        line += f" (next: {ranked[1]}, {_metric(summary[ranked[1]]['metric_mean'])})"
    return line


def _cheapest(summary: dict[str, dict], title: str, key: str, text: Callable[[dict], str]) -> list[str]:
    """The method with the lowest ``key`` and the runner-up (``text`` gives a method's number), or nothing."""
    ranked = sorted((m for m in _finished(summary) if _finite(summary[m][key])), key=lambda m: summary[m][key])
    if not ranked:
        return []
    runner_up = f" (next: {ranked[1]}, {text(summary[ranked[1]])})" if len(ranked) > 1 else ""
    return [f"- {title}: {ranked[0]}, {text(summary[ranked[0]])}{runner_up}"]


def _fastest_inference(summary: dict[str, dict], size: str, what: str) -> list[str]:
    """The lowest forward latency at one batch size, merged where the method can merge, against the base model."""
    ranked = []
    for method in _finished(summary):
        s = summary[method]
        merged = _finite(s[f"latency_{size}_merged_ms"])
        latency = s[f"latency_{size}_merged_ms"] if merged else s[f"latency_{size}_ms"]
        if _finite(latency):
            ranked.append((latency, method + (" merged" if merged else ""), s[f"base_latency_{size}_ms"]))
    if not ranked:
        return []
    ranked.sort()
    (latency, method, base), rest = ranked[0], ranked[1:]
    details = ([f"base {_num(base)} ms"] if _finite(base) else []) + (
        [f"next: {rest[0][1]}, {_num(rest[0][0])} ms"] if rest else [])
    return [f"- Fastest inference, {what} (merged where possible): {method}, {_num(latency)} ms per forward"
            + (f" ({'; '.join(details)})" if details else "")]


def _cost_text(trade_off: TradeOff, cost: float) -> str:
    """A cost with its unit, for a Pareto verdict line."""
    if trade_off.key == "trainable_params":
        return f"{_count(cost)} params"
    return f"{_num(cost)} {'MiB' if trade_off.key == 'peak_memory_mib' else 's'}"


# --- numbers as text ----------------------------------------------------------------------------------------------

POINT_METRICS = ("_acc", "_f1")  # metrics whose differences read in points


def _accuracy_like(*values: float) -> bool:
    """Whether the values all lie in [0, 1] (accuracy, F1): differences are then read in points."""
    return all(0 <= value <= 1 for value in values)


def _metric(value: float) -> str:
    """A metric value: 4 decimals in [0, 1], else 4 significant digits."""
    return f"{value:.4f}" if _accuracy_like(value) else f"{value:.4g}"


def _quality_text(mean: float | None, std: float | None) -> str:
    """The metric mean, ± its std when there were several seeds."""
    if not _finite(mean):
        return "–"
    return _metric(mean) + (f" ± {_metric(std)}" if _finite(std) else "")


def _diverged_text(s: dict) -> str:
    """``diverged at seed 0`` for a method whose metric was not finite in some seed (NaN: training diverged), or ""."""
    seeds = s.get("seeds_diverged") or []
    return f"diverged at seed {', '.join(map(str, seeds))}" if seeds else ""


def _distance(value: float | None, reference: float, metric: str) -> str:
    """``value`` less ``reference``: in points (100 x the difference) for an accuracy or F1, else as is (a loss)."""
    if not _finite(value):
        return "–"
    difference = value - reference
    points = metric.endswith(POINT_METRICS) and _accuracy_like(value, reference)
    return f"{100 * difference:+.2f} pts" if points else f"{difference:+.4g}"


def _num(value: float | None) -> str:
    """A measurement: thousands separated from 100 up, else 4 significant digits; a dash when missing."""
    if not _finite(value):
        return "–"
    return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.4g}"


def _count(value: float | None) -> str:
    """A count (parameters), thousands separated."""
    return f"{round(value):,}" if _finite(value) else "–"


def _size(n_bytes: float | None) -> str:
    """A file size in KB, MB or GB (powers of 1000)."""
    if not _finite(n_bytes):
        return "–"
    for unit, scale in (("GB", 1e9), ("MB", 1e6)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:.1f} {unit}"
    return f"{n_bytes / 1e3:.1f} KB"


def duration(seconds: float | None) -> str | None:
    """A wall time as seconds, minutes or hours; None when unknown."""
    if not _finite(seconds):
        return None
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, rest = divmod(round(seconds), 60)
    return f"{minutes} min {rest:02d} s" if minutes < 60 else f"{minutes // 60} h {minutes % 60:02d} min"
