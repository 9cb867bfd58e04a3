"""Stage one end to end on a tiny backbone: contents, equivalences, resume, additions, refusals."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from fsl_cache import api
from fsl_cache.backbones import load_backbone
from fsl_cache.backbones.views import ViewRenderer, sample_params
from fsl_cache.datasets import load_dataset, make_demo_dataset, open_image
from fsl_cache.errors import DatasetError, DiskFullError, UsageError
from fsl_cache.store import FeatureStore, verify_store

FEW = {"shots": (1, 2), "seeds": (1, 2), "workers": 0, "progress": False}


@pytest.fixture(scope="module")
def demo_root(tmp_path_factory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("data") / "demo")


@pytest.fixture(scope="module")
def rn_store(demo_root, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    result = api.extract(
        f"imagefolder:{demo_root}",
        model="fsl-tiny-rn",
        pretrained="none",
        cache_dir=cache,
        for_methods=["tip_adapter", "safe"],
        **FEW,
    )
    return result


def _read_all(path: Path) -> dict[str, np.ndarray]:
    store = FeatureStore.open(path)
    try:
        return {name: store.read(name) for name in store.arrays}
    finally:
        store.close()


def test_store_holds_the_planned_views_and_verifies(rn_store, demo_root):
    arrays = rn_store.arrays
    spec = load_dataset(f"imagefolder:{demo_root}")
    n_test = len(spec.splits["test"])
    assert arrays["images/test/views/center/pooled"]["shape"] == [n_test, 1, 64]
    assert arrays["images/test/views/center/zs_logits/tip"]["shape"] == [n_test, 1, spec.num_classes]
    assert arrays["images/train_pool/views/tip/pooled"]["shape"][1] == 11
    assert arrays["images/train_pool/views/flip/rn/layer4"]["shape"][1:] == [2, 256, 2, 2]
    assert arrays["text/tip"]["shape"] == [spec.num_classes, 64]
    assert verify_store(rn_store.store) == []
    assert rn_store.random_init


def test_cached_tensors_equal_the_backbone_on_the_same_views(rn_store, demo_root):
    store = FeatureStore.open(rn_store.store)
    bb = load_backbone("fsl-tiny-rn", "none")
    spec = load_dataset(f"imagefolder:{demo_root}")
    rows = np.array([0, 3])
    split_idx = store.read("images/train_pool/split_index", rows)
    params = store.read("images/train_pool/views/flip/aug_params", rows)
    renderer = ViewRenderer(bb.preprocess_cfg)
    images = []
    for i, p in zip(split_idx, params):
        img = open_image(spec.path("train", int(i)))
        np.testing.assert_array_equal(
            p,
            sample_params(
                "flip", views=2, width=img.width, height=img.height, seed=0, split="train", index=int(i)
            ),
        )
        images.append(renderer.render(img, p, policy="flip"))
    x = torch.cat(images)
    taps = bb.encode_taps(x, ["pooled", "rn/layer4"])
    cached_pool = store.read("images/train_pool/views/flip/pooled", rows).reshape(4, -1)
    cached_map = store.read("images/train_pool/views/flip/rn/layer4", rows).reshape(taps["rn/layer4"].shape)
    torch.testing.assert_close(torch.from_numpy(cached_pool).float(), taps["pooled"].half().float())
    torch.testing.assert_close(torch.from_numpy(cached_map).float(), taps["rn/layer4"].half().float())
    # the center view is open_clip's own eval preprocessing
    import open_clip

    val_tf = open_clip.image_transform(
        bb.image_size, is_train=False, mean=bb.preprocess_cfg["mean"], std=bb.preprocess_cfg["std"]
    )
    torch.testing.assert_close(images[0][0], val_tf(open_image(spec.path("train", int(split_idx[0])))))
    # zero-shot logits are 100 · f̂ Wᵀ with the stored text weights
    w = torch.from_numpy(store.read("text/tip"))
    zs = 100 * torch.nn.functional.normalize(taps["pooled"], dim=-1) @ w.T
    cached_zs = (
        torch.from_numpy(store.read("images/train_pool/views/flip/zs_logits/tip", rows))
        .float()
        .reshape(4, -1)
    )
    torch.testing.assert_close(cached_zs, zs, atol=0.05, rtol=1e-2)
    store.close()


def test_views_are_added_later_without_touching_existing_arrays(rn_store, demo_root):
    before = json.loads((rn_store.store / "manifest.json").read_text())["arrays"]
    again = api.extract(
        f"imagefolder:{demo_root}",
        model="fsl-tiny-rn",
        pretrained="none",
        cache_dir=rn_store.store.parents[1],
        for_methods=["tip_adapter", "ldc"],
        **FEW,
    )
    assert again.store == rn_store.store
    after = json.loads((rn_store.store / "manifest.json").read_text())["arrays"]
    for name, entry in before.items():
        assert after[name]["blocks"] == entry["blocks"], name
    new = set(after) - set(before)
    assert "images/train_pool/views/ldc/rn/layer1" in new and "images/test/views/center/rn/layer1" in new
    assert not any(n.startswith("images/train_pool/views/tip/") for n in new)
    assert verify_store(rn_store.store) == []


def test_hdf5_store_equals_zarr_store(rn_store, demo_root, tmp_path):
    h5 = api.extract(
        f"imagefolder:{demo_root}",
        model="fsl-tiny-rn",
        pretrained="none",
        cache_dir=tmp_path,
        for_methods=["tip_adapter", "safe"],
        format="hdf5",
        **FEW,
    )
    assert h5.fingerprint != rn_store.fingerprint  # the format is part of the key
    assert verify_store(h5.store) == []
    zarr_arrays, h5_arrays = _read_all(rn_store.store), _read_all(h5.store)
    for name, data in h5_arrays.items():
        if name in zarr_arrays:
            np.testing.assert_array_equal(data, zarr_arrays[name], err_msg=name)


def test_vit_taps_include_cls_and_the_dense_input_of_the_last_block(demo_root, tmp_path):
    result = api.extract(
        f"imagefolder:{demo_root}",
        model="fsl-tiny-vit",
        pretrained="none",
        cache_dir=tmp_path,
        for_methods=["ldc", "safe"],
        views=2,
        **FEW,
    )
    arrays = result.arrays
    assert {f"images/test/views/center/vit/block{b:02d}" for b in (6, 8, 10, 11, 12)} <= set(arrays)
    tokens, width = arrays["images/test/views/center/vit/block12"]["shape"][2:]
    assert (
        tokens == 65 and width == load_backbone("fsl-tiny-vit", "none").tap_shape("vit/block12")[1]
    )  # 8×8 patches + CLS
    assert result.to_json()["arrays"]["images/test/views/center/pooled"]["dtype"] == "float16"


def test_disk_full_is_refused_before_writing(demo_root, tmp_path, monkeypatch):
    import fsl_cache.extraction.pipeline as ex

    monkeypatch.setattr(ex, "_free_bytes", lambda path: 1000)
    with pytest.raises(DiskFullError, match="Not enough disk space"):
        api.extract(
            f"imagefolder:{demo_root}", model="fsl-tiny-rn", pretrained="none", cache_dir=tmp_path, **FEW
        )
    assert not any(tmp_path.rglob("manifest.json"))


def _bad_dataset(tmp_path: Path) -> Path:
    root = tmp_path / "bad"
    for split in ("train", "val", "test"):
        for cls in ("cat", "dog"):
            folder = root / split / cls
            folder.mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (20, 24), (i * 40, 10, 200 if cls == "dog" else 0)).save(folder / f"{i}.png")
    (root / "test" / "dog" / "broken.png").write_bytes(b"\x89PNG not really")
    Image.new("CMYK", (30, 30)).save(root / "test" / "cat" / "cmyk.jpg")
    Image.new("I;16", (30, 30)).save(root / "test" / "cat" / "deep.png")
    return root


def test_bad_image_stops_with_its_path_or_is_skipped_and_recorded(tmp_path):
    root = _bad_dataset(tmp_path)
    with pytest.raises(DatasetError, match="broken.png"):
        api.extract(
            f"imagefolder:{root}", model="fsl-tiny-rn", pretrained="none", cache_dir=tmp_path / "c", **FEW
        )
    assert not any((tmp_path / "c").rglob("manifest.json"))
    result = api.extract(
        f"imagefolder:{root}",
        model="fsl-tiny-rn",
        pretrained="none",
        cache_dir=tmp_path / "c",
        skip_bad=True,
        **FEW,
    )
    manifest = json.loads((result.store / "manifest.json").read_text())
    store = FeatureStore.open(result.store)
    paths = list(store.read("images/test/paths"))
    assert [paths[i] for i in manifest["skipped"]["test"]] == ["test/dog/broken.png"]
    assert manifest["skipped_paths"] == {"test": ["test/dog/broken.png"]} == result.skipped_paths


def test_conflicting_view_count_is_a_usage_error(rn_store, demo_root):
    with pytest.raises(UsageError, match="--views 11"):
        api.extract(
            f"imagefolder:{demo_root}",
            model="fsl-tiny-rn",
            pretrained="none",
            cache_dir=rn_store.store.parents[1],
            for_methods=["tip_adapter"],
            views=5,
            **FEW,
        )


def test_lite_taps_are_pooled_maps_and_token_means(demo_root, tmp_path):
    rn = api.extract(
        f"imagefolder:{demo_root}",
        model="fsl-tiny-rn",
        pretrained="none",
        cache_dir=tmp_path,
        for_methods=["ldc", "ldc_lite"],
        views=2,
        **FEW,
    )
    store = FeatureStore.open(rn.store)
    full = torch.from_numpy(store.read("images/test/views/center/rn/layer1")).float()[:, 0]
    lite = torch.from_numpy(store.read("images/test/views/center/rn/layer1_pool7")).float()[:, 0]
    assert lite.shape[-2:] == (2, 2)  # tiny RN layer4 grid
    torch.testing.assert_close(lite, torch.nn.functional.avg_pool2d(full, 8), atol=2e-3, rtol=2e-3)
    vit = api.extract(
        f"imagefolder:{demo_root}",
        model="fsl-tiny-vit",
        pretrained="none",
        cache_dir=tmp_path,
        for_methods=["ldc", "ldc_lite"],
        views=2,
        **FEW,
    )
    store = FeatureStore.open(vit.store)
    tokens = torch.from_numpy(store.read("images/test/views/center/vit/block06")).float()[:, 0]
    means = torch.from_numpy(store.read("images/test/views/center/vit/block06_mean")).float()[:, 0]
    torch.testing.assert_close(means, tokens.mean(dim=1), atol=2e-3, rtol=2e-3)


def test_string_arrays_have_their_size(rn_store):
    manifest = json.loads((rn_store.store / "manifest.json").read_text())
    paths = manifest["arrays"]["images/test/paths"]
    values = _read_all(rn_store.store)["images/test/paths"]
    assert paths["bytes"] == sum(len(str(v).encode()) for v in values) > 0  # was 0 B
