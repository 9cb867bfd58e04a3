"""CrossModal (METHODS §2.10): the CLAP toolbox's cross-modal pool (text samples resampled to the number of
image features, half of the pool redrawn each epoch), re-typed on the same draws."""

from __future__ import annotations

import pytest
import test_method_zs_lp as zs_lp_tests
import torch
import torch.nn.functional as F
from method_helpers import fit_accuracy, learning_store

from fsl_cache.methods.cross_modal import half_sample, text_samples
from fsl_cache.methods.zs_lp import ClapTrainConfig, CosineProbeHead, train_probe
from fsl_cache.testing import zero_shot_chance

pytestmark = pytest.mark.usefixtures("one_thread")


def test_text_samples_are_drawn_with_replacement_and_keep_their_class():
    text = torch.arange(3 * 2 * 4, dtype=torch.float32).view(3, 2, 4)  # class c, template t
    samples, labels = text_samples(text, 50, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (50, 4) and len(set(labels.tolist())) == 3
    for s, y in zip(samples, labels):
        assert any(torch.equal(s, text[y, t]) for t in range(2))
    replay = torch.randint(0, 6, (50,), generator=torch.Generator().manual_seed(0))
    assert labels.tolist() == (replay // 2).tolist()


def test_each_epoch_trains_on_half_the_pool_drawn_with_replacement():
    g = torch.Generator().manual_seed(3)
    features, labels = torch.randn(40, 5, generator=g), torch.arange(40) % 4
    x, y = half_sample(torch.Generator().manual_seed(1))(features, labels)
    idx = torch.randint(0, 40, (20,), generator=torch.Generator().manual_seed(1))
    assert torch.equal(x, features[idx]) and torch.equal(y, labels[idx])


def test_trained_probe_is_the_official_cross_modal_loop_on_the_same_draws():
    """Pool = image views + resampled text samples; each epoch a half sample with replacement, then a shuffle."""
    g = torch.Generator().manual_seed(5)
    features, labels = torch.randn(30, 6, generator=g), torch.arange(30) % 3
    text = F.normalize(torch.randn(3, 2, 6, generator=g), dim=-1)
    init = torch.randn(3, 6, generator=g)
    run = torch.Generator().manual_seed(8)
    words, word_labels = text_samples(text, 30, generator=run)
    pool = torch.cat([features, words]), torch.cat([labels, word_labels])
    head = CosineProbeHead(init, scale=100.0)
    cfg = ClapTrainConfig(epochs=4, batch_size=8)
    train_probe(head, *pool, config=cfg, batches=2, generator=run, resample=half_sample(run))
    replay = torch.Generator().manual_seed(8)
    idx = torch.randint(0, 6, (30,), generator=replay)
    flat = text.reshape(6, 6)
    assert torch.equal(words, flat[idx]) and torch.equal(word_labels, idx // 2)
    draws, perms = [], []
    for _ in range(4):
        draws.append(torch.randint(0, 60, (30,), generator=replay))
        perms.append(torch.randperm(30, generator=replay))
    expected = zs_lp_tests._official_loop(
        init, *pool, perms=perms, lr=0.1, epochs=4, batch=8, batches=2, draws=draws
    )
    torch.testing.assert_close(head.prototypes.detach(), expected)


def test_text_samples_alone_teach_the_probe_the_text_directions():
    """With the text of class c pointing elsewhere than the init, training on text samples moves w_c to it."""
    g = torch.Generator().manual_seed(0)
    text = F.normalize(torch.randn(3, 1, 8, generator=g), dim=-1)
    words, labels = text_samples(text, 60, generator=g)
    head = CosineProbeHead(torch.randn(3, 8, generator=g), scale=100.0)
    before = (head({"pooled": text[:, 0]}).argmax(1) == torch.arange(3)).sum()
    train_probe(head, words, labels, config=ClapTrainConfig(epochs=30, batch_size=16), batches=2, generator=g)
    assert (head({"pooled": text[:, 0]}).argmax(1) == torch.arange(3)).all() and before < 3


def test_cross_modal_learns_where_zero_shot_is_chance(tmp_path):
    cache = learning_store(tmp_path / "cache")
    zs = fit_accuracy("zero_shot", cache, tmp_path / "runs")
    acc = fit_accuracy("cross_modal", cache, tmp_path / "runs")
    print(f"zero-shot {zs:.1f} cross_modal {acc:.1f}")
    assert zs == pytest.approx(zero_shot_chance(4)) and acc >= zs + 25
