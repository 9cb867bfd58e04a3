"""The papers' table from run rows: mean ± std over seeds per method × dataset × shots, and the dataset average.

A "method" row is a variant (method plus its ``-o`` options), qualified by backbone, protocol and
validation regime when a report mixes several: runs of different regimes never share a cell. The std
is numpy's default (population, ``ddof=0``). The average over datasets is the mean of the per-
dataset means; its std is the spread over seeds of the per-seed dataset averages (only when every
dataset has that seed). An average missing some datasets is marked partial rather than silently
compared with complete ones.

Base-to-novel runs (CoCoOp's protocol) also carry base and novel accuracy: a cell's base and novel are
their means (over seeds, then over datasets for the average) and its headline is the harmonic mean
of those two means, so the average's HM is the HM of the averaged base and novel, not a mean of HMs.
Domain-shift runs also fill a block per (source, shots) with the source and each target as
columns (:class:`ShiftBlock`).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np

from ..splits.protocol import harmonic_mean
from .rows import RunRow

AVERAGE = "Average"


@dataclass(frozen=True)
class Cell:
    """One entry of the table: accuracy over seeds for (method row, dataset, shots)."""

    method: str
    dataset: str
    shots: int
    mean: float
    std: float | None
    seeds: tuple[int, ...]
    values: tuple[float, ...]
    """Per-seed test accuracy (per-seed dataset averages for the average cell)."""
    partial: bool = False
    """Average cells only: some datasets of the table lack this (method, shots)."""
    datasets: int = 1
    """Datasets averaged (1 for a dataset cell)."""
    base: float | None = None
    """Base-to-novel: mean base-class accuracy (``mean`` is then the HM of ``base`` and ``novel``)."""
    novel: float | None = None
    """Base-to-novel: mean novel-class accuracy."""

    source: str = ""
    """Domain-shift cells only: the dataset the head was trained on (``dataset`` is it or a target)."""

    def to_json(self) -> dict:
        b2n = {} if self.base is None else {"base": round(self.base, 4), "novel": round(self.novel, 4)}
        source = {"source": self.source} if self.source else {}
        return (
            b2n
            | source
            | {
                "method": self.method,
                "dataset": self.dataset,
                "shots": self.shots,
                "mean": round(self.mean, 4),
                "std": None if self.std is None else round(self.std, 4),
                "n": len(self.values),
                "seeds": list(self.seeds),
                "values": [round(v, 4) for v in self.values],
                "partial": self.partial,
                "datasets": self.datasets,
            }
        )


@dataclass
class ShiftBlock:
    """Domain shift from ``source`` at ``shots``: a row per method, the source then each target as columns."""

    source: str
    shots: int
    columns: list[str]
    methods: list[str]
    cells: dict[tuple[str, str], Cell]
    """By (method row, column dataset)."""

    def best(self, column: str) -> float | None:
        values = [c.mean for m in self.methods if (c := self.cells.get((m, column))) is not None]
        return max(values) if values else None


@dataclass
class ReportTable:
    """Cells by (method row, dataset, shots), with the row, dataset and shots orders to show them in."""

    methods: list[str]
    datasets: list[str]
    shots: list[int]
    cells: dict[tuple[str, str, int], Cell] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    shifts: list[ShiftBlock] = field(default_factory=list)
    validation: dict[str, str] = field(default_factory=dict)
    """The validation regime of each method row (``none``, ``kshot`` or ``full``)."""

    def get(self, method: str, dataset: str, shots: int) -> Cell | None:
        return self.cells.get((method, dataset, shots))

    @property
    def base2novel(self) -> bool:
        """Every cell carries base and novel accuracy (the report shows base, novel and HM columns)."""
        return bool(self.cells) and all(c.base is not None for c in self.cells.values())

    def blocks(self) -> list[str]:
        """Datasets to show, the average first when there are several datasets."""
        return ([AVERAGE] if len(self.datasets) > 1 else []) + self.datasets

    def best(self, dataset: str, shots: int) -> float | None:
        values = [c.mean for m in self.methods if (c := self.get(m, dataset, shots)) is not None]
        return max(values) if values else None


def row_labels(rows: Sequence[RunRow]) -> list[str]:
    """The method row of each run: its variant, qualified by backbone, protocol and validation regime when
    ``rows`` mix several, so that no row (and no cell or average) pools runs of different ones."""
    several_bb = len({r.backbone for r in rows}) > 1
    several_proto = len({r.protocol for r in rows}) > 1
    several_val = len({r.validation for r in rows}) > 1
    labels = []
    for row in rows:
        label = row.variant
        if several_bb:
            label += f" · {row.backbone}"
        if several_proto:
            label += f" ({row.protocol})"
        if several_val:
            label += f" [val {row.validation}]"
        labels.append(label)
    return labels


def build_table(rows: Sequence[RunRow]) -> ReportTable:
    """Aggregate ``rows`` (one per seed) into the report table."""
    groups: dict[tuple[str, str, int], dict[int, RunRow]] = defaultdict(dict)
    order: dict[str, None] = {}
    labels = row_labels(rows)
    regimes: dict[str, str] = {}
    for r, label in zip(rows, labels):
        order.setdefault(label)
        regimes[label] = r.validation
        groups[label, r.dataset, r.shots][r.seed] = r
    datasets = sorted({r.dataset for r in rows})
    table = ReportTable(list(order), datasets, sorted({r.shots for r in rows}), validation=regimes)
    for (label, dataset, shots), by_seed in groups.items():
        seeds = tuple(sorted(by_seed))
        values = tuple(by_seed[s].test_acc for s in seeds)
        cell = Cell(label, dataset, shots, float(np.mean(values)), float(np.std(values)), seeds, values)
        table.cells[label, dataset, shots] = _with_base_novel(cell, [by_seed[s] for s in seeds])
    table.shifts = _shift_blocks(rows, labels)
    if len(datasets) > 1:
        _add_averages(table)
    if any(r.random_init for r in rows):
        table.notes.append(
            "some runs use a RANDOM-weight backbone: their numbers measure the pipeline, not CLIP"
        )
    return table


def _cell(label: str, dataset: str, shots: int, by_seed: dict[int, float], *, source: str = "") -> Cell:
    seeds = tuple(sorted(by_seed))
    values = tuple(by_seed[s] for s in seeds)
    return Cell(
        label, dataset, shots, float(np.mean(values)), float(np.std(values)), seeds, values, source=source
    )


def _shift_blocks(rows: Sequence[RunRow], labels: Sequence[str]) -> list[ShiftBlock]:
    """One block per (source, shots) of the domain-shift rows: the source column, then the targets'."""
    by_block: dict[tuple[str, int], dict[tuple[str, str], dict[int, float]]] = defaultdict(
        lambda: defaultdict(dict)
    )
    columns: dict[tuple[str, int], dict[str, None]] = defaultdict(dict)
    methods: dict[tuple[str, int], dict[str, None]] = defaultdict(dict)
    for r, label in zip(rows, labels):
        if not r.targets:
            continue
        block = (r.dataset, r.shots)
        methods[block].setdefault(label)
        for column, acc in ((r.dataset, r.test_acc), *r.targets):
            columns[block].setdefault(column)
            by_block[block][label, column][r.seed] = acc
    return [
        ShiftBlock(
            source,
            shots,
            list(columns[source, shots]),
            list(methods[source, shots]),
            {
                (label, column): _cell(label, column, shots, by_seed, source=source)
                for (label, column), by_seed in by_block[source, shots].items()
            },
        )
        for source, shots in sorted(by_block)
    ]


def _add_averages(table: ReportTable) -> None:
    for method in table.methods:
        for shots in table.shots:
            cells = [c for d in table.datasets if (c := table.get(method, d, shots)) is not None]
            if not cells:
                continue
            common = sorted(set.intersection(*(set(c.seeds) for c in cells)))
            per_seed = tuple(float(np.mean([c.values[c.seeds.index(s)] for c in cells])) for s in common)
            partial = len(cells) < len(table.datasets)
            average = Cell(
                method,
                AVERAGE,
                shots,
                float(np.mean([c.mean for c in cells])),
                float(np.std(per_seed)) if per_seed else None,
                tuple(common),
                per_seed,
                partial,
                len(cells),
            )
            table.cells[method, AVERAGE, shots] = _with_base_novel(average, cells)
    if any(c.partial for c in table.cells.values()):
        table.notes.append(
            f"* average over fewer than the {len(table.datasets)} datasets (some runs are missing)"
        )


def _with_base_novel(cell: Cell, parts: Sequence) -> Cell:
    """``cell`` with base/novel means of ``parts`` (rows or cells) and HM of the two as its mean, when all have them."""
    base = [getattr(p, "base_acc", getattr(p, "base", None)) for p in parts]
    novel = [getattr(p, "novel_acc", getattr(p, "novel", None)) for p in parts]
    if not parts or any(v is None for v in base + novel):
        return cell
    b, n = float(np.mean(base)), float(np.mean(novel))
    return replace(cell, mean=harmonic_mean(b, n), base=b, novel=n)
