"""``predict``: image files through the store's preprocessing and backbone give the cached evaluation's logits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from fsl_cache import api
from fsl_cache.cli import main
from fsl_cache.errors import BackboneError, StoreError
from fsl_cache.evaluation import protocol
from fsl_cache.evaluation.predict import predict as cached_predict
from fsl_cache.inference import Predictor, load_bundle
from fsl_cache.store.store import FeatureStore
from fsl_cache.training.data import open_views

TINY = dict(model="fsl-tiny-rn", pretrained="none")
FAST_SAFE = {"iterations": 10, "lrs": "1e-4", "wds": "0", "eval_every": 5, "warmup": 2}
METHODS = {
    "zero_shot": {},
    "linear_probe": {"search_steps": 1},
    "tip_adapter": {},
    "safe": FAST_SAFE,
    "tip_adapter_f": {"epochs": 2},
    "clip_adapter": {"epochs": 2},
    "coop": {"epochs": 1},
    "ldc": {"epochs": 1},
    "safe_a": {**FAST_SAFE, "tip_epochs": 1},
}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from fsl_cache.datasets import make_demo_dataset

    root = tmp_path_factory.mktemp("predict")
    data = make_demo_dataset(root / "data")
    result = api.extract(
        f"imagefolder:{data}",
        cache_dir=root / "cache",
        for_methods=list(METHODS),
        shots=(2,),
        seeds=(1,),
        workers=0,
        progress=False,
        **TINY,
    )
    return root, data, result.store


def fit(demo, method: str) -> Path:
    root, data, _ = demo
    (run,) = api.fit(
        method,
        dataset=f"imagefolder:{data}",
        shots=2,
        seeds=[1],
        options=METHODS[method],
        cache_dir=root / "cache",
        runs_dir=root / "runs",
        progress=False,
        **TINY,
    )
    return run.run_dir


def cached_logits(store_dir: Path, head, inputs) -> tuple[torch.Tensor, list[str]]:
    store = FeatureStore.open(store_dir)
    try:
        split = protocol.test_split(store)
        logits = cached_predict(head, open_views(store, split, policy="center", taps=tuple(inputs)))["main"]
        return logits, list(store.read("images/test/paths")[split.rows])
    finally:
        store.close()


@pytest.mark.parametrize("method", list(METHODS))
def test_predict_on_images_gives_the_cached_evaluation_logits(demo, method):
    _, data, store_dir = demo
    predictor = Predictor.load(fit(demo, method))
    cached, paths = cached_logits(store_dir, predictor.head, predictor.bundle.inputs)
    live = predictor.logits([data / p for p in paths[:25]])["main"]
    assert torch.allclose(live, cached[:25], atol=1e-4, rtol=1e-4)
    assert torch.equal(live.argmax(dim=1), cached[:25].argmax(dim=1))
    record = json.loads((predictor.bundle.source / "record.json").read_text())
    full = predictor.logits([data / p for p in paths])["main"]
    labels = torch.tensor(record["metrics"]["test"]["main"]["confusion"]).sum(dim=1)
    assert len(full) == int(labels.sum())  # every test image


def test_heavy_taps_come_from_the_backbone(demo):
    predictor = Predictor.load(fit(demo, "safe"))
    assert predictor.bundle.inputs == ("rn/layer4",)
    x = predictor.features([next((demo[1] / "test").glob("*/*.png"))])
    assert x["rn/layer4"].shape[1:] == tuple(predictor.bundle.meta["tap_shapes"]["rn/layer4"])


def test_a_backbone_with_other_weights_is_refused(demo):
    bundle = load_bundle(fit(demo, "zero_shot"))
    parts = bundle.meta["backbone"]["fingerprint_parts"]
    parts["weights"] = (
        {**parts["weights"], "sha256": "0" * 64} if isinstance(parts["weights"], dict) else "other"
    )
    with pytest.raises(BackboneError, match="differs from the one the store was built with"):
        Predictor(bundle).predict([next((demo[1] / "test").glob("*/*.png"))])


def test_cli_predict_json_top_k(demo):
    run = fit(demo, "tip_adapter")
    images = sorted((demo[1] / "test" / "red_circle").glob("*.png"))[:2]
    result = CliRunner().invoke(main, ["predict", str(run), *map(str, images), "--top-k", "3", "--json"])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["image"] for line in lines] == [str(p) for p in images]
    for line in lines:
        probs = [t["prob"] for t in line["top"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True) and sum(probs) <= 1.0 + 1e-6
    key = json.loads((run / "record.json").read_text())["run_fingerprint"][:12]
    by_key = CliRunner().invoke(main, ["predict", key, str(images[0]), "--runs-dir", str(demo[0] / "runs")])
    assert by_key.exit_code == 0 and "%" in by_key.stdout
    missing = CliRunner().invoke(main, ["predict", str(run), str(demo[0] / "nope.png")])
    assert missing.exit_code != 0 and "nope.png" in missing.output


def test_a_run_whose_store_is_gone_points_to_export(demo, tmp_path):
    run = fit(demo, "zero_shot")
    moved = tmp_path / "run"
    shutil.copytree(run, moved)
    record = json.loads((moved / "record.json").read_text())
    record["store"]["path"] = str(tmp_path / "gone")
    (moved / "record.json").write_text(json.dumps(record))
    with pytest.raises(StoreError, match="fsl-cache export"):
        Predictor.load(moved)
