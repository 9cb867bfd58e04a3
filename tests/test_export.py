"""``export``: a self-contained folder that ``predict`` (and the README's snippet) load without the cache."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from fsl_cache import api
from fsl_cache.cli import main
from fsl_cache.errors import UsageError
from fsl_cache.inference import Predictor

TINY = dict(model="fsl-tiny-rn", pretrained="none")
README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from fsl_cache.datasets import make_demo_dataset

    root = tmp_path_factory.mktemp("export")
    data = make_demo_dataset(root / "data")
    api.extract(
        f"imagefolder:{data}",
        cache_dir=root / "cache",
        for_methods=["tip_adapter"],
        shots=(2,),
        seeds=(1,),
        workers=0,
        progress=False,
        **TINY,
    )
    (result,) = api.fit(
        "tip_adapter",
        dataset=f"imagefolder:{data}",
        shots=2,
        seeds=[1],
        cache_dir=root / "cache",
        runs_dir=root / "runs",
        progress=False,
        **TINY,
    )
    return root, data, result.run_dir


def test_export_then_predict_round_trips_without_the_cache(run, tmp_path):
    root, data, run_dir = run
    images = sorted((data / "test").glob("*/*.png"))[::10]
    before = Predictor.load(run_dir).logits(images)["main"]
    out = api.export(run_dir, tmp_path / "head")
    assert {p.name for p in out.iterdir()} == {
        "bundle.json",
        "head.safetensors",
        "text.safetensors",
        "record.json",
    }
    meta = json.loads((out / "bundle.json").read_text())
    assert meta["method"] == "tip_adapter" and meta["classnames"][0] == "blue square"  # sorted folders
    assert meta["backbone"]["arch"] == "fsl-tiny-rn" and meta["backbone"]["preprocess_cfg"]["size"]
    assert meta["templates"] and meta["config"]["search_steps"]
    (root / "cache").rename(root / "cache-away")  # no cache: the export alone must do
    try:
        after = Predictor.load(out).logits(images)["main"]
        result = CliRunner().invoke(main, ["predict", str(out), str(images[0]), "--json"])
    finally:
        (root / "cache-away").rename(root / "cache")
    assert torch.equal(before, after)
    assert result.exit_code == 0 and json.loads(result.stdout)["top"][0]["class"] in meta["classnames"]


def test_export_refuses_a_non_empty_folder_and_leaves_nothing_half_written(run, tmp_path):
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "x").write_text("x")
    with pytest.raises(UsageError, match="not empty"):
        api.export(run[2], tmp_path / "taken")
    result = CliRunner().invoke(main, ["export", str(run[2]), str(tmp_path / "fresh")])
    assert result.exit_code == 0 and result.stdout.strip() == str(tmp_path / "fresh")
    assert not list(tmp_path.glob("*.incomplete"))


def test_the_readme_snippet_loads_an_export(run, tmp_path):
    snippet = next(
        block
        for block in re.findall(r"```python\n(.*?)```", README.read_text(), re.S)
        if "Predictor.load" in block
    )
    out = api.export(run[2], tmp_path / "my_export")
    image = next((run[1] / "test").glob("*/*.png"))
    code = snippet.replace('"my_export"', repr(str(out))).replace('"cat.png"', repr(str(image)))
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["predictions"][0].top and scope["logits"]["main"].shape == (1, 5)
