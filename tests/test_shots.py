"""CoOp/Dassl few-shot sampling: exact against the published picks, plus the pools built on it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from dataset_helpers import shared_dir, split_file

from fsl_cache.datasets.base import DatasetSpec
from fsl_cache.datasets.coop import read_split_json
from fsl_cache.errors import UsageError
from fsl_cache.splits import FewShotSubset, few_shot_pools, sample_few_shot

PUBLISHED = {
    # dataset: (split-file stem, classes, prefix of the published impaths before the split path)
    "eurosat": ("EuroSAT", 10, "./data/eurosat/2750/"),
    "dtd": ("DescribableTextures", 47, "./data/dtd/images/"),
}


def split_paths(dataset: str) -> dict[str, list[tuple[str, int]]]:
    stem, num_classes, _ = PUBLISHED[dataset]
    return read_split_json(split_file(stem), num_classes=num_classes)[0]


def published_paths(dataset: str, shots: int, seed: int) -> dict[str, list[str]]:
    path = shared_dir() / "data" / "fewshot_indices" / dataset / f"shot_{shots}-seed_{seed}.json"
    if not path.is_file():
        pytest.fail(f"Published few-shot picks missing: {path}")
    prefix = PUBLISHED[dataset][2]
    picks = json.loads(path.read_text())
    return {s: [d["impath"].removeprefix(prefix) for d in picks[s]["data"]] for s in ("train", "val")}


@pytest.mark.parametrize("dataset", sorted(PUBLISHED))
@pytest.mark.parametrize("shots", [1, 2, 4, 8, 16])
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_matches_published_picks_exactly(dataset, shots, seed):
    splits = split_paths(dataset)
    subset = sample_few_shot(
        [label for _, label in splits["train"]],
        [label for _, label in splits["val"]],
        shots=shots,
        seed=seed,
    )
    mine = {s: [splits[s][i][0] for i in getattr(subset, s)] for s in ("train", "val")}
    assert mine == published_paths(dataset, shots, seed)


def test_counts_per_class_and_val_cap():
    labels = [i % 3 for i in range(60)]  # 20 per class
    subset = sample_few_shot(labels, labels, shots=8, seed=1)
    assert [labels[i] for i in subset.train] == [0] * 8 + [1] * 8 + [2] * 8
    assert [labels[i] for i in subset.val] == [0] * 4 + [1] * 4 + [2] * 4
    assert len(set(subset.train)) == 24


def test_small_class_takes_all_without_consuming_randomness():
    # [CODE] Dassl: a class with fewer than k items is taken whole, with no draw, so the classes
    # after it see the same stream as if it were absent
    with_small = [0, 0, 1, 1, 1, 1, 1]
    without = [1, 1, 1, 1, 1]
    a = sample_few_shot(with_small, [], shots=3, seed=5)
    b = sample_few_shot(without, [], shots=3, seed=5)
    assert a.train[:2] == (0, 1)
    assert [i - 2 for i in a.train[2:]] == list(b.train)


def test_classes_in_order_of_first_appearance():
    labels = [2, 2, 0, 0, 1, 1]
    subset = sample_few_shot(labels, [], shots=1, seed=1)
    assert [labels[i] for i in subset.train] == [2, 0, 1]


def test_seeds_differ_and_repeat():
    labels = [i % 5 for i in range(500)]
    first = sample_few_shot(labels, labels, shots=4, seed=1)
    assert first == sample_few_shot(labels, labels, shots=4, seed=1)
    assert first != sample_few_shot(labels, labels, shots=4, seed=2)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2", None])
def test_rejects_bad_shots_and_seed(bad):
    with pytest.raises(UsageError, match="shots must be a positive integer"):
        sample_few_shot([0], [0], shots=bad, seed=1)
    with pytest.raises(UsageError, match="seed must be a positive integer"):
        sample_few_shot([0], [0], shots=1, seed=bad)


def toy_spec(train_labels, val_labels, classnames=("a", "b", "c")) -> DatasetSpec:
    def items(labels):
        return tuple((f"{i}.jpg", label) for i, label in enumerate(labels))

    return DatasetSpec(
        name="toy",
        image_root=Path("/nowhere"),
        classnames=tuple(classnames),
        templates={"tip": ("a photo of a {}.",)},
        splits={"train": items(train_labels), "val": items(val_labels), "test": ()},
        source_hash="0" * 64,
    )


def test_pools_hold_every_subset_and_their_unions():
    spec = toy_spec([i % 3 for i in range(90)], [i % 3 for i in range(30)])
    pools = few_shot_pools(spec)
    assert set(pools.subsets) == {(k, s) for k in (1, 2, 4, 8, 16) for s in (1, 2, 3)}
    assert pools.subsets[(4, 2)] == sample_few_shot(spec.labels("train"), spec.labels("val"), shots=4, seed=2)
    assert pools.train_union == tuple(sorted({i for sub in pools.subsets.values() for i in sub.train}))
    assert pools.val_union == tuple(sorted({i for sub in pools.subsets.values() for i in sub.val}))
    assert len(pools.train_union) <= 3 * 31 * 3 and pools.shortfall == ()


def test_pools_report_short_classes():
    spec = toy_spec([0] * 20 + [1] * 3 + [2] * 16, [0, 0, 0, 0, 1, 2, 2, 2, 2])
    pools = few_shot_pools(spec, shots=(2, 16), seeds=(1,))
    assert [(s.split, s.label, s.classname, s.available, s.wanted) for s in pools.shortfall] == [
        ("train", 1, "b", 3, 16),
        ("val", 1, "b", 1, 4),
    ]
    assert pools.subsets[(16, 1)].train[16:19] == (20, 21, 22)  # the short class comes whole


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"shots": (1, 0)}, "shots must be a positive integer, got 0"),
        ({"seeds": ()}, "seeds needs at least one value"),
        ({"seeds": 3}, "seeds must be a list of positive integers"),
        ({"shots": "16"}, "shots must be a list of positive integers"),
    ],
)
def test_pools_validate_settings(kwargs, message):
    with pytest.raises(UsageError, match=message):
        few_shot_pools(toy_spec([0, 1, 2], [0, 1, 2]), **kwargs)


def test_pools_of_test_only_sets_are_empty():
    pools = few_shot_pools(toy_spec([], []), shots=(1, 4), seeds=(1,))
    assert pools.subsets == {(1, 1): FewShotSubset((), ()), (4, 1): FewShotSubset((), ())}
    assert pools.train_union == pools.val_union == pools.shortfall == ()


def test_subset_is_frozen():
    subset = FewShotSubset(train=(1,), val=())
    with pytest.raises(AttributeError):
        subset.train = (2,)
