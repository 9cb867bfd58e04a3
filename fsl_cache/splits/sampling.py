"""CoOp/Dassl few-shot sampling reproduced exactly (METHODS §1.5), as indices into split lists."""

from __future__ import annotations

import numbers
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from ..datasets.base import DatasetSpec
from ..defaults import DEFAULT_SEEDS, DEFAULT_SHOTS
from ..errors import UsageError

VAL_SHOTS_CAP = 4
"""Few-shot val takes ``min(k, 4)`` images per class ([CODE] CoOp datasets/*.py)."""


@dataclass(frozen=True)
class FewShotSubset:
    """One (shots, seed) draw: indices into the dataset's ``train`` and ``val`` split lists."""

    train: tuple[int, ...]
    """Train indices in sampled order: classes in order of first appearance, k draws each."""
    val: tuple[int, ...]
    """Val indices, ``min(k, 4)`` per class, drawn from the same RNG stream after train."""


@dataclass(frozen=True)
class Shortfall:
    """A class with fewer images in a split than the largest request, so it gets them all."""

    split: str
    label: int
    classname: str
    available: int
    wanted: int


@dataclass(frozen=True)
class FewShotPools:
    """Every (shots, seed) subset of a dataset plus the unions a feature store must hold."""

    subsets: dict[tuple[int, int], FewShotSubset]
    """``(k, seed)`` → subset."""
    train_union: tuple[int, ...]
    """Sorted unique train indices used by any subset."""
    val_union: tuple[int, ...]
    """Sorted unique val indices used by any subset."""
    shortfall: tuple[Shortfall, ...]
    """Classes that cannot supply the largest k (train) or min(k, 4) (val)."""


def sample_few_shot(
    train_labels: Sequence[int], val_labels: Sequence[int], *, shots: int, seed: int
) -> FewShotSubset:
    """Draw ``shots`` train and ``min(shots, 4)`` val images per class exactly as CoOp does.

    [CODE] Dassl DatasetBase.generate_fewshot_dataset (repeat=False) called on train then val after
    ``random.seed(seed)``: a private ``random.Random(seed)`` is the same Mersenne Twister stream,
    and ``sample`` picks the same positions whether it is given items or their indices.
    """
    shots = _check_positive(shots, "shots")
    seed = _check_positive(seed, "seed")
    return _draw(_group_by_label(train_labels), _group_by_label(val_labels), shots, seed)


def _group_by_label(labels: Sequence[int]) -> list[list[int]]:
    """Indices per label, classes in order of first appearance, file order kept (Dassl tracker)."""
    by_label: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_label.setdefault(label, []).append(index)
    return list(by_label.values())


def _draw(train: list[list[int]], val: list[list[int]], shots: int, seed: int) -> FewShotSubset:
    rng = random.Random(seed)
    picked_train = _sample_per_class(train, shots, rng)
    return FewShotSubset(picked_train, _sample_per_class(val, min(shots, VAL_SHOTS_CAP), rng))


def _sample_per_class(groups: list[list[int]], k: int, rng: random.Random) -> tuple[int, ...]:
    picked: list[int] = []
    for indices in groups:
        # [CODE] Dassl: sample when len >= k (even ==, which consumes RNG); else take all, no draw
        picked += rng.sample(indices, k) if len(indices) >= k else indices
    return tuple(picked)


def few_shot_pools(
    spec: DatasetSpec,
    *,
    shots: Iterable[int] = DEFAULT_SHOTS,
    seeds: Iterable[int] = DEFAULT_SEEDS,
) -> FewShotPools:
    """All CoOp subsets of ``spec`` for shots x seeds, their unions and the class shortfalls.

    A test-only dataset (empty train and val, e.g. ImageNet-A) gets empty subsets and no shortfall.
    """
    shots = _check_all_positive(shots, "shots")
    seeds = _check_all_positive(seeds, "seeds")
    train_groups = _group_by_label(spec.labels("train"))
    val_groups = _group_by_label(spec.labels("val"))
    subsets = {(k, s): _draw(train_groups, val_groups, k, s) for k in shots for s in seeds}
    val_wanted = min(max(shots), VAL_SHOTS_CAP)
    return FewShotPools(
        subsets=subsets,
        train_union=tuple(sorted({i for sub in subsets.values() for i in sub.train})),
        val_union=tuple(sorted({i for sub in subsets.values() for i in sub.val})),
        shortfall=_shortfall(spec, "train", max(shots)) + _shortfall(spec, "val", val_wanted),
    )


def _shortfall(spec: DatasetSpec, split: str, wanted: int) -> tuple[Shortfall, ...]:
    counts = Counter(spec.labels(split))
    if not counts:  # no such split at all (test-only sets): nothing is short, nothing is asked
        return ()
    return tuple(
        Shortfall(split, label, spec.classnames[label], counts[label], wanted)
        for label in range(spec.num_classes)
        if counts[label] < wanted
    )


def _check_positive(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise UsageError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def _check_all_positive(values: Iterable[int], what: str) -> tuple[int, ...]:
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise UsageError(f"{what} must be a list of positive integers, got {values!r}")
    checked = tuple(dict.fromkeys(_check_positive(v, what) for v in values))
    if not checked:
        raise UsageError(f"{what} needs at least one value")
    return checked
