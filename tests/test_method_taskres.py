"""TaskRes (METHODS §2.10): the residual and the Adam/L2 step re-typed from geekyutao/TaskRes
trainers/taskres.py on trained, asymmetric tensors; per-dataset/per-shot defaults from its configs."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from method_helpers import fit_accuracy, learning_store

from fsl_cache.methods import get_method
from fsl_cache.methods.taskres import TaskResHead, residual_weights
from fsl_cache.testing import zero_shot_chance
from fsl_cache.training import TaskInfo
from fsl_cache.training.schedule import build_optimizer
from fsl_cache.training.settings import TrainSettings

pytestmark = pytest.mark.usefixtures("one_thread")


def _official_logits(image_features, base, residuals, alpha):
    """CustomCLIP.forward (TaskRes-Text), re-typed."""
    text_features = base + alpha * residuals
    image_features = image_features / image_features.norm(dim=-1, keepdim=True)
    text_features = text_features / text_features.norm(dim=-1, keepdim=True)
    return 100.0 * image_features @ text_features.t()


def test_head_is_the_official_residual_and_starts_as_zero_shot():
    g = torch.Generator().manual_seed(0)
    base, residual, f = (
        torch.randn(3, 5, generator=g),
        torch.randn(3, 5, generator=g),
        torch.randn(4, 5, generator=g),
    )
    torch.testing.assert_close(residual_weights(base, residual, 0.7), base + 0.7 * residual)
    head = TaskResHead(base, alpha=0.7, scale=37.0, residual=residual)
    torch.testing.assert_close(head({"pooled": f}), 37.0 / 100.0 * _official_logits(f, base, residual, 0.7))
    fresh = TaskResHead(base, alpha=0.5, scale=100.0)
    torch.testing.assert_close(
        fresh({"pooled": f}), 100 * F.normalize(f, dim=-1) @ F.normalize(base, dim=-1).T
    )


def test_steps_are_dassl_adam_with_l2_weight_decay():
    g = torch.Generator().manual_seed(1)
    base, f, y = (
        torch.randn(3, 5, generator=g),
        torch.randn(8, 5, generator=g),
        torch.tensor([0, 1, 2, 0, 1, 2, 2, 1]),
    )
    head = TaskResHead(base, alpha=0.7, scale=100.0)
    settings = TrainSettings(optimizer="adam", lr=2e-3, weight_decay=5e-4)
    opt = build_optimizer([head.residual], settings)
    x = torch.nn.Parameter(torch.zeros(3, 5))
    ref = torch.optim.Adam([x], lr=2e-3, weight_decay=5e-4)  # Dassl build_optimizer("adam")
    for _ in range(5):
        for o, logits in (
            (opt, lambda: head({"pooled": f})),
            (ref, lambda: _official_logits(f, base, x, 0.7)),
        ):
            loss = F.cross_entropy(logits(), y)
            o.zero_grad()
            loss.backward()
            o.step()
    torch.testing.assert_close(head.residual.detach(), x.detach())
    assert x.abs().sum() > 0


@pytest.mark.parametrize(
    ("dataset", "shots", "expected"),
    [
        ("eurosat", 1, (100, 2e-3, 0.5)),
        ("eurosat", 16, (200, 2e-3, 0.5)),
        ("imagenet", 4, (100, 2e-4, 0.5)),
        ("oxford_flowers", 8, (200, 2e-3, 1.0)),
    ],
)
def test_defaults_follow_the_official_configs(dataset, shots, expected):
    method = get_method("taskres").create()
    info = TaskInfo(dataset, ("a", "b"), shots, 1, "coop", 4)
    cfg = method.resolve(info)
    assert (cfg.epochs, cfg.lr, cfg.alpha) == expected
    assert (cfg.optimizer, cfg.batch_size, cfg.weight_decay, cfg.select, cfg.warmup) == (
        "adam",
        256,
        5e-4,
        "last",
        1,
    )


def test_taskres_learns_where_zero_shot_is_chance(tmp_path):
    cache = learning_store(tmp_path / "cache")
    zs = fit_accuracy("zero_shot", cache, tmp_path / "runs")
    acc = fit_accuracy("taskres", cache, tmp_path / "runs")
    print(f"zero-shot {zs:.1f} taskres {acc:.1f}")
    assert zs == pytest.approx(zero_shot_chance(4)) and acc >= zs + 25
