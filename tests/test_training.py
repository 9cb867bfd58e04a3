"""The shared trainer: view sampler, batching, schedules, the loop itself against a hand-written
Tip-Adapter-F loop, in-memory vs streamed batches, determinism."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fsl_cache.console import training_progress
from fsl_cache.methods.tip_adapter import TipHead, build_keys, build_values
from fsl_cache.splits import SplitRef
from fsl_cache.store import FeatureStore
from fsl_cache.testing import make_synthetic_store
from fsl_cache.training import MemoryViews, Selector, TrainData, TrainSettings, ViewSampler, open_views, train
from fsl_cache.training.head import Head
from fsl_cache.training.sampler import batches_per_epoch, epoch_batches
from fsl_cache.training.schedule import build_optimizer, build_scheduler, lr_factor


def test_view_sampler_cycles_through_every_augmented_view_once_before_repeating():
    sampler = ViewSampler(7, 5, generator=torch.Generator().manual_seed(0))
    positions = np.arange(7)
    seen = np.stack([sampler.views(e, positions) for e in range(4)])  # V - 1 = 4 epochs
    assert seen.min() == 1 and seen.max() == 4  # view 0 (center) is never a training view
    assert all(sorted(seen[:, i]) == [1, 2, 3, 4] for i in range(7))
    np.testing.assert_array_equal(sampler.views(4, positions), seen[0])  # then it repeats
    # 1 + ((e + o_i) mod (V - 1)), with the seeded offsets
    np.testing.assert_array_equal(seen[2], 1 + (2 + sampler.offsets) % 4)
    assert ViewSampler(3, 1, generator=torch.Generator()).views(9, np.arange(3)).tolist() == [0, 0, 0]


def test_epoch_batches_cover_each_image_once_with_drop_and_merge_rules():
    g = torch.Generator().manual_seed(0)
    batches = list(epoch_batches(10, batch_size=4, generator=g))
    assert [len(b) for b in batches] == [4, 4, 2] and sorted(np.concatenate(batches)) == list(range(10))
    assert [len(b) for b in epoch_batches(10, batch_size=4, generator=g, drop_last=True)] == [4, 4]
    assert [len(b) for b in epoch_batches(3, batch_size=4, generator=g, drop_last=True)] == [
        3
    ]  # Dassl keeps it
    assert [len(b) for b in epoch_batches(9, batch_size=4, generator=g, merge_singleton=True)] == [4, 5]
    assert batches_per_epoch(9, batch_size=4, drop_last=False, merge_singleton=True) == 2
    assert batches_per_epoch(10, batch_size=4, drop_last=True, merge_singleton=False) == 2


def test_cosine_per_iteration_matches_torch_cosine_annealing():
    settings = TrainSettings(epochs=3, batch_size=2, lr=0.1, schedule="cosine_iter")
    ours = build_scheduler(
        torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1),
        settings,
        iters_per_epoch=4,
        total_iters=12,
    )
    ref_opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.1)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(ref_opt, T_max=12)
    for _ in range(12):
        assert ours.get_last_lr()[0] == pytest.approx(ref.get_last_lr()[0], abs=1e-12)
        ours.optimizer.step(), ours.step(), ref_opt.step(), ref.step()


def test_dassl_constant_warmup_then_cosine_over_max_epoch():
    s = TrainSettings(
        epochs=10, batch_size=32, lr=2e-3, optimizer="sgd", schedule="cosine_epoch", warmup=1, warmup_lr=1e-5
    )
    lrs = [2e-3 * lr_factor(e, total=10, settings=s) for e in range(4)]
    assert lrs[0] == pytest.approx(1e-5)  # [CODE] Dassl ConstantWarmupScheduler
    assert lrs[1] == pytest.approx(2e-3)  # the successor cosine starts at its step 0
    assert lrs[2] == pytest.approx(2e-3 * 0.5 * (1 + np.cos(np.pi / 10)))
    linear = TrainSettings(epochs=10, batch_size=8, lr=1e-3, warmup=4, warmup_mode="linear", warmup_lr=1e-5)
    assert 1e-3 * lr_factor(2, total=100, settings=linear) == pytest.approx(1e-5 + (1e-3 - 1e-5) / 2)


def _tip_task(seed: int = 0, n: int = 12, views: int = 6, dim: int = 8, classes: int = 3):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    base = torch.randn(classes, dim, generator=g)[labels]
    feats = base[:, None] + 0.5 * torch.randn(n, views, dim, generator=g)
    text = F.normalize(torch.randn(classes, dim, generator=g), dim=-1)
    val = base + 0.5 * torch.randn(n, dim, generator=g)
    return feats, labels, text, val


def _official_tip_f(feats, labels, text, val, *, epochs, lr, seed, alpha=1.0, beta=1.0):
    """Tip-Adapter main.py::run_tip_adapter_F transcribed for one full batch per epoch, val instead of test.

    The cached view per image per epoch follows the same sampler (as the original's fresh augmentation would).
    """
    g = torch.Generator().manual_seed(seed)
    sampler = ViewSampler(len(labels), feats.shape[1], generator=g)
    keys = build_keys(feats[:, 1:])
    values = build_values(labels, text.shape[0])
    adapter = torch.nn.Linear(keys.shape[1], keys.shape[0], bias=False)
    adapter.weight = torch.nn.Parameter(keys.clone())
    optimizer = torch.optim.AdamW(adapter.parameters(), lr=lr, eps=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * 1)
    best_acc, best_state = 0.0, None
    val_hat = F.normalize(val, dim=-1)
    for epoch in range(epochs):
        order = torch.randperm(len(labels), generator=g).numpy()
        x = feats[torch.as_tensor(order), torch.as_tensor(sampler.views(epoch, order))]
        image_features = F.normalize(x, dim=-1)
        affinity = adapter(image_features)
        cache_logits = ((-1) * (beta - beta * affinity)).exp() @ values
        tip = 100.0 * image_features @ text.T + cache_logits * alpha
        loss = F.cross_entropy(tip, labels[torch.as_tensor(order)])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        with torch.no_grad():
            logits = (
                100.0 * val_hat @ text.T + ((-1) * (beta - beta * adapter(val_hat))).exp() @ values * alpha
            )
            acc = 100.0 * float((logits.argmax(1) == labels).sum()) / len(labels)
        if acc > best_acc or best_state is None:
            best_acc, best_state = acc, adapter.weight.detach().clone()
    return best_state, best_acc


def test_trainer_reproduces_the_official_tip_adapter_f_loop():
    feats, labels, text, val = _tip_task()
    keys = build_keys(feats[:, 1:])
    head = TipHead(keys, build_values(labels, 3), text, alpha=1.0, beta=1.0, scale=100.0, train_keys=True)
    settings = TrainSettings(epochs=6, batch_size=64, lr=1e-2, eps=1e-4, policy="tip")
    selector = Selector(MemoryViews({"pooled": val[:, None]}), labels)
    result = train(
        head,
        TrainData(MemoryViews({"pooled": feats}), labels),
        settings=settings,
        generator=torch.Generator().manual_seed(3),
        selector=selector,
    )
    ref_keys, ref_acc = _official_tip_f(feats, labels, text, val, epochs=6, lr=1e-2, seed=3)
    torch.testing.assert_close(result.head.adapter.weight.detach(), ref_keys, rtol=1e-5, atol=1e-6)
    assert result.best_score == pytest.approx(ref_acc)
    assert not torch.allclose(ref_keys, keys)  # it did train


def test_selection_keeps_the_first_best_state_and_last_keeps_the_end():
    feats, labels, text, val = _tip_task(seed=1)
    common = dict(epochs=5, batch_size=64, lr=5e-2, eps=1e-4, policy="tip")

    def run(select: str):
        head = TipHead(
            build_keys(feats[:, 1:]),
            build_values(labels, 3),
            text,
            alpha=1.0,
            beta=1.0,
            scale=100.0,
            train_keys=True,
        )
        selector = Selector(MemoryViews({"pooled": val[:, None]}), labels)
        return train(
            head,
            TrainData(MemoryViews({"pooled": feats}), labels),
            settings=TrainSettings(select=select, **common),
            generator=torch.Generator().manual_seed(0),
            selector=selector,
        )

    best, last = run("best"), run("last")
    scores = [h["select_acc"] for h in best.history]
    assert best.best_epoch == scores.index(max(scores)) and best.best_score == max(scores)
    assert last.best_score is None and last.best_epoch == 4


def test_eval_every_n_iterations_and_iteration_budget():
    feats, labels, text, val = _tip_task(n=30)
    head = TipHead(
        build_keys(feats[:, 1:]),
        build_values(labels, 3),
        text,
        alpha=1.0,
        beta=1.0,
        scale=100.0,
        train_keys=True,
    )
    settings = TrainSettings(epochs=0, iters=7, batch_size=8, lr=1e-2, eval_every=3, policy="tip")
    result = train(
        head,
        TrainData(MemoryViews({"pooled": feats}), labels),
        settings=settings,
        generator=torch.Generator().manual_seed(0),
        selector=Selector(MemoryViews({"pooled": val[:, None]}), labels),
    )
    assert [h["iteration"] for h in result.history if "select_acc" in h and "loss" not in h] == [3, 6]
    assert max(h["iteration"] for h in result.history) == 7


def test_amp_is_ignored_on_cpu_and_training_is_deterministic():
    feats, labels, text, val = _tip_task(seed=2)

    def run(amp: bool):
        head = TipHead(
            build_keys(feats[:, 1:]),
            build_values(labels, 3),
            text,
            alpha=1.0,
            beta=1.0,
            scale=100.0,
            train_keys=True,
        )
        settings = TrainSettings(epochs=3, batch_size=5, lr=1e-2, amp=amp, policy="tip")
        train(
            head,
            TrainData(MemoryViews({"pooled": feats}), labels),
            settings=settings,
            generator=torch.Generator().manual_seed(9),
        )
        return head.adapter.weight.detach()

    assert torch.equal(run(False), run(True)) and torch.equal(run(False), run(False))


def test_streamed_batches_equal_in_memory_batches(tmp_path):
    root = make_synthetic_store(tmp_path, views={"tip": 7})
    store = FeatureStore.open(root)
    rows = np.array([5, 0, 3, 3, 9])
    split = SplitRef("train", "train_pool", rows, torch.zeros(5, dtype=torch.long), rows)
    memory = open_views(store, split, policy="tip", taps=("pooled", "zs_logits/tip"))
    stream = open_views(store, split, policy="tip", taps=("pooled", "zs_logits/tip"), memory_budget=0)
    assert isinstance(memory, MemoryViews) and not isinstance(stream, MemoryViews)
    positions, views = np.array([4, 1, 0, 2]), np.array([6, 0, 2, 6])
    a, b = memory.batch(positions, views), stream.batch(positions, views)
    for tap in a:
        torch.testing.assert_close(a[tap], b[tap])
    direct = store.read("images/train_pool/views/tip/pooled")[rows[positions], views]
    np.testing.assert_array_equal(a["pooled"].numpy(), direct.astype(np.float32))
    store.close()


def test_optimizers_follow_settings():
    p = [torch.zeros(2, requires_grad=True)]
    sgd = build_optimizer(
        p, TrainSettings(epochs=1, batch_size=1, lr=0.1, optimizer="sgd", momentum=0.8, weight_decay=5e-4)
    )
    assert (
        isinstance(sgd, torch.optim.SGD)
        and sgd.defaults["momentum"] == 0.8
        and sgd.defaults["weight_decay"] == 5e-4
    )
    adamw = build_optimizer(p, TrainSettings(epochs=1, batch_size=1, lr=0.1, eps=1e-4))
    assert (
        isinstance(adamw, torch.optim.AdamW)
        and adamw.defaults["eps"] == 1e-4
        and adamw.defaults["weight_decay"] == 0.01
    )


def test_training_announces_its_steps_and_an_estimate_when_asked(capsys):
    class Linear(Head):
        def __init__(self) -> None:
            super().__init__()
            self.inputs, self.layer = ("pooled",), torch.nn.Linear(4, 2)

        def forward(self, x):
            return self.layer(x["pooled"])

    data = TrainData(MemoryViews({"pooled": torch.randn(8, 1, 4)}), torch.arange(2).repeat(4))
    settings = TrainSettings(epochs=3, batch_size=2, lr=0.1)
    with training_progress(True):
        train(Linear(), data, settings=settings, generator=torch.Generator().manual_seed(0))
    err = capsys.readouterr().err
    assert "training: 12 steps (3 epochs of 4)" in err and "ms per step, timed" in err
    assert "12/12 step (100%)" in err
