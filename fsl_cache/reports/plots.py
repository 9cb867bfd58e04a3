"""PNG figures of a report (matplotlib, Agg): accuracy vs shots, confusion heatmaps, most-confused class pairs.

Confusion figures use the largest shot count each (method, dataset) has, summed over seeds and
normalised per true class (row), so they read as "percent of class A's test images predicted B".
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ..errors import UsageError
from ..store.fingerprint import slug
from .rows import RunRow, classnames_for, dataset_label
from .table import AVERAGE, ReportTable, row_labels

PALETTE = (
    *("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22"),
    *("#17becf", "#000000", "#f3c300", "#8db600", "#882d17", "#a1caf1", "#2b3d26", "#f99379", "#604e97"),
    *("#00a087", "#b3446c"),
)
"""20 distinguishable colours: matplotlib's tab10, then ten from Kelly's contrast set (not tab20's pale twins)."""
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")
STYLES = ("-", "--", ":")
DODGE = 0.025
"""Horizontal offset between methods at one shot count, in octaves: coinciding points stay visible."""
MAX_HEATMAPS = 24
"""Confusion heatmaps written at most (one per method row × dataset, largest shots)."""
TOP_PAIRS = 10


def _pyplot():
    try:
        import matplotlib
    except ImportError as err:
        raise UsageError("--plot needs matplotlib: pip install 'fsl-cache[plot]'") from err
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plots(table: ReportTable, rows: Sequence[RunRow], out_dir: str | Path) -> list[Path]:
    """Write every figure of the report under ``out_dir``; returns the files written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    matrices = confusion_by_group(rows)
    styles = method_styles([*table.methods, *(label for label, _ in matrices)])  # one look across figures
    written = [plot_accuracy(table, out / "accuracy_vs_shots.png", styles=styles)]
    for (label, dataset), (shots, matrix, names) in list(matrices.items())[:MAX_HEATMAPS]:
        name = f"confusion_{slug(label)}_{slug(dataset_label(dataset))}_k{shots}.png"
        written.append(
            plot_confusion(
                matrix, names, out / name, title=f"{label} on {dataset_label(dataset)}, {shots}-shot"
            )
        )
    for dataset in sorted({d for _, d in matrices}):
        groups = {label: (m, names) for (label, d), (_, m, names) in matrices.items() if d == dataset}
        path = out / f"confusable_pairs_{slug(dataset_label(dataset))}.png"
        if (
            done := plot_confusable_pairs(groups, path, title=dataset_label(dataset), styles=styles)
        ) is not None:
            written.append(done)
    return written


# ---------------------------------------------------------------------------- accuracy vs shots


def method_styles(labels: Sequence[str]) -> dict[str, dict[str, str]]:
    """Colour, marker and line style per method label (by its rank among the sorted labels); computed once per
    report so a method looks the same in every figure. No two of up to 20 labels share a colour, and no two
    of up to 60 share all three."""
    ordered = sorted(set(labels))
    return {
        label: {
            "color": PALETTE[i % len(PALETTE)],
            "marker": MARKERS[i % len(MARKERS)],
            "ls": STYLES[(i // len(PALETTE)) % len(STYLES)],
        }
        for i, label in enumerate(ordered)
    }


def plot_accuracy(table: ReportTable, path: Path, *, styles: dict | None = None) -> Path:
    """One panel per dataset (the average first): test accuracy vs shots per method, band = ±1 std over seeds."""
    plt = _pyplot()
    blocks = table.blocks()
    cols = min(4, len(blocks))
    rows = -(-len(blocks) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    styles = styles or method_styles(table.methods)
    for ax, block in zip(axes.flat, blocks):
        for i, method in enumerate(table.methods):
            cells = [c for k in table.shots if (c := table.get(method, block, k)) is not None]
            if not cells:
                continue
            x = np.array([c.shots for c in cells])
            y = np.array([c.mean for c in cells])
            s = np.array([c.std or 0.0 for c in cells])
            x = x * 2.0 ** (DODGE * (i - (len(table.methods) - 1) / 2))
            ax.plot(x, y, ms=6, lw=1.6, mfc="none", mew=1.4, label=method, alpha=0.9, **styles[method])
            ax.fill_between(x, y - s, y + s, color=styles[method]["color"], alpha=0.12, lw=0)
        ax.set_xscale("log", base=2)
        ax.set_xticks(table.shots, [str(k) for k in table.shots])
        ax.minorticks_off()
        title = f"Average ({len(table.datasets)} datasets)" if block == AVERAGE else dataset_label(block)
        ax.set_title(title, fontsize=11, fontweight="bold" if block == AVERAGE else "normal")
        ax.set_xlabel("shots per class")
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(blocks) :]:
        ax.axis("off")
    handles, labels = axes.flat[0].get_legend_handles_labels()
    fig.suptitle("Few-shot test accuracy (band: ± std over seeds)", fontsize=12)
    fig.tight_layout()
    # below the panels; bbox_inches="tight" grows the canvas so no label is cut
    fig.legend(
        handles,
        labels,
        loc="upper center",
        ncol=max(1, min(len(labels), 2 * cols)),
        frameon=False,
        bbox_to_anchor=(0.5, 0.0),
        fontsize=9,
    )
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------- confusion


def confusion_by_group(rows: Sequence[RunRow]) -> dict[tuple[str, str], tuple[int, np.ndarray, list[str]]]:
    """``{(method row, dataset): (shots, confusion summed over seeds, class names)}`` at the largest shots."""
    by_group: dict[tuple[str, str], list[RunRow]] = defaultdict(list)
    for r, label in zip(rows, row_labels(rows)):
        if r.confusion:
            by_group[label, r.dataset].append(r)
    out = {}
    for key, group in by_group.items():
        shots = max(r.shots for r in group)
        chosen = [r for r in group if r.shots == shots]
        matrix = np.sum([np.asarray(r.confusion, dtype=np.int64) for r in chosen], axis=0)
        names = classnames_for(chosen) or [f"class {i}" for i in range(len(matrix))]
        out[key] = (shots, matrix, names)
    return out


def row_normalised(matrix: np.ndarray) -> np.ndarray:
    """Percent of each true class's images per predicted class."""
    totals = matrix.sum(axis=1, keepdims=True)
    return 100.0 * matrix / np.maximum(totals, 1)


def plot_confusion(matrix: np.ndarray, names: Sequence[str], path: Path, *, title: str) -> Path:
    plt = _pyplot()
    c = len(matrix)
    rates = row_normalised(matrix)
    side = min(14.0, max(4.5, 0.32 * c + 2.5))
    fig, ax = plt.subplots(figsize=(side + 1.2, side))
    image = ax.imshow(rates, cmap="Blues", vmin=0, vmax=100)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="% of true class")
    if c <= 40:
        ax.set_xticks(range(c), names, rotation=45, ha="right", fontsize=8 if c > 15 else 9)
        ax.set_yticks(range(c), names, fontsize=8 if c > 15 else 9)
    if c <= 12:
        for i in range(c):
            for j in range(c):
                if rates[i, j] >= 0.5:
                    ax.text(
                        j,
                        i,
                        f"{rates[i, j]:.0f}",
                        ha="center",
                        va="center",
                        fontsize=8,
                        color="white" if rates[i, j] > 60 else "black",
                    )
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    accuracy = 100.0 * np.trace(matrix) / max(matrix.sum(), 1)
    ax.set_title(f"{title}\ntest accuracy {accuracy:.1f}% (seeds summed)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def confusable_pairs(
    matrix: np.ndarray, names: Sequence[str], *, top: int = TOP_PAIRS
) -> list[tuple[str, float]]:
    """Class pairs by how often either is taken for the other: ``(A ↔ B, (rate(A→B) + rate(B→A)) / 2)`` in %."""
    rates = row_normalised(matrix)
    sym = np.triu((rates + rates.T) / 2, k=1)
    order = np.argsort(-sym, axis=None)[:top]
    pairs = []
    for flat in order:
        i, j = divmod(int(flat), len(matrix))
        if sym[i, j] <= 0:
            break
        pairs.append((f"{names[i]} ↔ {names[j]}", float(sym[i, j])))
    return pairs


def plot_confusable_pairs(
    groups: dict[str, tuple[np.ndarray, list[str]]], path: Path, *, title: str, styles: dict | None = None
) -> Path | None:
    """Horizontal bars: the most-confused pairs (ranked by the mean over methods), one bar per method."""
    plt = _pyplot()
    scores: dict[str, dict[str, float]] = defaultdict(dict)
    for label, (matrix, names) in groups.items():
        for pair, rate in confusable_pairs(matrix, names, top=len(matrix) ** 2):
            scores[pair][label] = rate
    if not scores:
        return None
    ranked = sorted(scores, key=lambda p: -np.mean([scores[p].get(m, 0.0) for m in groups]))[:TOP_PAIRS]
    labels = list(groups)
    height = 0.8 / len(labels)
    fig, ax = plt.subplots(figsize=(8.5, min(12.0, 0.12 * len(ranked) * (len(labels) + 1) + 1.4)))
    styles = styles or method_styles(labels)
    for i, label in enumerate(labels):
        y = np.arange(len(ranked)) + i * height
        ax.barh(
            y,
            [scores[p].get(label, 0.0) for p in ranked],
            height=height,
            color=styles[label]["color"],
            label=label,
        )
    ax.set_yticks(np.arange(len(ranked)) + 0.4 - height / 2, ranked)
    ax.invert_yaxis()
    ax.set_xlabel("% of test images taken for the other class (mean of A→B and B→A)")
    ax.set_xlim(0, 100)
    ax.set_title(f"Most confused class pairs: {title}", fontsize=11)
    ax.grid(axis="x", alpha=0.3)
    ax.legend(frameon=False, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
