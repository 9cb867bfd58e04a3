"""ZS-LP (METHODS §2.10): the CLAP repo's cosine probe and loop, re-typed from trainers/adapters.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from method_helpers import fit_accuracy, learning_store

from fsl_cache.methods import get_method
from fsl_cache.methods.zs_lp import (
    ClapTrainConfig,
    CosineProbeHead,
    batches_per_epoch,
    cosine_logits,
    train_probe,
    view_pool,
)
from fsl_cache.testing import zero_shot_chance

pytestmark = pytest.mark.usefixtures("one_thread")


def test_logits_normalise_features_and_prototypes_every_forward():
    f = torch.tensor([[3.0, 4.0], [0.0, -2.0]])
    w = torch.tensor([[2.0, 0.0], [1.0, 1.0], [0.0, 5.0]])
    expected = 100 * torch.tensor([[0.6, 1.4 / 2**0.5, 0.8], [0.0, -1 / 2**0.5, -1.0]])
    torch.testing.assert_close(cosine_logits(f, w, 100.0), expected)
    torch.testing.assert_close(CosineProbeHead(w, scale=100.0)({"pooled": f}), expected)


def test_batches_per_epoch_count_support_images_not_views():
    # [CODE] run_epoch: len(train_loader_x) batches; Dassl drop_last when the set holds a whole batch
    assert [batches_per_epoch(n, 256) for n in (10, 255, 256, 511, 512, 16000)] == [1, 1, 1, 1, 2, 62]


def test_view_pool_concatenates_passes():
    views = torch.arange(2 * 3 * 1, dtype=torch.float32).view(2, 3, 1)  # image i, view v -> 3i + v
    pool, labels = view_pool(views, torch.tensor([7, 9]))
    assert pool.flatten().tolist() == [0, 3, 1, 4, 2, 5] and labels.tolist() == [7, 9, 7, 9, 7, 9]


def _official_loop(
    prototypes, features, labels, *, perms, lr, epochs, batch, batches, penalty=None, draws=None
):
    """run_epoch + forward_backward + Dassl SGD/ConstantWarmup(cosine), re-typed with the given shuffles."""
    w = torch.nn.Parameter(prototypes.clone())
    optim = torch.optim.SGD([w], lr=lr, momentum=0.9, weight_decay=0.0)
    for epoch in range(epochs):
        # Dassl: epoch 0 at WARMUP_CONS_LR 1e-5, then CosineAnnealingLR(T_max=MAX_EPOCH) continued from its step 0
        lr_now = 1e-5 if epoch == 0 else 0.5 * lr * (1 + np.cos(np.pi * (epoch - 1) / epochs))
        for g in optim.param_groups:
            g["lr"] = lr_now
        x, y = (features, labels) if draws is None else (features[draws[epoch]], labels[draws[epoch]])
        idx = perms[epoch]
        x, y = x[idx], y[idx]
        for b in range(batches):
            xb, yb = x[b * batch : (b + 1) * batch], y[b * batch : (b + 1) * batch]
            xn = xb / xb.norm(dim=-1, keepdim=True)
            wn = w / w.norm(dim=-1, keepdim=True)
            loss = F.cross_entropy(xn @ wn.t() * 100.0, yb)
            if penalty is not None:
                loss = loss + penalty(w)
            optim.zero_grad()
            loss.backward()
            optim.step()
    return w.detach()


def test_train_probe_is_the_official_loop_on_the_same_shuffles():
    g = torch.Generator().manual_seed(0)
    c, d, m = 3, 6, 50
    features, labels = torch.randn(m, d, generator=g), torch.randint(0, c, (m,), generator=g)
    text = torch.randn(c, d, generator=g)
    cfg = ClapTrainConfig(epochs=4, batch_size=16)
    head = CosineProbeHead(text, scale=100.0)
    train_probe(head, features, labels, config=cfg, batches=2, generator=torch.Generator().manual_seed(5))
    replay = torch.Generator().manual_seed(5)
    perms = [torch.randperm(m, generator=replay) for _ in range(4)]
    expected = _official_loop(text, features, labels, perms=perms, lr=0.1, epochs=4, batch=16, batches=2)
    torch.testing.assert_close(head.prototypes.detach(), expected)
    assert not torch.allclose(expected, text)  # it trained


def test_defaults_are_the_official_recipe():
    info = get_method("zs_lp")
    cfg = info.config()
    assert (cfg.epochs, cfg.lr, cfg.batch_size, cfg.momentum, cfg.weight_decay, cfg.views) == (
        300,
        0.1,
        256,
        0.9,
        0.0,
        20,
    )
    assert info.needs().train_views[0].policy == "coop" and info.needs().train_views[0].views == 21


def test_zs_lp_learns_where_zero_shot_is_chance(tmp_path):
    cache = learning_store(tmp_path / "cache")
    zs = fit_accuracy("zero_shot", cache, tmp_path / "runs")
    acc = fit_accuracy("zs_lp", cache, tmp_path / "runs")
    print(f"zero-shot {zs:.1f} zs_lp {acc:.1f}")
    assert zs == pytest.approx(zero_shot_chance(4)) and acc >= zs + 25
