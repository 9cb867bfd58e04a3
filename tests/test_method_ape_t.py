"""APE-T (METHODS §2.10): the text-only criterion, the refined keys/text/values and the logits re-typed from
yangyangyang127/APE utils.py::APE_Training and main.py::APE_T, on trained (non-zero) parameters."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from method_helpers import fit_accuracy, learning_store

from fsl_cache.methods import get_method
from fsl_cache.methods.ape import channel_criterion, select_channels
from fsl_cache.methods.ape_t import ApeTHead, text_similarity
from fsl_cache.methods.tip_adapter import build_values
from fsl_cache.testing import zero_shot_chance
from fsl_cache.training import TaskInfo

pytestmark = pytest.mark.usefixtures("one_thread")


def test_text_only_criterion_matches_the_official_loop():
    text = F.normalize(torch.randn(4, 6, generator=torch.Generator().manual_seed(0)), dim=-1)
    sim_sum, count = torch.zeros(6), 0
    for i in range(4):
        for j in range(4):
            if i != j:
                sim_sum += text[i, :] * text[j, :]
                count += 1
    torch.testing.assert_close(text_similarity(text), sim_sum / count)
    criterion = (-1) * 0.2 * (sim_sum / count) + 0.8 * torch.var(text.T, dim=1)
    got = channel_criterion(text_similarity(text), text, (0.2, 0.8))
    torch.testing.assert_close(got, criterion)
    assert select_channels(got, 3).tolist() == torch.topk(criterion, k=3)[1].tolist()


def _official(
    image_features, cache_keys, clip_weights, cache_values, res, value_weights, indices, shots, beta, alpha
):
    """APE_Training.forward + APE_T's logits, re-typed (clip_weights [D, C], keys class-major)."""
    feat_num = res.shape[1]
    res_keys = res.unsqueeze(1).repeat(1, shots, 1).reshape(-1, feat_num)
    new_cache_keys = cache_keys.clone().reshape(-1, cache_keys.shape[1])
    new_cache_keys[:, indices] = new_cache_keys[:, indices] + res_keys
    new_clip_weights = clip_weights.clone()
    new_clip_weights[indices, :] = clip_weights[indices, :] + res.t()
    R_FW = cache_values * value_weights
    R_fF = image_features @ new_cache_keys.t()
    cache_logits = ((-1) * (beta - beta * R_fF)).exp() @ R_FW
    return 100.0 * image_features @ new_clip_weights + cache_logits * alpha


def test_refined_head_matches_the_official_forward_on_trained_parameters():
    g = torch.Generator().manual_seed(1)
    c, shots, d = 3, 2, 6
    labels = torch.arange(c).repeat_interleave(shots)
    keys = F.normalize(torch.randn(c * shots, d, generator=g), dim=-1)
    text = F.normalize(torch.randn(c, d, generator=g), dim=-1)
    values = build_values(labels, c)
    channels = torch.tensor([4, 1, 2])
    res, value_weights = (
        0.1 * torch.randn(c, 3, generator=g),
        1 + 0.2 * torch.randn(c * shots, 1, generator=g),
    )
    head = ApeTHead(text, keys, values, labels, channels, alpha=1.3, beta=2.0, scale=100.0,
                    res=res, value_weights=value_weights)  # fmt: skip
    f = torch.randn(5, d, generator=g)
    fn = F.normalize(f, dim=-1)
    expected = _official(fn, keys, text.T, values, res, value_weights, channels, shots, 2.0, 1.3)
    torch.testing.assert_close(head({"pooled": f}), expected)
    loss = F.cross_entropy(head({"pooled": f}), torch.tensor([0, 1, 2, 0, 1]))
    loss.backward()
    assert head.res.grad.abs().sum() > 0 and head.value_weights.grad.abs().sum() > 0


def test_defaults_follow_the_configs():
    method = get_method("ape_t").create()
    cfg = method.resolve(TaskInfo("eurosat", tuple("abcdefghij"), 4, 1, "coop", 1024))
    assert (cfg.epochs, cfg.lr, cfg.eps, cfg.channels, cfg.weight_decay) == (200, 1e-3, 1e-3, 900, 0.1)
    assert get_method("ape_t").needs("eurosat").train_views[0].views == 201


def test_ape_t_learns_where_zero_shot_is_chance(tmp_path):
    cache = learning_store(tmp_path / "cache")
    zs = fit_accuracy("zero_shot", cache, tmp_path / "runs")
    acc = fit_accuracy("ape_t", cache, tmp_path / "runs")
    print(f"zero-shot {zs:.1f} ape_t {acc:.1f}")
    assert zs == pytest.approx(zero_shot_chance(4)) and acc >= zs + 25
