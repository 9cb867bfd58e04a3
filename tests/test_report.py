"""``report``: the table's numbers against a hand computation from the records, formats, filters, plots."""

from __future__ import annotations

import csv
import io
import json
import statistics
from pathlib import Path

import pytest
from click.testing import CliRunner

from fsl_cache import api
from fsl_cache.cli import main
from fsl_cache.errors import UsageError
from fsl_cache.reports import AVERAGE, format_report
from fsl_cache.reports.plots import confusable_pairs, method_styles
from fsl_cache.testing import make_synthetic_store

SYNTH = dict(model="synthetic", pretrained="none")
DATASETS = ("synthetic", "other")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("report")
    cache, runs = root / "cache", root / "runs"
    make_synthetic_store(cache, views={"tip": 21})
    make_synthetic_store(cache, name="other", num_classes=5, seed=7, zero_shot=0.5, views={"tip": 21})
    api.grid(
        ["zero_shot", "tip_adapter"],
        datasets=list(DATASETS),
        shots=(1, 2),
        seeds=(1, 2, 3),
        cache_dir=cache,
        runs_dir=runs,
        **SYNTH,
    )
    return runs


def by_hand(runs: Path) -> dict[tuple[str, str, int], dict[int, float]]:
    """``{(method, dataset, shots): {seed: test_acc}}`` read straight from the record files."""
    out: dict = {}
    for path in runs.glob("*/*/*/*/record.json"):
        r = json.loads(path.read_text())
        out.setdefault((r["method"], r["dataset"], r["shots"]), {})[r["seed"]] = r["metrics"]["test_acc"]
    return out


def test_the_table_equals_a_hand_computation_from_the_records(runs):
    table, rows, _ = api.report(runs_dir=runs)
    hand = by_hand(runs)
    assert len(rows) == 24 and table.methods == ["tip_adapter", "zero_shot"] and table.shots == [1, 2]
    for (method, dataset, shots), by_seed in hand.items():
        cell = table.get(method, dataset, shots)
        values = [by_seed[s] for s in sorted(by_seed)]
        assert cell.mean == pytest.approx(statistics.fmean(values))
        assert cell.std == pytest.approx(statistics.pstdev(values))
        assert cell.seeds == (1, 2, 3)
    for method in ("tip_adapter", "zero_shot"):
        for shots in (1, 2):
            avg = table.get(method, AVERAGE, shots)
            means = [statistics.fmean(hand[method, d, shots].values()) for d in DATASETS]
            per_seed = [statistics.fmean(hand[method, d, shots][s] for d in DATASETS) for s in (1, 2, 3)]
            assert avg.mean == pytest.approx(statistics.fmean(means))
            assert avg.std == pytest.approx(statistics.pstdev(per_seed)) and not avg.partial


def test_every_format_carries_the_same_numbers(runs):
    table, _, _ = api.report(runs_dir=runs)
    cell = table.get("tip_adapter", "other", 2)
    rows = list(csv.DictReader(io.StringIO(format_report(table, "csv"))))
    row = next(r for r in rows if (r["method"], r["dataset"], r["shots"]) == ("tip_adapter", "other", "2"))
    assert float(row["mean"]) == pytest.approx(cell.mean, abs=1e-4) and row["seeds"] == "1 2 3"
    assert row["validation"] == "kshot"
    lines = [json.loads(line) for line in format_report(table, "json").splitlines()]
    assert len(lines) == 2 * 3 * 2  # methods × (2 datasets + average) × shots
    assert {line["dataset"] for line in lines} == {AVERAGE, "synthetic", "other"}
    text = f"{cell.mean:.2f} ± {cell.std:.2f}"
    markdown = format_report(table, "markdown")
    assert "### Average over 2 datasets" in markdown and text in markdown
    assert markdown.index("Average") < markdown.index("### other")  # the average first, as in the papers
    assert text in format_report(table, "table")
    latex = format_report(table, "latex")
    assert "\\begin{tabular}{llcc}" in latex and f"{cell.mean:.2f} $\\pm$ {cell.std:.2f}" in latex
    assert "tip\\_adapter" in latex and "\\textbf{" in latex


def test_filters_and_a_partial_average(runs, tmp_path):
    table, rows, _ = api.report(runs_dir=runs, methods=["zero_shot"], shots=[2], datasets=["other"])
    assert {(r.method, r.dataset, r.shots) for r in rows} == {("zero_shot", "other", 2)}
    assert table.blocks() == ["other"]
    with pytest.raises(UsageError, match="match the filters"):
        api.report(runs_dir=runs, protocols=["paper"])
    partial = [
        r for r in api.report(runs_dir=runs)[1] if not (r.dataset == "other" and r.method == "zero_shot")
    ]
    from fsl_cache.reports import build_table

    t = build_table(partial)
    assert t.get("zero_shot", AVERAGE, 1).partial and t.get("zero_shot", AVERAGE, 1).datasets == 1
    assert "*" in format_report(t, "markdown")


def test_plots_are_written_and_not_empty(runs, tmp_path):
    import matplotlib.image

    _, _, plots = api.report(runs_dir=runs, plot_dir=tmp_path / "plots")
    names = {p.name for p in plots}
    assert "accuracy_vs_shots.png" in names
    assert {"confusable_pairs_synthetic.png", "confusable_pairs_other.png"} <= names
    assert sum(n.startswith("confusion_") for n in names) == 4  # 2 methods × 2 datasets, at the largest shots
    for path in plots:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 5000
        image = matplotlib.image.imread(path)
        assert image.shape[0] > 200 and image.shape[1] > 200 and image[..., :3].std() > 0.01  # not blank


def test_confusable_pairs_rank_symmetric_confusion():
    import numpy as np

    m = np.array([[8, 2, 0], [4, 6, 0], [0, 1, 9]])
    pairs = confusable_pairs(m, ["a", "b", "c"])
    assert pairs[0] == ("a ↔ b", pytest.approx((20 + 40) / 2)) and pairs[1][0] == "b ↔ c"


def test_cli_report_formats(runs):
    result = CliRunner().invoke(
        main, ["report", "--runs-dir", str(runs), "--format", "json", "--method", "tip_adapter"]
    )
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert lines and {line["method"] for line in lines} == {"tip_adapter"}
    empty = CliRunner().invoke(main, ["report", "--runs-dir", str(runs / "nowhere")])
    assert empty.exit_code == 2 and "No finished runs" in empty.output


def test_base2novel_shows_base_novel_and_hm_and_the_average_hm_is_of_the_averaged_accuracies():
    from fsl_cache.reports.rows import RunRow
    from fsl_cache.reports.table import build_table

    def row(dataset, seed, base, novel):
        hm = 2 * base * novel / (base + novel)
        return RunRow("capt", (), dataset, 16, seed, "base2novel", "ViT-B-16/openai", 0.0, hm, hm, "", Path("."),
                      base_acc=base, novel_acc=novel)  # fmt: skip

    rows = [
        row("a", 1, 90.0, 50.0),
        row("a", 2, 80.0, 60.0),
        row("b", 1, 70.0, 30.0),
        row("b", 2, 60.0, 40.0),
    ]
    table = build_table(rows)
    assert table.base2novel
    a, avg = table.get("capt", "a", 16), table.get("capt", AVERAGE, 16)
    assert (a.base, a.novel) == (85.0, 55.0) and a.mean == pytest.approx(2 * 85 * 55 / 140)
    assert (avg.base, avg.novel) == (75.0, 45.0) and avg.mean == pytest.approx(2 * 75 * 45 / 120)  # 56.25
    b = table.get("capt", "b", 16)
    assert avg.mean != pytest.approx((a.mean + b.mean) / 2)  # not the mean of the per-dataset HMs
    text = format_report(table, "markdown")
    assert (
        "| method | validation | 16-shot base | 16-shot novel | 16-shot HM |" in text
        and "| capt | kshot | 75.00 | 45.00 | 56.25" in text
    )
    first = next(csv.DictReader(io.StringIO(format_report(table, "csv"))))
    assert (first["base"], first["novel"], first["mean"]) == ("75.0000", "45.0000", "56.2500")
    assert json.loads(format_report(table, "json").splitlines()[0])["base"] == 75.0
    assert "16-shot HM" in format_report(table, "latex") and "16-shot novel" in format_report(table, "table")


def test_every_method_gets_its_own_look_and_keeps_it_across_figures():
    methods = ["capt", "clip_adapter", "coop", "ldc", "linear_probe", "safe", "safe_a", "tip_adapter"]
    methods += ["tip_adapter_f", "zero_shot", "my_a", "my_b"]
    styles = method_styles(methods)
    assert len({s["color"] for s in styles.values()}) == len(methods)  # capt and zero_shot too (was tab10)
    assert styles["capt"] != styles["zero_shot"]
    assert method_styles(list(reversed(methods))) == styles  # fixed by the label, not the order met
    many = method_styles([f"m{i:02d}" for i in range(60)])
    assert len({tuple(s.values()) for s in many.values()}) == 60


def test_runs_of_different_validation_regimes_never_share_a_cell(tmp_path):
    cache, runs = tmp_path / "cache", tmp_path / "runs"
    make_synthetic_store(cache, views={"tip": 21})
    for validation in ("kshot", "none"):
        api.grid(
            ["tip_adapter"],
            datasets=["synthetic"],
            shots=(1,),
            seeds=(1, 2),
            validation=validation,
            cache_dir=cache,
            runs_dir=runs,
            **SYNTH,
        )
    table, rows, _ = api.report(runs_dir=runs)
    assert table.methods == ["tip_adapter [val kshot]", "tip_adapter [val none]"]
    assert table.validation == {"tip_adapter [val kshot]": "kshot", "tip_adapter [val none]": "none"}
    for label in table.methods:
        regime = table.validation[label]
        cell = table.get(label, "synthetic", 1)
        assert cell.values == tuple(r.test_acc for r in rows if r.validation == regime)
    markdown = format_report(table, "markdown")
    assert "| method | validation | 1-shot |" in markdown and "| tip_adapter [val none] | none |" in markdown
    assert {json.loads(line)["validation"] for line in format_report(table, "json").splitlines()} == {
        "kshot",
        "none",
    }
    only = CliRunner().invoke(
        main, ["report", "--runs-dir", str(runs), "--validation", "none", "--format", "csv"]
    )
    assert only.exit_code == 0, only.output
    (row,) = csv.DictReader(io.StringIO(only.stdout))
    assert (row["method"], row["validation"], row["seeds"]) == ("tip_adapter", "none", "1 2")
