"""APE (METHODS §2.10): the channel criterion, shot weights, logits and the β/α/γ search re-typed from
yangyangyang127/APE utils.py::cal_criterion and main.py::APE, on asymmetric tensors."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from method_helpers import SYNTH, fit_accuracy, learning_store

from fsl_cache import api
from fsl_cache.methods.ape import (
    APE_TABLE,
    ApeHead,
    channel_criterion,
    cross_class_similarity,
    gamma_grid,
    scaled_channels,
    search_ape,
    select_channels,
    shot_divergence,
)
from fsl_cache.methods.tip_adapter import build_values
from fsl_cache.runs.record import load_head_tensors
from fsl_cache.testing import zero_shot_chance

pytestmark = pytest.mark.usefixtures("one_thread")


def _official_criterion(clip_weights, cache_keys, shots, w, k):
    """cal_criterion(only_use_txt=False), re-typed (clip_weights [D, C], keys class-major [C·shots, D])."""
    feat_dim, cate_num = clip_weights.shape
    text_feat = clip_weights.t().unsqueeze(1)
    cache_feat = cache_keys.reshape(cate_num, shots, feat_dim)
    feats = torch.cat([text_feat, cache_feat], dim=1)
    samp_num = feats.shape[1]
    sim_sum, count = torch.zeros(feat_dim), 0
    for i in range(cate_num):
        for j in range(cate_num):
            for m in range(samp_num):
                for n in range(samp_num):
                    if i != j:
                        sim_sum += feats[i, m, :] * feats[j, n, :]
                        count += 1
    sim = sim_sum / count
    criterion = (-1) * w[0] * sim + w[1] * torch.var(clip_weights, dim=1)
    return criterion, torch.topk(criterion, k=k)[1]


def _tensors(seed=0, c=3, shots=2, d=7):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(c).repeat_interleave(shots)
    keys = F.normalize(torch.randn(c * shots, d, generator=g) + F.one_hot(labels, d), dim=-1)
    text = F.normalize(torch.randn(c, d, generator=g), dim=-1)
    return keys, labels, text


def test_channel_criterion_matches_the_official_loops():
    keys, labels, text = _tensors()
    expected, indices = _official_criterion(text.T, keys, 2, (0.7, 0.3), 4)
    groups = [torch.cat([text[c : c + 1], keys[labels == c]]).double() for c in range(3)]
    got = channel_criterion(cross_class_similarity(groups).float(), text, (0.7, 0.3))
    torch.testing.assert_close(got, expected)
    assert select_channels(got, 4).tolist() == indices.tolist()


def _official_ape_logits(test_features, clip_weights, cache_keys, cache_values, indices, beta, alpha, gamma):
    """main.py::APE's logits for one (β, α, γ), re-typed."""
    new_clip_weights = clip_weights[indices, :]
    new_cache_keys = cache_keys[:, indices]
    new_test_features = test_features[:, indices]
    new_clip_weights = new_clip_weights / new_clip_weights.norm(dim=0, keepdim=True)
    new_cache_keys = new_cache_keys / new_cache_keys.norm(dim=-1, keepdim=True)
    new_test_features = new_test_features / new_test_features.norm(dim=-1, keepdim=True)
    R_fW = 100.0 * test_features @ clip_weights
    R_fF = new_test_features @ new_cache_keys.t()
    key_logits = (new_cache_keys @ new_clip_weights).softmax(1)
    cache_div = torch.sum(cache_values * torch.log2((cache_values + 1e-6) / (key_logits + 1e-6)), dim=1)[
        :, None
    ]
    soft_cache_values = cache_values * (cache_div * gamma).exp()
    cache_logits = ((-1) * (beta - beta * R_fF)).exp() @ soft_cache_values
    return R_fW + cache_logits * alpha


def test_shot_weights_and_logits_match_the_official_code():
    keys, labels, text = _tensors(1)
    values = build_values(labels, 3)
    channels = torch.tensor([5, 0, 3, 2])
    f = F.normalize(torch.randn(5, 7, generator=torch.Generator().manual_seed(4)), dim=-1)
    expected = _official_ape_logits(f, text.T, keys, values, channels, 2.5, 1.7, 0.4)
    keys_sel, text_sel = F.normalize(keys[:, channels], dim=-1), F.normalize(text[:, channels], dim=-1)
    divergence = shot_divergence(keys_sel, text_sel, values)
    assert len(set(divergence.tolist())) == 6  # one weight per shot
    head = ApeHead(text, keys_sel, values, divergence, channels, alpha=1.7, beta=2.5, gamma=0.4, scale=100.0)
    torch.testing.assert_close(head({"pooled": 3 * f}), expected)


def test_search_is_the_official_triple_loop():
    keys, labels, text = _tensors(2)
    values = build_values(labels, 3)
    channels = torch.tensor([1, 4, 6])
    keys_sel, text_sel = F.normalize(keys[:, channels], dim=-1), F.normalize(text[:, channels], dim=-1)
    divergence = shot_divergence(keys_sel, text_sel, values)
    g = torch.Generator().manual_seed(7)
    val = F.normalize(torch.randn(24, 7, generator=g) + F.one_hot(torch.arange(24) % 3, 7), dim=-1)
    val_labels = torch.arange(24) % 3
    head = ApeHead(text, keys_sel, values, divergence, channels, alpha=1, beta=1, gamma=0.1, scale=100.0)
    clip, affinity = head.parts(val)
    betas, alphas, gammas = (
        [0.1 + i * 6.9 / 8 for i in range(8)],
        [0.1 + i * 6.9 / 5 for i in range(5)],
        gamma_grid(1, 4),
    )
    best = (0, 0, 0, 0)
    for beta in betas:
        for alpha in alphas:
            for gamma in gammas:
                logits = _official_ape_logits(val, text.T, keys, values, channels, beta, alpha, gamma)
                acc = 100 * float((logits.argmax(1) == val_labels).sum()) / 24
                if acc > best[0]:
                    best = (acc, beta, alpha, gamma)
    got = search_ape(
        clip, affinity, values, divergence, val_labels, betas=betas, alphas=alphas, gammas=gammas
    )
    assert got == pytest.approx((best[1], best[2], best[3], best[0]))
    assert gammas[0] == 0.0


def test_per_dataset_configs_and_channel_scaling():
    assert APE_TABLE["eurosat"].search_scale == (30.0, 5.0, 1.5) and APE_TABLE["eurosat"].free_channels == 700
    assert APE_TABLE["imagenet"].search_steps == (200, 20, 5) and APE_TABLE["fgvc_aircraft"].free_w == (
        0.1,
        0.9,
    )
    assert (
        scaled_channels(700, 1024) == 700
        and scaled_channels(700, 512) == 350
        and scaled_channels(900, 32) == 28
    )


def test_recorded_search_is_the_exported_head(tmp_path):
    cache = learning_store(tmp_path / "cache")
    (run,) = api.fit(
        "ape",
        shots=2,
        seeds=[1],
        options={"search_steps": "20,5,5"},
        cache_dir=cache,
        runs_dir=tmp_path,
        progress=False,
        **SYNTH,
    )
    record = json.loads((run.run_dir / "record.json").read_text())
    tensors = load_head_tensors(run.run_dir)
    for name in ("alpha", "beta", "gamma"):
        assert float(tensors[name]) == pytest.approx(record["selection"][name])
    assert len(tensors["channels"]) == record["selection"]["channels"] == scaled_channels(700, 32)


def test_ape_is_at_least_zero_shot(tmp_path):
    cache = learning_store(tmp_path / "cache")
    zs = fit_accuracy("zero_shot", cache, tmp_path / "runs")
    acc = fit_accuracy("ape", cache, tmp_path / "runs")
    print(f"zero-shot {zs:.1f} ape {acc:.1f}")
    assert zs == pytest.approx(zero_shot_chance(4)) and acc >= zs
