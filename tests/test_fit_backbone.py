"""Stage two on real (tiny, random-weight) backbones: what the store caches is what the backbone computes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from open_clip.transform import image_transform
from PIL import Image

from fsl_cache import api
from fsl_cache.backbones import load_backbone
from fsl_cache.datasets import make_demo_dataset
from fsl_cache.methods.zero_shot import ZeroShotHead
from fsl_cache.store import FeatureStore


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    return make_demo_dataset(tmp_path_factory.mktemp("demo") / "data")


@pytest.mark.parametrize("arch", ["fsl-tiny-rn", "fsl-tiny-vit"])
def test_cached_zero_shot_logits_equal_logits_computed_on_the_fly(arch, demo, tmp_path):
    result = api.extract(
        f"imagefolder:{demo}",
        model=arch,
        pretrained="none",
        for_methods=["zero_shot"],
        cache_dir=tmp_path,
        shots=(1,),
        seeds=(1,),
        precision="fp32",
        workers=0,
        progress=False,
    )
    store = FeatureStore.open(result.store)
    rows = np.arange(0, 100, 7)
    paths = store.read("images/test/paths", rows)
    cached_pooled = torch.from_numpy(store.read("images/test/views/center/pooled", rows)[:, 0])
    cached_logits = torch.from_numpy(store.read("images/test/views/center/zs_logits/tip", rows)[:, 0])
    cfg, names, templates = (
        store.manifest["backbone"]["preprocess_cfg"],
        store.classnames,
        store.manifest["dataset"]["templates"]["tip"],
    )
    store.close()

    backbone = load_backbone(arch, "none")
    preprocess = image_transform(
        cfg["size"],
        is_train=False,
        mean=cfg["mean"],
        std=cfg["std"],
        resize_mode=cfg.get("resize_mode"),
        interpolation=cfg.get("interpolation"),
    )
    images = torch.stack([preprocess(Image.open(demo / p).convert("RGB")) for p in paths])
    pooled = backbone.encode_taps(images, ["pooled"])["pooled"].float()
    text = backbone.text_classifier(list(names), list(templates)).float()
    on_the_fly = 100.0 * F.normalize(pooled, dim=-1) @ text.T

    torch.testing.assert_close(cached_pooled, pooled, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(cached_logits, on_the_fly, rtol=1e-4, atol=1e-3)
    # and the zero-shot method's head, fed the cached embedding, gives the same logits
    head = ZeroShotHead(text, scale=100.0)
    torch.testing.assert_close(head({"pooled": cached_pooled}), on_the_fly, rtol=1e-4, atol=1e-3)
    (run,) = api.fit(
        "zero_shot",
        dataset=f"imagefolder:{demo}",
        model=arch,
        pretrained="none",
        shots=1,
        seeds=[1],
        cache_dir=tmp_path,
        runs_dir=tmp_path / "runs",
        progress=False,
    )
    assert 0 <= run.test_acc <= 100
