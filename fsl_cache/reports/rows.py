"""Run records as report rows: found under a runs folder, filtered, one per (variant, dataset, shots, seed)."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..runs.locate import canonical_dataset
from ..runs.record import RECORD, method_of, validation_of


@dataclass(frozen=True)
class RunRow:
    """The numbers of one run a report needs."""

    method: str
    options: tuple[tuple[str, str], ...]
    """The ``-o`` options the run was given (what distinguishes variants of one method)."""
    dataset: str
    shots: int
    seed: int
    protocol: str
    backbone: str
    """``arch/pretrained`` of the store."""
    val_acc: float | None
    """``None`` under ``--validation none``."""
    test_acc: float
    test_mean_per_class: float
    created: str
    run_dir: Path
    confusion: list[list[int]] | None = field(default=None, compare=False, repr=False)
    """Test confusion matrix of the headline head, ``[true][predicted]``."""
    store_path: str = ""
    random_init: bool = False
    base_acc: float | None = None
    """``--protocol base2novel``: test top-1 on the base classes (``test_acc`` is the harmonic mean)."""
    novel_acc: float | None = None
    """``--protocol base2novel``: test top-1 on the novel classes."""
    targets: tuple[tuple[str, float], ...] = ()
    """Domain shift: (target dataset, test accuracy) of the same head, in the run's target order."""
    validation: str = "kshot"
    """The validation regime: ``none``, ``kshot`` or ``full``."""

    @property
    def variant(self) -> str:
        """``method`` plus its options, e.g. ``tip_adapter_f[epochs=5]``."""
        opts = ",".join(f"{k}={v}" for k, v in self.options)
        return f"{self.method}[{opts}]" if opts else self.method

    @property
    def dataset_label(self) -> str:
        return dataset_label(self.dataset)


def dataset_label(name: str) -> str:
    """Short column name: ``imagefolder:/a/b/fsl-demo`` → ``fsl-demo``; built-in names as they are."""
    _, sep, rest = name.partition(":")
    if not sep:
        return name
    return Path(rest.rstrip("/")).name or rest


def row_from_record(record: dict, path: Path) -> RunRow:
    m = record["metrics"]
    test = m["test"][m["headline"]]
    options = tuple(sorted((str(k), _text(v)) for k, v in (record.get("options") or {}).items()))
    store = record.get("store", {})
    return RunRow(
        method_of(record),
        options,
        record["dataset"],
        int(record["shots"]),
        int(record["seed"]),
        record["protocol"],
        f"{store.get('arch')}/{store.get('pretrained')}",
        None if m["val_acc"] is None else float(m["val_acc"]),
        float(m["test_acc"]),
        float(test["mean_per_class"]),
        record.get("created", ""),
        path,
        test.get("confusion"),
        str(store.get("path", "")),
        bool(store.get("random_init")),
        None if m.get("base_acc") is None else float(m["base_acc"]),
        None if m.get("novel_acc") is None else float(m["novel_acc"]),
        # the run's target order (records sort their keys)
        tuple((name, float(m["targets"][name]["test_acc"])) for name in record.get("targets", [])),
        validation_of(record),
    )


def _text(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return ",".join(map(str, value))
    return str(value)


@dataclass(frozen=True)
class Filters:
    """Which runs a report shows (empty: all)."""

    methods: tuple[str, ...] = ()
    datasets: tuple[str, ...] = ()
    shots: tuple[int, ...] = ()
    protocols: tuple[str, ...] = ()
    backbones: tuple[str, ...] = ()
    """``arch`` or ``arch/pretrained``."""
    validations: tuple[str, ...] = ()
    """Validation regimes (``none``, ``kshot``, ``full``)."""

    def keep(self, row: RunRow) -> bool:
        datasets = {canonical_dataset(d) for d in self.datasets} | set(self.datasets)
        return (
            (not self.methods or row.method in self.methods or row.variant in self.methods)
            and (not self.datasets or row.dataset in datasets or row.dataset_label in datasets)
            and (not self.shots or row.shots in self.shots)
            and (not self.protocols or row.protocol in self.protocols)
            and (not self.validations or row.validation in self.validations)
            and (
                not self.backbones
                or row.backbone in self.backbones
                or row.backbone.split("/")[0] in self.backbones
            )
        )


def find_records(runs_dir: Path) -> Iterable[Path]:
    """Every finished record under ``runs_dir`` (``runs/<dataset>/<store>/<method>/<run>/record.json``)."""
    return sorted(Path(runs_dir).glob(f"*/*/*/*/{RECORD}"))


def load_rows(runs_dir: str | Path, filters: Filters = Filters()) -> list[RunRow]:
    """Rows of the finished runs under ``runs_dir`` that pass ``filters``; the newest record wins a duplicate."""
    newest: dict[tuple, RunRow] = {}
    for path in find_records(Path(runs_dir)):
        try:
            row = row_from_record(json.loads(path.read_text()), path.parent)
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError):
            continue  # a foreign or older-schema file is not a run of this report
        if not filters.keep(row):
            continue
        targets = tuple(name for name, _ in row.targets)
        key = (
            row.variant,
            row.backbone,
            row.protocol,
            row.validation,
            targets,
            row.dataset,
            row.shots,
            row.seed,
        )
        if key not in newest or row.created > newest[key].created:
            newest[key] = row
    return sorted(newest.values(), key=lambda r: (r.dataset, r.variant, r.validation, r.shots, r.seed))


def classnames_for(rows: Sequence[RunRow]) -> list[str] | None:
    """Class names from the store manifest of the first row whose store is still there."""
    for row in rows:
        manifest = Path(row.store_path) / "manifest.json"
        try:
            return list(json.loads(manifest.read_text())["dataset"]["classnames"])
        except (OSError, json.JSONDecodeError, KeyError):
            continue
    return None
