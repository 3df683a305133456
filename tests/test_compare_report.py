"""The compare report: CSV, JSON aggregates, Pareto fronts, plots and the Markdown verdict, on fabricated rows."""

import csv
import json
import math
import sys

import pytest

from lightning_peft.compare.report import PLOT_EXTRA, pareto_front, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CONTEXT = {"command": "lightning-peft compare --config lora_sentiment", "machine": "test box, 2 CPUs",
           "versions": {"torch": "2.5.1", "lightning-peft": "0.1.0"}, "recipe": "lora_sentiment",
           "started": "2025-01-02T03:04:05+00:00", "wall_s": 754.0}


def ok(method: str, seed: int, acc: float, **measured) -> dict:
    """An ok classification run."""
    return {"method": method, "seed": seed, "status": "ok", "error": None, "metric_name": "test_acc", "metric": acc,
            "higher_is_better": True, "metrics": {"test_acc": acc, "test_loss": 1 - acc}, "memory_kind": "rss",
            "batch_size": 8, "base_latency_b1_ms": 1.8, "base_latency_batch_ms": 9.0, **measured}


def classification_rows() -> list[dict]:
    """lora with two seeds, ia3, full fine-tuning, and prompt tuning that failed."""
    return [
        ok("lora", 0, 0.820, learning_rate=2e-4, trainable_params=294_912, total_params=4_700_000,
           trainable_percent=6.27, adapter_bytes=1_180_000, peak_memory_mib=900.0, estimate_mib=880.0, steps=100,
           train_time_s=20.0, step_time_s=0.20, samples_per_s=40.0, tokens_per_s=5120.0, latency_b1_ms=2.3,
           latency_b1_merged_ms=1.9, latency_batch_ms=11.0, latency_batch_merged_ms=9.2, wall_s=30.0),
        ok("lora", 1, 0.835, learning_rate=2e-4, trainable_params=294_912, total_params=4_700_000,
           trainable_percent=6.27, adapter_bytes=1_180_000, peak_memory_mib=950.0, estimate_mib=880.0, steps=100,
           train_time_s=22.0, step_time_s=0.22, samples_per_s=36.0, tokens_per_s=4608.0, latency_b1_ms=2.5,
           latency_b1_merged_ms=2.0, latency_batch_ms=12.0, latency_batch_merged_ms=9.4, wall_s=32.0),
        ok("ia3", 0, 0.800, learning_rate=3e-3, trainable_params=18_432, total_params=4_420_000,
           trainable_percent=0.417, adapter_bytes=75_000, peak_memory_mib=850.0, estimate_mib=None, steps=100,
           train_time_s=25.0, step_time_s=0.25, samples_per_s=32.0, tokens_per_s=4096.0, latency_b1_ms=2.1,
           latency_b1_merged_ms=1.95, latency_batch_ms=10.0, latency_batch_merged_ms=9.1, wall_s=35.0),
        {"method": "prompt_tuning", "seed": 0, "status": "failed", "learning_rate": 3e-2,
         "error": "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"},
        ok("full", 0, 0.834, learning_rate=5e-5, trainable_params=4_400_000, total_params=4_400_000,
           trainable_percent=100.0, adapter_bytes=17_600_000, peak_memory_mib=2400.0, steps=100, train_time_s=35.0,
           step_time_s=0.35, samples_per_s=22.9, tokens_per_s=2925.0, latency_b1_ms=1.85, latency_b1_merged_ms=None,
           latency_batch_ms=9.05, latency_batch_merged_ms=None, wall_s=45.0),
    ]


@pytest.fixture
def report(tmp_path):
    """The report of the classification rows, written into a fresh folder."""
    return write_report(classification_rows(), tmp_path / "compare", CONTEXT)


def verdict(md: str, start: str) -> str:
    """The verdict line of report.md that starts with ``start``."""
    lines = [line for line in md.splitlines() if line.startswith(f"- {start}")]
    assert len(lines) == 1, f"no single verdict line {start!r} in:\n{md}"
    return lines[0]


def test_pareto_front_higher_is_better_keeps_ties_and_drops_dominated_points():
    points = [("b", 2.0, 0.7), ("a", 1.0, 0.5), ("c", 3.0, 0.6),  # c: dearer and worse than b
              ("d", 2.0, 0.7),  # d: the same as b, so neither dominates the other
              ("e", 1.0, 0.4),  # e: as cheap as a, strictly worse
              ("f", 4.0, 0.7)]  # f: as good as b, strictly dearer
    assert pareto_front(points, higher_is_better=True) == ["a", "b", "d"]


def test_pareto_front_lower_is_better_for_perplexity():
    points = [("a", 1.0, 30.0), ("b", 2.0, 20.0), ("c", 3.0, 25.0), ("d", 0.5, 40.0), ("e", 2.0, 20.0),
              ("g", 0.5, 45.0)]  # g: as cheap as d, higher perplexity
    assert pareto_front(points, higher_is_better=False) == ["d", "a", "b", "e"]
    assert pareto_front(points, higher_is_better=True) == ["g"]  # read the other way: g is cheapest and best
    assert pareto_front([], higher_is_better=True) == []


def test_csv_has_one_line_per_run_with_the_failed_run_error(report):
    with report["csv"].open(encoding="utf-8", newline="") as f:
        lines = list(csv.DictReader(f))
    assert [(row["method"], row["seed"], row["status"]) for row in lines] == [
        ("lora", "0", "ok"), ("lora", "1", "ok"), ("ia3", "0", "ok"), ("prompt_tuning", "0", "failed"),
        ("full", "0", "ok")]
    assert list(lines[0])[:4] == ["method", "seed", "status", "error"]
    assert list(lines[0])[-2:] == ["metric:test_acc", "metric:test_loss"]
    failed = lines[3]
    assert failed["error"] == "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"
    assert failed["metric"] == "" and failed["metric:test_acc"] == "" and failed["learning_rate"] == "0.03"
    assert float(lines[1]["metric:test_loss"]) == pytest.approx(0.165)
    assert lines[2]["estimate_mib"] == "" and lines[4]["latency_b1_merged_ms"] == ""


def test_json_summary_means_and_sample_std_over_ok_seeds(report):
    data = json.loads(report["json"].read_text(encoding="utf-8"))
    assert data["context"] == CONTEXT and len(data["rows"]) == 5
    summary = data["summary"]
    assert list(summary) == ["lora", "ia3", "prompt_tuning", "full"]
    lora = summary["lora"]
    assert lora["seeds_ok"] == 2 and lora["seeds_failed"] == 0 and lora["seeds"] == [0, 1]
    assert lora["metric_mean"] == pytest.approx((0.820 + 0.835) / 2)
    assert lora["metric_std"] == pytest.approx(0.015 / math.sqrt(2))  # sample std: sqrt(sum sq / (n - 1))
    assert lora["peak_memory_mib"] == pytest.approx(925.0) and lora["step_time_s"] == pytest.approx(0.21)
    assert lora["metrics"]["test_loss"] == pytest.approx(0.1725) and lora["memory_kind"] == "rss"
    assert summary["ia3"]["metric_mean"] == pytest.approx(0.8) and summary["ia3"]["metric_std"] is None  # one seed
    assert summary["ia3"]["estimate_mib"] is None
    failed = summary["prompt_tuning"]
    assert failed["seeds_ok"] == 0 and failed["seeds_failed"] == 1 and failed["metric_mean"] is None
    assert failed["errors"] == [{"seed": 0, "error": "RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB"}]


def test_plots_are_real_pngs_and_returned(report):
    pytest.importorskip("matplotlib")
    assert set(report) == {"md", "csv", "json", "quality_vs_params", "quality_vs_memory", "quality_vs_time"}
    for name in ("quality_vs_params", "quality_vs_memory", "quality_vs_time"):
        assert report[name].name == f"{name}.png"
        assert report[name].read_bytes()[:8] == PNG_MAGIC
    assert not list(report["md"].parent.glob(".*.tmp")), "a temporary file was left behind"


def test_markdown_names_the_winners_their_numbers_the_failure_and_the_distance_to_full(report):
    md = report["md"].read_text(encoding="utf-8")
    assert md.startswith("# lightning-peft compare: lora_sentiment\n")
    assert "- **command**: `lightning-peft compare --config lora_sentiment`" in md
    assert "- **total wall time**: 12 min 34 s" in md and "torch 2.5.1, lightning-peft 0.1.0" in md
    assert verdict(md, "Best quality") == ("- Best quality: full, test_acc 0.8340; "
                                           "best PEFT method: lora, 0.8275 (-0.65 pts)")
    assert verdict(md, "Smallest adapter") == "- Smallest adapter: ia3, 75.0 KB (next: lora, 1.2 MB)"
    assert verdict(md, "Least memory") == "- Least memory: ia3, 850 MiB peak rss (next: lora, 925 MiB peak rss)"
    assert verdict(md, "Fastest training") == "- Fastest training: lora, 0.21 s/step (next: ia3, 0.25 s/step)"
    assert verdict(md, "Fastest inference, batch 1") == (
        "- Fastest inference, batch 1 (merged where possible): full, 1.85 ms per forward "
        "(base 1.8 ms; next: ia3 merged, 1.95 ms)")
    assert verdict(md, "Fastest inference, batch 8") == (
        "- Fastest inference, batch 8 (merged where possible): full, 9.05 ms per forward "
        "(base 9 ms; next: ia3 merged, 9.1 ms)")
    assert verdict(md, "Pareto-optimal, test_acc vs trainable parameters") == (
        "- Pareto-optimal, test_acc vs trainable parameters: ia3 (18,432 params, 0.8000), "
        "lora (294,912 params, 0.8275), full (4,400,000 params, 0.8340)")
    assert verdict(md, "Pareto-optimal, test_acc vs training time") == (
        "- Pareto-optimal, test_acc vs training time: lora (21 s, 0.8275), full (35 s, 0.8340)")  # ia3: slower, worse
    assert "- prompt_tuning (seed 0): RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB" in md
    table = {line.split(" | ")[0].strip("| "): line for line in md.splitlines() if line.startswith("| ")}
    assert "| vs full |" in table["method"] and "prompt_tuning" not in table
    assert "| 0.8275 ± 0.0106 | -0.65 pts |" in table["lora"] and "| 0.8000 | -3.40 pts |" in table["ia3"]
    assert "| 0.8340 | reference |" in table["full"]
    assert "| 925 (est. 880) |" in table["lora"] and "| 2.4 / 1.95 / 1.8 |" in table["lora"]
    assert "| 1.2 MB |" in table["lora"] and "| 294,912 | 6.27% |" in table["lora"]
    assert "latency b8 ms (unmerged / merged / base)" in table["method"]
    for plot in ("quality_vs_params.png", "quality_vs_memory.png", "quality_vs_time.png"):
        assert f"]({plot})" in md


def test_best_peft_method_is_named_against_full(tmp_path):
    rows = classification_rows()
    rows[-1]["metric"] = 0.81
    md = write_report(rows, tmp_path, CONTEXT)["md"].read_text(encoding="utf-8")
    assert verdict(md, "Best quality") == "- Best quality: lora, test_acc 0.8275 ± 0.0106 (full 0.8100, +1.75 pts)"


def test_perplexity_lower_is_better_plain_differences_and_forgetting(tmp_path):
    def lm(method: str, ppl: float, params: int, forgetting: float) -> dict:
        return {"method": method, "seed": 0, "status": "ok", "metric_name": "test_ppl", "metric": ppl,
                "higher_is_better": False, "trainable_params": params, "peak_memory_mib": 1000.0 + params / 1000,
                "forgetting_base_ppl": 30.0, "forgetting_tuned_ppl": forgetting}

    rows = [lm("lora", 12.5, 50_000, 33.0), lm("full", 11.0, 1_000_000, 45.0), lm("ia3", 14.0, 60_000, 30.5)]
    written = write_report(rows, tmp_path, {})
    md = written["md"].read_text(encoding="utf-8")
    assert verdict(md, "Best quality") == "- Best quality: full, test_ppl 11; best PEFT method: lora, 12.5 (+1.5)"
    assert verdict(md, "Pareto-optimal, test_ppl vs trainable parameters") == (
        "- Pareto-optimal, test_ppl vs trainable parameters: lora (50,000 params, 12.5), full (1,000,000 params, 11)")
    assert "| 30 → 33 (+10.0%) |" in md and "other-domain ppl (base → tuned)" in md
    assert "Note: quality_vs_time.png not drawn: no method has both train_time_s and a measured quality." in md
    assert "quality_vs_time" not in written and not (tmp_path / "quality_vs_time.png").exists()


def test_a_method_without_the_cost_is_left_out_with_a_note(tmp_path):
    pytest.importorskip("matplotlib")
    rows = classification_rows()
    del rows[2]["peak_memory_mib"]
    md = write_report(rows, tmp_path, CONTEXT)["md"].read_text(encoding="utf-8")
    assert "Note: ia3 has no peak_memory_mib: left out of quality_vs_memory.png." in md
    assert verdict(md, "Least memory") == "- Least memory: lora, 925 MiB peak rss (next: full, 2,400 MiB peak rss)"


def test_without_matplotlib_no_plots_and_the_install_line(tmp_path, monkeypatch):
    (tmp_path / "quality_vs_params.png").write_bytes(b"an earlier report's plot")
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)  # importing it now raises ImportError
    written = write_report(classification_rows(), tmp_path, CONTEXT)
    assert set(written) == {"md", "csv", "json"}
    assert not list(tmp_path.glob("*.png"))
    md = written["md"].read_text(encoding="utf-8")
    assert PLOT_EXTRA in md and "![" not in md
    assert verdict(md, "Pareto-optimal, test_acc vs peak memory").startswith("- Pareto-optimal")  # still computed


def test_all_failed_still_writes_a_report(tmp_path):
    rows = [{"method": "lora", "seed": 0, "status": "failed", "error": "ValueError: no data"}]
    written = write_report(rows, tmp_path, CONTEXT)
    md = written["md"].read_text(encoding="utf-8")
    assert "No method finished." in md and "- lora (seed 0): ValueError: no data" in md
    assert set(written) == {"md", "csv", "json"}


def test_without_a_test_split_the_costs_are_still_compared(tmp_path):
    rows = [{**row, "metric": None, "metric_name": None, "metrics": {}} for row in classification_rows()]
    md = write_report(rows, tmp_path, CONTEXT)["md"].read_text(encoding="utf-8")
    assert verdict(md, "Quality") == "- Quality: not measured, since the recipe's data has no test split (give it a " \
                                     "test_file)"
    assert verdict(md, "Smallest adapter") == "- Smallest adapter: ia3, 75.0 KB (next: lora, 1.2 MB)"
    assert verdict(md, "Least memory").startswith("- Least memory: ia3")
    table = [line for line in md.splitlines() if line.startswith("| lora ") or line.startswith("| ia3 ")]
    assert len(table) == 2 and "| – |" in table[0]  # each finished method, its quality a dash


def test_names_of_close_points_do_not_cover_each_other_or_a_point():
    from lightning_peft.compare.report import TRADE_OFFS, _draw, _overlap, quality_points, summarize

    rows = [ok(name, 0, acc, trainable_params=params) for name, acc, params in
            [("lora", 0.827, 111_362), ("dora", 0.8215, 118_274), ("qlora", 0.824, 338_690),
             ("adapter", 0.8195, 595_970), ("full", 0.834, 22_713_986), ("head_only", 0.5835, 770)]]  # the sentiment
    # report's: head-only stretches the quality axis, so the others crowd into one corner
    summary = summarize(rows)
    points, _ = quality_points(summary, TRADE_OFFS[0])
    figure = _draw(TRADE_OFFS[0], points, summary, "test_acc", True, None)
    renderer = figure.canvas.get_renderer()
    axes = figure.axes[0]
    boxes = [text.get_window_extent(renderer) for text in axes.texts]
    assert len(boxes) == 6
    assert all(_overlap(a, b) == 0 for i, a in enumerate(boxes) for b in boxes[i + 1:])
    for box in boxes:
        for x, y in (axes.transData.transform((cost, quality)) for _, cost, quality in points):
            assert not box.contains(x, y)  # no name over a point's centre


def test_a_diverged_run_is_null_in_strict_json(tmp_path):
    rows = classification_rows()
    rows[0] = {**rows[0], "metric": float("nan"), "step_time_s": float("inf")}
    written = write_report(rows, tmp_path, CONTEXT)

    def refuse(constant):
        raise ValueError(f"not JSON: {constant}")

    report = json.loads(written["json"].read_text(), parse_constant=refuse)  # was: NaN, which strict parsers refuse
    assert report["rows"][0]["metric"] is None and report["rows"][0]["step_time_s"] is None
    md = written["md"].read_text()  # was: "–", as if never measured, and lora left out of the verdict unsaid
    assert "| lora | 2 | diverged at seed 0 |" in md
    assert "- Not ranked, a seed's test metrics not finite (training diverged): lora (at seed 0)" in md
    rows[0] = {**rows[0], "metric": 0.75, "metrics": {"test_acc": 0.75, "test_loss": float("nan")}}  # NaN logits'
    md = write_report(rows, tmp_path, CONTEXT)["md"].read_text()  # argmax: a finite accuracy (was: ranked)
    assert "| lora | 2 | diverged at seed 0 |" in md and "best PEFT method: lora" not in md


def test_a_loss_in_0_1_differs_from_full_as_a_number_not_in_points(tmp_path):
    def by_loss(method: str, loss: float) -> dict:
        return {"method": method, "seed": 0, "status": "ok", "metric_name": "test_loss", "metric": loss,
                "higher_is_better": False, "trainable_params": 1000 if method != "full" else 100_000}

    md = write_report([by_loss("lora", 0.36), by_loss("full", 0.31)], tmp_path, {})["md"].read_text(encoding="utf-8")
    assert verdict(md, "Best quality") == "- Best quality: full, test_loss 0.3100; best PEFT method: lora, 0.3600 " \
                                          "(+0.05)"  # was: "(+5.00 pts)"


def test_a_sweep_that_scored_no_rate_says_the_methods_own_rate_was_kept(tmp_path):
    rows = classification_rows()
    for row in rows:
        if row["method"] == "ia3":
            row["lr_sweep"] = [{"learning_rate": r, "metric": None, "error": "ValueError: no validation rows"}
                               for r in (3e-3, 1e-2)]
    md = write_report(rows, tmp_path, CONTEXT)["md"].read_text(encoding="utf-8")
    assert "| ia3 | none scored: the method's own 0.003 kept | 0.003 (failed), 0.01 (failed) |" in md


def test_the_report_says_where_each_method_s_settings_came_from(tmp_path):
    rows = classification_rows()
    for row in rows:
        row["settings_from"] = {"lora": "lora_sentiment", "ia3": "ia3_sentiment"}.get(row["method"], "defaults")
        row["overrides"] = {"r": 16} if row["method"] == "lora" else {}
    md = write_report(rows, tmp_path, CONTEXT)["md"].read_text(encoding="utf-8")
    assert "- lora: settings from lora_sentiment, learning rate 0.0002; --set r=16" in md  # was: nowhere
    assert "- ia3: settings from ia3_sentiment, learning rate 0.003" in md
