"""LP++ (METHODS §2.10): initialisation, data-driven step sizes and the loop, re-typed from
FewShot-CLIP-Strong-Baseline methods/linear_probe_p2.py and methods/utils.py, on asymmetric tensors."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from method_helpers import SYNTH, fit_accuracy, learning_store
from scipy.linalg import eigh

from fsl_cache import api
from fsl_cache.methods.lp_pp import (
    LpPlusPlusConfig,
    LpPlusPlusHead,
    class_sums,
    init_alpha,
    lr_alpha,
    lr_weights,
    train_lp_pp,
)
from fsl_cache.testing import zero_shot_chance

pytestmark = pytest.mark.usefixtures("one_thread")


def _tensors(seed=0, c=3, shots=4, d=6):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(c).repeat_interleave(shots)
    features = F.normalize(torch.randn(c * shots, d, generator=g) + 2 * F.one_hot(labels, d), dim=-1)
    text = F.normalize(torch.randn(c, d, generator=g) + F.one_hot(torch.arange(c), d), dim=-1)
    return features, labels, text, shots


def _official_init(features, labels, shots, clip_weights):
    """calculate_init_alpha + compute_centroids_alpha, re-typed (clip_weights is [D, C] in the code)."""
    z_s, y_s = (features @ clip_weights).unsqueeze(0), labels.unsqueeze(0)
    one_hot = torch.zeros(list(y_s.size()) + [y_s.unique().size(0)])
    one_hot.scatter_(-1, y_s.unsqueeze(-1), 1)
    alpha_tilde = (one_hot * z_s / one_hot.sum(-2, keepdim=True)).sum(1)[0]
    alpha_tilde = alpha_tilde.double() * shots
    return torch.mean(250 / shots * alpha_tilde).item()


def test_initialisation_and_step_sizes_match_the_official_code():
    features, labels, text, shots = _tensors()
    assert init_alpha(features, labels, text) == pytest.approx(
        _official_init(features, labels, shots, text.T)
    )
    w, _ = eigh((features.T @ features).numpy())
    assert lr_weights(features) == pytest.approx(4 * features.shape[0] / max(w), rel=1e-5)
    temp = torch.sum(torch.pow(features @ text.T, 2), dim=0)
    assert lr_alpha(features, text) == pytest.approx(features.shape[0] / (max(temp).item() * 4), rel=1e-5)
    one_hot = F.one_hot(labels, 3).float().T  # compute_centroids: one_hot.bmm(z_s), the sum, no division
    torch.testing.assert_close(class_sums(features, labels, 3), one_hot @ features)
    assert not torch.allclose(class_sums(features, labels, 3)[0], features[labels == 0].mean(0))


def _official_loop(features, labels, text, weight, bias, alpha0, *, lr_w, lr_a, epochs):
    """LinearProbe_P2.forward's training loop, re-typed (no val)."""
    classifier = torch.nn.Linear(features.shape[1], text.shape[0])
    classifier.weight.data, classifier.bias.data = weight.clone(), bias.clone()
    alpha_vec = torch.autograd.Variable(alpha0 * torch.ones(1, text.shape[0]), requires_grad=True)
    optimizer = torch.optim.SGD(classifier.parameters(), lr_w, momentum=0.9)
    for epoch in range(epochs):
        logits = classifier(features) + torch.ones(features.shape[0], 1) @ alpha_vec * (features @ text.T)
        loss = F.cross_entropy(logits, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if (epoch + 1) % 10 == 0:
            alpha_vec.data -= lr_a * alpha_vec.grad.data
    return classifier.weight.data, classifier.bias.data, alpha_vec.data.view(-1)


def test_the_loop_is_the_official_one_including_the_accumulated_alpha_gradient():
    features, labels, text, _ = _tensors(1)
    weight, bias = class_sums(features, labels, 3), torch.tensor([0.1, -0.2, 0.05])
    alpha0, lr_w, lr_a = init_alpha(features, labels, text), lr_weights(features), lr_alpha(features, text)
    expected = _official_loop(features, labels, text, weight, bias, alpha0, lr_w=lr_w, lr_a=lr_a, epochs=30)
    heads = {}
    for accumulate in (True, False):
        head = LpPlusPlusHead(weight, bias, torch.full((3,), alpha0), text)
        cfg = LpPlusPlusConfig(epochs=30, select="last", accumulate_alpha_grad=accumulate)
        train_lp_pp(head, features, labels, config=cfg, lr_w=lr_w, lr_a=lr_a, val=None)
        heads[accumulate] = head
    got = heads[True]
    for a, b in zip((got.linear.weight, got.linear.bias, got.alpha), expected):
        torch.testing.assert_close(a.detach(), b.float(), rtol=1e-4, atol=1e-5)
    assert len(set(got.alpha.tolist())) == 3  # α became class-wise
    assert not torch.allclose(heads[False].alpha, got.alpha)  # the quirk matters


def test_the_epoch_kept_is_the_last_val_maximum_and_is_what_the_record_holds(tmp_path):
    cache = learning_store(tmp_path / "cache")
    (run,) = api.fit(
        "lp_pp",
        shots=4,
        seeds=[1],
        options={"epochs": 40},
        cache_dir=cache,
        runs_dir=tmp_path,
        progress=False,
        **SYNTH,
    )
    record = json.loads((run.run_dir / "record.json").read_text())
    scores = [h["select_acc"] for h in record["history"]]
    best = max(scores)
    assert record["selection"]["epoch"] == len(scores) - 1 - scores[::-1].index(best)
    assert record["selection"]["val_acc"] == best


def test_lp_pp_learns_where_zero_shot_is_chance(tmp_path):
    cache = learning_store(tmp_path / "cache")
    zs = fit_accuracy("zero_shot", cache, tmp_path / "runs")
    acc = fit_accuracy("lp_pp", cache, tmp_path / "runs")
    print(f"zero-shot {zs:.1f} lp_pp {acc:.1f}")
    assert zs == pytest.approx(zero_shot_chance(4)) and acc >= zs + 25
