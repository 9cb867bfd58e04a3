"""CLAP (METHODS §2.10): λ_c's closed form, the penalty and the outer step, re-typed from jusiro/CLAP
trainers/adapters.py, on asymmetric tensors; the recorded λ is the closed form on the cached views."""

from __future__ import annotations

import json

import numpy as np
import pytest
import test_method_zs_lp as zs_lp_tests
import torch
from method_helpers import SYNTH, fit_accuracy, learning_store

from fsl_cache import api
from fsl_cache.methods.clap import class_multipliers, constraint, outer_step
from fsl_cache.methods.zs_lp import ClapTrainConfig, CosineProbeHead, cosine_logits, train_probe
from fsl_cache.store import FeatureStore
from fsl_cache.testing import zero_shot_chance

pytestmark = pytest.mark.usefixtures("one_thread")


def _official_multipliers(labels_ds, logits_ds, apply_constraint):
    """init_lagrangian_multipliers, re-typed."""
    if "balanced" in apply_constraint:
        return torch.ones(logits_ds.shape[-1]).to(torch.float)
    labels_one_hot = torch.nn.functional.one_hot(labels_ds).cpu()
    performance = torch.diag(torch.softmax(logits_ds, -1).t() @ labels_one_hot.to(torch.float32)) / (
        labels_one_hot.sum(0)
    )
    if "corrected" in apply_constraint:
        performance *= logits_ds.shape[-1] / torch.sum(performance).item()
    if "constant" in apply_constraint:
        performance = torch.ones(logits_ds.shape[-1]).to(torch.float) * torch.mean(performance).item()
    return performance


def _tensors(seed=0, m=60, c=4, d=8):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(m) % c
    logits = 30 * torch.randn(m, c, generator=g) + 20 * torch.nn.functional.one_hot(labels, c) * torch.arange(
        c
    )
    return labels, logits, torch.randn(c, d, generator=g), torch.randn(c, d, generator=g)


@pytest.mark.parametrize(
    ("kind", "name"),
    [
        ("zero_shot", "l2"),
        ("balanced", "balanced-l2"),
        ("corrected", "corrected-l2"),
        ("constant", "constant-l2"),
    ],
)
def test_multipliers_match_the_official_closed_form(kind, name):
    labels, logits, _, _ = _tensors()
    got = class_multipliers(logits, labels, kind=kind)
    torch.testing.assert_close(got, _official_multipliers(labels, logits, name))
    if kind == "zero_shot":  # asymmetric: one λ per class, each the mean softmax of its own class
        assert len(set(got.tolist())) == 4
        for c in range(4):
            assert got[c] == pytest.approx(
                torch.softmax(logits[labels == c], -1)[:, c].mean().item(), rel=1e-5
            )


def test_penalty_is_the_official_constraint():
    labels, logits, w, t = _tensors(1)
    lam = class_multipliers(logits, labels)
    expected = torch.mean(lam * (w - t.clone()).pow(2).sum(-1))
    torch.testing.assert_close(constraint(w, t, lam), expected)
    cosine = torch.mean(lam * (1 - torch.nn.functional.cosine_similarity(w, t)))
    torch.testing.assert_close(constraint(w, t, lam, distance="cosine"), cosine)


def test_outer_step_is_the_official_phr_update():
    labels, logits, w, t = _tensors(2)
    lam, rho = class_multipliers(logits, labels), torch.tensor([0.3, 0.0, 2.0, 0.1])
    lam = lam - torch.tensor([0.0, 5.0, 0.0, 0.0])  # one negative x: the PHR gradient is 0 there
    h = (w - t).pow(2).sum(-1)
    x = lam + rho * h
    new_lam, new_rho = outer_step(w, t, lam, rho)
    torch.testing.assert_close(new_lam, torch.where(x >= 0, x, torch.zeros_like(h)))
    torch.testing.assert_close(new_rho, h)
    assert new_lam[1] == 0


def test_trained_probe_is_the_official_loop_with_the_penalty():
    labels, logits, w0, t = _tensors(4, m=40)
    features = torch.randn(40, 8, generator=torch.Generator().manual_seed(6))
    lam = class_multipliers(logits, labels)
    cfg = ClapTrainConfig(epochs=5, batch_size=16)
    head = CosineProbeHead(t, scale=100.0)
    penalty = lambda w: constraint(w, t, lam)  # noqa: E731
    train_probe(
        head,
        features,
        labels,
        config=cfg,
        batches=2,
        generator=torch.Generator().manual_seed(2),
        penalty=penalty,
    )
    replay = torch.Generator().manual_seed(2)
    perms = [torch.randperm(40, generator=replay) for _ in range(5)]
    official = lambda w: torch.mean(lam * (w - t.clone()).pow(2).sum(-1))  # noqa: E731
    expected = zs_lp_tests._official_loop(
        t, features, labels, perms=perms, lr=0.1, epochs=5, batch=16, batches=2, penalty=official
    )
    torch.testing.assert_close(head.prototypes.detach(), expected)
    unpenalised = zs_lp_tests._official_loop(
        t, features, labels, perms=perms, lr=0.1, epochs=5, batch=16, batches=2
    )
    assert not torch.allclose(expected, unpenalised)  # the penalty changed the trained probe


def test_the_penalty_holds_the_probe_nearer_the_text_weights():
    labels, _, _, t = _tensors(3)
    g = torch.Generator().manual_seed(0)
    features = torch.randn(60, 8, generator=g) + 3 * torch.nn.functional.one_hot(labels, 8)
    cfg = ClapTrainConfig(epochs=20, batch_size=32)
    drift = []
    for weight in (0.0, 5.0):
        head = CosineProbeHead(t, scale=100.0)
        lam = torch.full((4,), weight)
        train_probe(
            head,
            features,
            labels,
            config=cfg,
            batches=1,
            generator=torch.Generator().manual_seed(1),
            penalty=lambda w: constraint(w, t, lam),
        )
        drift.append((head.prototypes.detach() - t).norm().item())
    assert drift[1] < drift[0]


def test_recorded_lambda_is_the_closed_form_on_the_cached_views(tmp_path):
    cache = learning_store(tmp_path / "cache")
    (run,) = api.fit(
        "clap",
        shots=2,
        seeds=[1],
        options={"epochs": 1},
        cache_dir=cache,
        runs_dir=tmp_path,
        progress=False,
        **SYNTH,
    )
    record = json.loads((run.run_dir / "record.json").read_text())
    store = FeatureStore.open(next(cache.glob("*/*")))
    chosen = np.isin(store.read("images/train_pool/split_index"), store.read("splits/k2_s1/train"))
    rows = np.flatnonzero(chosen)  # λ_c is a per-class mean: the order of the views does not matter
    assert len(rows) == 8
    views = torch.from_numpy(store.read("images/train_pool/views/coop/pooled")[rows][:, 1:21]).float()
    labels = torch.from_numpy(store.read("images/train_pool/labels")[rows]).long()
    text = torch.from_numpy(store.read("text/coop")).float()
    zs = cosine_logits(views.transpose(0, 1).reshape(-1, views.shape[-1]), text, 100.0)
    expected = _official_multipliers(labels.repeat(20), zs, "l2")
    assert record["selection"]["lambda"] == pytest.approx(expected.tolist(), rel=1e-5)


def test_clap_learns_where_zero_shot_is_chance(tmp_path):
    cache = learning_store(tmp_path / "cache")
    zs = fit_accuracy("zero_shot", cache, tmp_path / "runs")
    acc = fit_accuracy("clap", cache, tmp_path / "runs")
    print(f"zero-shot {zs:.1f} clap {acc:.1f}")
    assert zs == pytest.approx(zero_shot_chance(4)) and acc >= zs + 25
