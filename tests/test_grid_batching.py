"""Grid batching: configurations trained together in one pass equal separate runs and read each batch once."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from fsl_cache import api
from fsl_cache.methods import get_method
from fsl_cache.methods.base import fit_together
from fsl_cache.runs.record import load_head_tensors
from fsl_cache.runs.request import task_info
from fsl_cache.splits.protocol import build_splits
from fsl_cache.store.store import FeatureStore
from fsl_cache.sweeps.local import group_trials
from fsl_cache.sweeps.spec import Trial
from fsl_cache.testing import make_synthetic_store
from fsl_cache.training import (
    FitTask,
    Member,
    MemoryViews,
    SharedBatches,
    TrainData,
    TrainSettings,
    train,
    train_many,
)

SYNTH = dict(model="synthetic", pretrained="none")


class CountingViews(MemoryViews):
    """In-memory views that count the batches actually read."""

    reads = 0

    def batch(self, positions, views=None):
        self.reads += 1
        return super().batch(positions, views)


def linear_member(features, labels, *, lr: float, weight_decay: float, seed: int, source) -> Member:
    generator = torch.Generator().manual_seed(seed)
    head = LinearHead(features.shape[-1], int(labels.max()) + 1, generator)
    settings = TrainSettings(epochs=4, batch_size=8, lr=lr, weight_decay=weight_decay, policy="tip")
    return Member(head, TrainData(source, labels), settings, generator)


class LinearHead(torch.nn.Module):
    inputs = ("pooled",)

    def __init__(self, dim: int, classes: int, generator: torch.Generator) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(dim, classes)
        with torch.no_grad():
            self.fc.weight.copy_(0.1 * torch.randn(classes, dim, generator=generator))
            self.fc.bias.zero_()

    def outputs(self, x):
        return {"main": self.fc(x["pooled"])}

    def forward(self, x):
        return self.outputs(x)["main"]


@pytest.fixture(scope="module")
def views():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(30) % 3
    features = (
        torch.randn(30, 5, 16, generator=g) + 2 * torch.nn.functional.one_hot(labels, 16)[:, None].float()
    )
    return features, labels


def test_lockstep_training_equals_separate_runs_and_reads_each_batch_once(views):
    features, labels = views
    grid = [(1e-2, 0.0), (1e-3, 0.01), (3e-2, 0.1)]
    separate = []
    for lr, wd in grid:
        member = linear_member(
            features, labels, lr=lr, weight_decay=wd, seed=4, source=MemoryViews({"pooled": features})
        )
        separate.append(train(member.head, member.data, settings=member.settings, generator=member.generator))
    counting = CountingViews({"pooled": features})
    shared = SharedBatches(counting)
    members = [
        linear_member(features, labels, lr=lr, weight_decay=wd, seed=4, source=shared) for lr, wd in grid
    ]
    together = train_many(members)
    for a, b in zip(separate, together):
        assert torch.equal(a.head.fc.weight, b.head.fc.weight) and torch.equal(a.head.fc.bias, b.head.fc.bias)
        assert a.history == b.history
    steps = 4 * -(-30 // 8)
    assert counting.reads == steps  # not len(grid) * steps


def test_members_whose_draws_differ_still_get_their_own_batches(views):
    features, labels = views
    counting = CountingViews({"pooled": features})
    shared = SharedBatches(counting)
    members = [
        linear_member(features, labels, lr=1e-2, weight_decay=0.0, seed=s, source=shared) for s in (1, 2)
    ]
    together = train_many(members)
    alone = linear_member(
        features, labels, lr=1e-2, weight_decay=0.0, seed=2, source=MemoryViews({"pooled": features})
    )
    expected = train(alone.head, alone.data, settings=alone.settings, generator=alone.generator)
    assert torch.equal(together[1].head.fc.weight, expected.head.fc.weight)
    assert counting.reads == 2 * 4 * -(-30 // 8)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    root = tmp_path_factory.mktemp("batching") / "cache"
    return root, make_synthetic_store(root, num_classes=4, views={"tip": 21})


def synthetic_task(
    store_dir: Path, *, memory_budget: int, shots: int = 4, seed: int = 1
) -> tuple[FitTask, FeatureStore]:
    store = FeatureStore.open(store_dir)
    info = task_info(store, shots=shots, seed=seed, protocol="coop")
    splits = build_splits(store, get_method("tip_adapter_f").cls, shots=shots, seed=seed, protocol="coop")
    return FitTask(store, info, train=splits.train, val=splits.val, memory_budget=memory_budget), store


@pytest.mark.parametrize(
    "memory_budget", [1 << 30, 0], ids=["in-memory, one after another", "streamed, lockstep"]
)
def test_fit_together_equals_separate_fits_of_a_method(cache, memory_budget):
    info = get_method("tip_adapter_f")
    configs = [{"epochs": 3, "lr": lr} for lr in (1e-3, 5e-3, 2e-2)]
    task, store = synthetic_task(cache[1], memory_budget=memory_budget)
    try:
        methods = [info.cls(info.create(c).resolve(task.info)) for c in configs]
        separate = [m.fit(task, generator=torch.Generator().manual_seed(1)) for m in methods]
        with task.sharing_views():
            assert task.views(task.train, policy="tip").streams == (memory_budget == 0)
        together = fit_together(methods, task, seed=1)
    finally:
        store.close()
    for a, b in zip(separate, together):
        assert a.selection == b.selection and a.history == b.history
        sa, sb = a.head.saved_state(), b.head.saved_state()
        assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    first, last = (r.head.saved_state() for r in (together[0], together[-1]))
    assert any(not torch.equal(first[k], last[k]) for k in first)  # the configs really differ


def test_grid_trains_option_groups_together_with_the_records_of_separate_fits(cache, tmp_path):
    outcomes = api.grid(
        ["tip_adapter_f"],
        datasets=["synthetic"],
        shots=[2],
        seeds=[1],
        options={"lr": [1e-3, 1e-2], "epochs": [2]},
        cache_dir=cache[0],
        runs_dir=tmp_path / "grid",
        **SYNTH,
    ).outcomes
    assert [o.status for o in outcomes] == ["done", "done"]
    for outcome in outcomes:
        record = json.loads((outcome.run_dir / "record.json").read_text())
        assert record["timings"]["fitted_together"] == 2
        (alone,) = api.fit(
            "tip_adapter_f",
            dataset="synthetic",
            shots=2,
            seeds=[1],
            options=record["options"],
            cache_dir=cache[0],
            runs_dir=tmp_path / "alone",
            progress=False,
            **SYNTH,
        )
        assert alone.test_acc == outcome.test_acc and alone.val_acc == outcome.val_acc
        a, b = load_head_tensors(alone.run_dir), load_head_tensors(outcome.run_dir)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_trials_group_by_task_up_to_the_group_size():
    trials = [Trial("m", "d", shots, 1, (("lr", lr),)) for shots in (1, 2) for lr in range(5)]
    groups = group_trials(trials, size=3)
    assert [len(g) for g in groups] == [3, 2, 3, 2]
    assert all(len({(t.shots, t.seed) for t in g}) == 1 for g in groups)
    assert sorted(t.label for g in groups for t in g) == sorted(t.label for t in trials)
    assert all(len(g) == 1 for g in group_trials(trials, size=1))


class PrefetchingViews(CountingViews):
    """Records the prefetch requests the trainer makes."""

    def __init__(self, arrays) -> None:
        super().__init__(arrays)
        self.requested: list[bytes] = []
        self.served: list[bytes] = []

    def prefetch(self, positions, views=None):
        self.requested.append(np.asarray(positions).tobytes())

    def batch(self, positions, views=None):
        self.served.append(np.asarray(positions).tobytes())
        return super().batch(positions, views)


def test_the_trainer_prefetches_each_next_batch_of_the_epoch(views):
    features, labels = views
    source = PrefetchingViews({"pooled": features})
    member = linear_member(features, labels, lr=1e-2, weight_decay=0.0, seed=3, source=source)
    train_many([member])
    per_epoch = -(-30 // 8)
    epochs = [source.served[i : i + per_epoch] for i in range(0, len(source.served), per_epoch)]
    assert source.requested == [
        b for epoch in epochs for b in epoch[1:]
    ]  # every batch but each epoch's first
