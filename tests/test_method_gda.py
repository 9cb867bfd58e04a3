"""GDA (METHODS §2.10): precision, weights, bias and the α search re-typed from mrflogs/ICLR24
main_few_shots.py::run, on asymmetric tensors; the recorded α is what the exported head uses."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from method_helpers import SYNTH, fit_accuracy, learning_store

from fsl_cache import api
from fsl_cache.methods.gda import GdaHead, class_means, gda_weights, search_alpha, shrunk_precision
from fsl_cache.runs.record import load_head_tensors
from fsl_cache.testing import zero_shot_chance

pytestmark = pytest.mark.usefixtures("one_thread")


def _official(vecs, labels, clip_weights):
    """run(): mus, the KS estimator, W and b, re-typed (clip_weights is [D, C] in the code)."""
    mus = torch.cat([vecs[labels == i].mean(dim=0, keepdim=True) for i in range(clip_weights.shape[1])])
    center_vecs = torch.cat([vecs[labels == i] - mus[i].unsqueeze(0) for i in range(clip_weights.shape[1])])
    cov_inv = center_vecs.shape[1] * torch.linalg.pinv(
        (center_vecs.shape[0] - 1) * center_vecs.T.cov()
        + center_vecs.T.cov().trace() * torch.eye(center_vecs.shape[1])
    )
    ps = torch.ones(clip_weights.shape[1]) * 1.0 / clip_weights.shape[1]
    W = torch.einsum("nd, dc -> cn", mus, cov_inv)
    b = ps.log() - torch.einsum("nd, dc, nc -> n", mus, cov_inv, mus) / 2
    return mus, cov_inv, W, b


def _tensors(seed=0, c=3, per=7, d=5):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(c).repeat_interleave(per)
    scales = torch.tensor([0.5, 1.0, 2.0, 0.3, 1.5])  # anisotropic, so P is not a multiple of I
    vecs = F.normalize(torch.randn(c * per, d, generator=g) * scales + 2 * F.one_hot(labels, d), dim=-1)
    text = F.normalize(torch.randn(c, d, generator=g), dim=-1)
    return vecs, labels, text


def test_precision_weights_and_bias_match_the_official_code():
    vecs, labels, text = _tensors()
    mus, cov_inv, W, b = _official(vecs, labels, text.T)
    means = class_means(vecs, labels, 3)
    precision = shrunk_precision(vecs, labels, means)
    weight, bias = gda_weights(means, precision)
    torch.testing.assert_close(means, mus)
    torch.testing.assert_close(precision, cov_inv)
    torch.testing.assert_close(weight, W.T)
    torch.testing.assert_close(bias, b)
    assert len(set(bias.tolist())) == 3
    f = torch.randn(4, 5, generator=torch.Generator().manual_seed(9))
    head = GdaHead(text, weight, bias, alpha=0.7, scale=100.0)
    fn = f / f.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(head({"pooled": f}), 100.0 * fn @ text.T + 0.7 * (fn @ W + b))


def test_alpha_search_is_the_official_first_strict_maximum():
    g = torch.Generator().manual_seed(2)
    clip, gda, labels = (
        torch.randn(30, 3, generator=g),
        50 * torch.randn(30, 3, generator=g),
        torch.arange(30) % 3,
    )
    best_val_acc, best_alpha = 0, 0.1
    for alpha in [0.0001, 0.001, 0.01, 0.1, 1.0, 10.0, 100.0]:
        acc = 100 * float(((clip + alpha * gda).argmax(1) == labels).sum()) / 30
        if acc > best_val_acc:
            best_val_acc, best_alpha = acc, alpha
    assert search_alpha(clip, gda, labels, (0.0001, 0.001, 0.01, 0.1, 1.0, 10.0, 100.0)) == pytest.approx(
        (best_alpha, best_val_acc)
    )
    assert search_alpha(clip[:0], gda[:0], labels[:0], (1.0, 2.0)) == (0.1, 0.0)


def test_recorded_alpha_is_the_exported_head_alpha(tmp_path):
    cache = learning_store(tmp_path / "cache")
    (run,) = api.fit("gda", shots=4, seeds=[1], cache_dir=cache, runs_dir=tmp_path, progress=False, **SYNTH)
    record = json.loads((run.run_dir / "record.json").read_text())
    assert record["selection"]["search_on"] == "val" and record["selection"]["views"] == 10
    assert float(load_head_tensors(run.run_dir)["alpha"]) == pytest.approx(record["selection"]["alpha"])


def test_gda_is_at_least_zero_shot(tmp_path):
    cache = learning_store(tmp_path / "cache")
    zs = fit_accuracy("zero_shot", cache, tmp_path / "runs")
    acc = fit_accuracy("gda", cache, tmp_path / "runs")
    print(f"zero-shot {zs:.1f} gda {acc:.1f}")
    assert zs == pytest.approx(zero_shot_chance(4)) and acc >= zs
