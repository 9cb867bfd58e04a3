"""The shapes world (rendering, captions, held-out datasets) and the shipped ``--pretrained shapes`` weights."""

from __future__ import annotations

import random
from pathlib import Path

import open_clip
import pytest
import torch

from fsl_cache.backbones import load_backbone
from fsl_cache.backbones.tiny import SHAPES_TAG, shapes_weights_path
from fsl_cache.backbones.train_tiny import TrainConfig, encode_text_prefix, save_weights, train
from fsl_cache.backbones.weights import file_sha256
from fsl_cache.datasets import load_dataset
from fsl_cache.datasets.shapes import (
    DEMO_SHIFT,
    SHAPES,
    TEXTURES,
    Shift,
    caption,
    dataset_classes,
    make_shapes_dataset,
    render,
    sample_scenes,
    with_article,
)
from fsl_cache.errors import UsageError

pytestmark = pytest.mark.usefixtures("one_thread")

SHIPPED = ("fsl-tiny-rn", "fsl-tiny-vit")
"""Tiny architectures whose ``shapes`` weights ship."""


def test_rendering_is_deterministic_in_the_generator():
    def draw(seed: int, world: Shift) -> torch.Tensor:
        gen = torch.Generator().manual_seed(seed)
        return render(sample_scenes(6, generator=gen, world=world), generator=gen, world=world)

    first = draw(0, DEMO_SHIFT)
    assert first.shape == (6, 3, 64, 64) and 0 <= first.min() and first.max() <= 1
    assert torch.equal(first, draw(0, DEMO_SHIFT))
    assert not torch.equal(first, draw(1, DEMO_SHIFT))


def test_each_shape_and_texture_paints_differently():
    gen = torch.Generator().manual_seed(0)
    scenes = sample_scenes(len(SHAPES) * len(TEXTURES), generator=gen)
    grid = torch.cartesian_prod(torch.arange(len(SHAPES)), torch.arange(len(TEXTURES)))
    n = len(grid)
    scenes = type(scenes)(grid[:, 0], torch.zeros(n, dtype=torch.long), grid[:, 1], torch.ones(n, dtype=torch.long),
                          torch.full((n,), 4), torch.full((n,), 4))  # fmt: skip
    images = render(scenes, generator=torch.Generator().manual_seed(0), world=Shift(noise=0.0))
    flat = images.flatten(1)
    distances = torch.cdist(flat, flat) + torch.eye(n) * 1e9
    assert distances.min() > 1.0  # no two (shape, texture) pairs render alike


def test_captions_name_the_shape_and_use_articles():
    gen = torch.Generator().manual_seed(0)
    scenes = sample_scenes(50, generator=gen)
    rng = random.Random(0)
    for i in range(50):
        text = caption(scenes, i, rng=rng)
        assert SHAPES[scenes.shape[i]] in text and " a orange" not in text and " an red" not in text
    assert with_article("a photo of a orange dotted circle") == "a photo of an orange dotted circle"


def test_unknown_background_is_refused():
    with pytest.raises(UsageError, match="Unknown background"):
        Shift(backgrounds=("moon",))


def test_shapes_dataset_layout_and_determinism(tmp_path):
    counts = {"train": 2, "val": 1, "test": 1}
    folder = make_shapes_dataset(tmp_path / "a", counts=counts)
    spec = load_dataset(f"imagefolder:{folder}")
    assert spec.classnames == tuple(dataset_classes().values())
    assert len(spec.splits["train"]) == 2 * len(spec.classnames) and len(spec.splits["test"]) == len(
        spec.classnames
    )
    for path, label in spec.splits["train"]:  # each image's folder carries its class's name
        assert dataset_classes()[Path(path).parent.name] == spec.classnames[label]
    assert make_shapes_dataset(tmp_path / "a", counts=counts) == folder  # idempotent
    again = make_shapes_dataset(tmp_path / "b", counts=counts)
    png = "train/red_striped/001.png"
    assert (folder / png).read_bytes() == (again / png).read_bytes()
    with pytest.raises(UsageError, match="another shapes dataset"):
        make_shapes_dataset(tmp_path / "a", counts=counts, seed=1)


def test_prefix_text_encoding_equals_encode_text():
    model = open_clip.create_model("fsl-tiny-rn", pretrained=None)
    tokens = open_clip.get_tokenizer("fsl-tiny-rn")(
        ["a red circle", "a photo of a small dotted square on sand"]
    )
    assert torch.allclose(encode_text_prefix(model, tokens), model.encode_text(tokens), atol=1e-5)


def test_training_step_and_saved_file_load_as_weights(tmp_path):
    model, stats = train(TrainConfig(steps=2, batch_size=8, warmup=1), log_every=0)
    assert stats["final_loss"] > 0
    path = tmp_path / "w.safetensors"
    save_weights(model, path)
    backbone = load_backbone("fsl-tiny-rn", str(path))
    assert backbone.fingerprint_parts()["weights"]["sha256"] == file_sha256(path)


@pytest.mark.parametrize("arch", SHIPPED)
def test_shipped_shapes_weights_load_offline_and_are_announced(arch):
    path = shapes_weights_path(arch)
    assert path.is_file() and path.stat().st_size <= 10_000_000
    backbone = load_backbone(arch, SHAPES_TAG)
    weights = backbone.fingerprint_parts()["weights"]
    assert weights == {"source": "tag", "sha256": file_sha256(path), "tag": SHAPES_TAG}
    assert not backbone.random_init
    assert any("synthetic world" in note for note in backbone.notes)
    assert not any("RANDOM" in note for note in backbone.notes)


def test_the_vit_shapes_weights_know_something_and_adapt(tmp_path):
    """fsl-tiny-vit ``shapes`` (weaker than the RN, see README): zero-shot well above chance on the shifted
    12-class set, and the cached-feature methods that adapt most on it beat zero-shot at 4 shots."""
    from fsl_cache import api

    data = make_shapes_dataset(tmp_path / "data", counts={"train": 4, "val": 4, "test": 20})
    where = dict(
        dataset=f"imagefolder:{data}",
        model="fsl-tiny-vit",
        pretrained=SHAPES_TAG,
        cache_dir=tmp_path / "cache",
    )
    methods = ("zero_shot", "gda", "clap")
    api.extract(**where, for_methods=methods, shots=(4,), seeds=(1,), workers=0, progress=False)
    acc = {
        m: api.fit(m, shots=4, seeds=(1,), runs_dir=tmp_path / "runs", progress=False, **where)[0].test_acc
        for m in methods
    }
    assert 2 * 100 / 12 < acc["zero_shot"] < 60
    assert acc["gda"] >= acc["zero_shot"] + 8 and acc["clap"] >= acc["zero_shot"] + 8, acc
