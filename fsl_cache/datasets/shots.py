"""CoOp/Dassl few-shot sampling, reproduced exactly (METHODS §1.5), as indices into the split lists."""
from __future__ import annotations

import numbers
import random
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from fsl_cache.datasets.base import DatasetSpec
from fsl_cache.errors import UsageError

DEFAULT_SHOTS = (1, 2, 4, 8, 16)
DEFAULT_SEEDS = (1, 2, 3)
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
    rng = random.Random(_check_positive(seed, "seed"))
    train = _sample_per_class(train_labels, shots, rng)
    val = _sample_per_class(val_labels, min(shots, VAL_SHOTS_CAP), rng)
    return FewShotSubset(train=train, val=val)


def _sample_per_class(labels: Sequence[int], k: int, rng: random.Random) -> tuple[int, ...]:
    by_label: dict[int, list[int]] = {}  # insertion order = order of first appearance
    for index, label in enumerate(labels):
        by_label.setdefault(label, []).append(index)
    picked: list[int] = []
    for indices in by_label.values():
        # [CODE] Dassl: sample when len >= k (even ==, which consumes RNG); else take all, no draw
        picked += rng.sample(indices, k) if len(indices) >= k else indices
    return tuple(picked)


def few_shot_pools(
    spec: DatasetSpec,
    *,
    shots: Iterable[int] = DEFAULT_SHOTS,
    seeds: Iterable[int] = DEFAULT_SEEDS,
) -> FewShotPools:
    """All CoOp subsets of ``spec`` for ``shots`` × ``seeds``, their unions and the class shortfalls."""
    shots = _check_all_positive(shots, "shots")
    seeds = _check_all_positive(seeds, "seeds")
    train_labels, val_labels = spec.labels("train"), spec.labels("val")
    if not train_labels:
        raise UsageError(f"Dataset '{spec.name}' has no train split (it is test-only); "
                         "few-shot pools need one")
    subsets = {
        (k, s): sample_few_shot(train_labels, val_labels, shots=k, seed=s)
        for k in shots
        for s in seeds
    }
    val_wanted = min(max(shots), VAL_SHOTS_CAP)
    return FewShotPools(
        subsets=subsets,
        train_union=tuple(sorted({i for sub in subsets.values() for i in sub.train})),
        val_union=tuple(sorted({i for sub in subsets.values() for i in sub.val})),
        shortfall=_shortfall(spec, "train", max(shots)) + _shortfall(spec, "val", val_wanted),
    )


def _shortfall(spec: DatasetSpec, split: str, wanted: int) -> tuple[Shortfall, ...]:
    counts = Counter(spec.labels(split))
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
