"""``--protocol domain_shift``: train on ImageNet, test the same head on -V2, -Sketch, -A and -R.

The datasets are small generated folders laid out as CoOp lays out ImageNet and its shift sets.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from fsl_cache import api
from fsl_cache.errors import UsageError
from fsl_cache.reports import format_report
from fsl_cache.runs.request import FitRequest
from fsl_cache.runs.shift import open_targets
from fsl_cache.splits import shift_classes
from fsl_cache.store.store import FeatureStore

pytestmark = pytest.mark.usefixtures("one_thread")
WNIDS = {
    "n01440764": "tench",
    "n01443537": "goldfish",
    "n01484850": "great white shark",
    "n01491361": "tiger shark",
}
SUBSET = {"imagenet_a": [1, 3], "imagenet_r": [0, 2]}
"""ImageNet labels of the classes each 200-class-like subset holds (its folders)."""
TINY = dict(model="fsl-tiny-rn", pretrained="none")


def _images(folder, label: int, n: int, rng, suffix: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        pixels = rng.random((64, 64, 3)) * 80 + np.array([60 * label, 100, 200 - 60 * label])
        Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i}{suffix}", format="PNG")


def make_imagenet_family(root):
    """imagenet (train 6/class: 3 held out as val), imagenetv2, imagenet-sketch, -adversarial, -rendition."""
    rng = np.random.default_rng(0)
    names = "".join(f"{w} {n}\n" for w, n in WNIDS.items())
    wnids = list(WNIDS)
    sets = {
        ("imagenet", "images/train"): (range(4), 6),
        ("imagenet", "images/val"): (range(4), 2),
        ("imagenet-sketch", "images"): (range(4), 2),
        ("imagenet-adversarial", "imagenet-a"): (SUBSET["imagenet_a"], 2),
        ("imagenet-rendition", "imagenet-r"): (SUBSET["imagenet_r"], 2),
    }
    for (folder, images), (labels, n) in sets.items():
        (root / folder).mkdir(parents=True, exist_ok=True)
        (root / folder / "classnames.txt").write_text(names)
        for label in labels:
            _images(root / folder / images / wnids[label], label, n, rng, ".JPEG")
    (root / "imagenetv2").mkdir()
    (root / "imagenetv2" / "classnames.txt").write_text(names)
    for label in range(4):
        _images(
            root / "imagenetv2" / "imagenetv2-matched-frequency-format-val" / str(label),
            label,
            2,
            rng,
            ".jpeg",
        )
    return root


@pytest.fixture(scope="module")
def family(tmp_path_factory):
    root = make_imagenet_family(tmp_path_factory.mktemp("data"))
    cache, runs = tmp_path_factory.mktemp("cache"), tmp_path_factory.mktemp("runs")
    return root, cache, runs


def fit(method, family, **kwargs):
    root, cache, runs = family
    return api.fit(
        method,
        dataset="imagenet",
        root=root,
        shots=1,
        seeds=[1],
        cache_dir=cache,
        runs_dir=runs,
        progress=False,
        **TINY,
        **kwargs,
    )


def test_class_subsets_map_onto_the_source_classes():
    source = tuple(WNIDS.values())
    assert shift_classes(source, ("goldfish", "tiger shark"), target_name="imagenet_a").tolist() == [1, 3]
    assert shift_classes(source, source, target_name="imagenet_v2").tolist() == [0, 1, 2, 3]
    with pytest.raises(UsageError, match="'carp' is not among"):
        shift_classes(source, ("carp",), target_name="imagenet_a")


def test_domain_shift_reports_one_accuracy_per_target_through_the_class_subsets(family):
    root, cache, runs = family
    (run,) = fit("zero_shot", family, protocol="domain_shift")  # creates all five stores
    record = json.loads((run.run_dir / "record.json").read_text())
    targets = record["metrics"]["targets"]
    assert record["targets"] == ["imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r"]
    assert [targets[t]["classes"] for t in record["targets"]] == [4, 4, 2, 2]
    assert "domain shift" in record["protocol_notes"]

    # pinned: A and R are scored on the source logits of their own classes, in their label order
    request = FitRequest(
        "zero_shot", "imagenet", 1, protocol="domain_shift", cache_dir=cache, **TINY
    ).checked()
    source = FeatureStore.open(next(cache.glob("imagenet/*")))
    opened = {t.dataset: t for t in open_targets(request, source)}
    text = torch.from_numpy(source.read("text/tip")).float()
    for name, subset in SUBSET.items():
        assert opened[name].classes.tolist() == subset
        store = opened[name].store
        f = torch.nn.functional.normalize(
            torch.from_numpy(store.read("images/test/views/center/pooled")[:, 0]).float(),
            dim=-1,  # view 0
        )
        logits = 100.0 * f @ text.T  # [N, 4] over the source classes
        expected = (
            (logits[:, subset].argmax(1) == torch.from_numpy(store.read("images/test/labels"))).float().mean()
        )
        assert targets[name]["test_acc"] == pytest.approx(100.0 * float(expected))

    table, _, _ = api.report(runs_dir=runs, protocols=["domain_shift"])
    text_report = format_report(table, "markdown")
    assert "Domain shift from imagenet, 1-shot" in text_report
    assert (
        "| method | validation | imagenet (source) | imagenet_v2 | imagenet_sketch | imagenet_a | imagenet_r |"
        in text_report
    )
    cells = [json.loads(line) for line in format_report(table, "json").splitlines()]
    assert {c["dataset"] for c in cells if c.get("source") == "imagenet"} == {"imagenet", *targets}


def test_ldc_searches_beta_on_few_shot_val_under_domain_shift_and_on_imagenet_test_under_paper(family):
    (shift,) = fit("ldc", family, protocol="domain_shift", yes=True, options={"epochs": 1})
    (paper,) = fit("ldc", family, protocol="paper", targets=["imagenet_a"], options={"epochs": 1})
    shift_record = json.loads((shift.run_dir / "record.json").read_text())
    paper_record = json.loads((paper.run_dir / "record.json").read_text())
    assert (
        shift_record["selection"]["search_on"] == "val" and paper_record["selection"]["search_on"] == "test"
    )
    assert list(paper_record["metrics"]["targets"]) == ["imagenet_a"]
    assert shift_record["logit_scale"] == {
        "value": 100.0,
        "from": "100 (random weights or a tiny test model)",
    }
    with pytest.raises(UsageError, match="--targets needs --protocol domain_shift"):
        fit("ldc", family, targets=["imagenet_a"])
