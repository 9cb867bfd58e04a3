"""``predict``: image files through the store's preprocessing and backbone give the cached evaluation's logits."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from fsl_cache import api
from fsl_cache.cli import main
from fsl_cache.errors import BackboneError, StoreError
from fsl_cache.evaluation.scoring import predict as cached_predict
from fsl_cache.inference import Predictor, load_bundle
from fsl_cache.methods import get_method, list_methods
from fsl_cache.splits import protocol
from fsl_cache.store.store import FeatureStore
from fsl_cache.training.data import open_views

TINY = dict(model="fsl-tiny-rn", pretrained="none")
METHODS = list_methods()
"""Every registered method: its ``quick`` options keep each fit to seconds."""


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    from fsl_cache.datasets import make_demo_dataset

    root = tmp_path_factory.mktemp("predict")
    data = make_demo_dataset(root / "data")
    result = api.extract(
        f"imagefolder:{data}",
        cache_dir=root / "cache",
        for_methods=METHODS,
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
        options=get_method(method).cls.quick,
        cache_dir=root / "cache",
        runs_dir=root / "runs",
        progress=False,
        **TINY,
    )
    return run.run_dir


def cached_logits(store_dir: Path, head, inputs) -> tuple[dict[str, torch.Tensor], list[str], torch.Tensor]:
    """The head's logits on the store's test split, its image paths and labels."""
    store = FeatureStore.open(store_dir)
    try:
        split = protocol.test_split(store)
        logits = cached_predict(head, open_views(store, split, policy="center", taps=tuple(inputs)))
        return logits, list(store.read("images/test/paths")[split.rows]), split.labels
    finally:
        store.close()


@pytest.mark.parametrize("method", METHODS)
def test_every_method_round_trips_export_and_predict_to_its_cached_evaluation(demo, method, tmp_path):
    """The rebuilt head scores the cached test split exactly as the run recorded it, and on the image files
    (from the run folder and from an export) gives the cached logits."""
    _, data, store_dir = demo
    run = fit(demo, method)
    predictor = Predictor.load(run)
    record = json.loads((run / "record.json").read_text())
    headline = record["metrics"]["headline"]
    cached_all, paths, test_labels = cached_logits(store_dir, predictor.head, predictor.bundle.inputs)
    cached = cached_all[headline]
    labels = torch.tensor(record["metrics"]["test"][headline]["confusion"]).sum(dim=1)
    assert len(cached) == int(labels.sum())  # every test image
    top1 = 100.0 * (cached.argmax(dim=1) == test_labels).double().mean().item()  # records hold percent
    assert top1 == pytest.approx(record["metrics"]["test"][headline]["top1"], abs=1e-6)
    images = [data / p for p in paths[:25]]
    exported = Predictor.load(api.export(run, tmp_path / "export"))
    for live in (predictor.logits(images)[headline], exported.logits(images)[headline]):
        assert torch.allclose(live, cached[:25], atol=1e-4, rtol=1e-4)
        assert torch.equal(live.argmax(dim=1), cached[:25].argmax(dim=1))


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


def test_predict_imports_only_what_the_head_needs(demo):
    """Start-up time: the CLI and ``api`` import no torch; ``predict`` on an image loads the backbone and the
    head's own method, never extraction, sweeps, reports, other methods, plotting or scikit-learn."""
    run = fit(demo, "tip_adapter")
    image = next((demo[1] / "test").glob("*/*.png"))
    code = f"""
import sys
from fsl_cache import api
from fsl_cache.cli import main
print("before:", sorted(m for m in ("torch", "open_clip", "numpy") if m in sys.modules))
main(["predict", {str(run)!r}, {str(image)!r}], standalone_mode=False)
stage_one = ("fsl_cache.extraction", "fsl_cache.sweeps", "fsl_cache.reports", "fsl_cache.store_extension")
head = {{"base", "needs", "options", "registry", "tip_adapter"}}
extra = [
    m for m in sys.modules
    if m.startswith(stage_one)
    or m.split(".")[0] in ("sklearn", "matplotlib", "optuna", "ray")
    or (m.startswith("fsl_cache.methods.") and m.split(".")[2] not in head)
]
print("after:", sorted(extra), "open_clip" in sys.modules)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    lines = [line for line in out.splitlines() if line.startswith(("before:", "after:"))]
    assert lines == ["before: []", "after: [] True"], out
