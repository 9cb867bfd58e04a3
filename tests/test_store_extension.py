"""``fit`` and ``grid`` extend the stores they read: exactly the missing arrays, existing ones untouched."""

from __future__ import annotations

import json
import shutil

import pytest
from click.testing import CliRunner
from dataset_helpers import write_images

from fsl_cache import api
from fsl_cache.cli import main
from fsl_cache.errors import StoreError, UsageError

pytestmark = pytest.mark.usefixtures("one_thread")
TINY = dict(model="fsl-tiny-rn", pretrained="none")
SAFE_QUICK = ("-o", "iterations=4", "-o", "lrs=1e-4", "-o", "wds=0", "-o", "eval_every=2", "-o", "warmup=1")


def manifest(cache) -> dict:
    (path,) = cache.glob("*/*/manifest.json")
    return json.loads(path.read_text())


def blocks(cache) -> dict:
    return {name: a["blocks"] for name, a in manifest(cache)["arrays"].items()}


def cli(*args: str):
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def test_fit_extends_the_store_then_again_without_touching_what_it_holds(tmp_path):
    data, cache, runs = write_images(tmp_path / "d"), tmp_path / "c", tmp_path / "r"
    api.extract(f"imagefolder:{data}", cache_dir=cache, shots=(1, 2, 4), progress=False, **TINY)
    defaults = blocks(cache)
    base = ["--dataset", f"imagefolder:{data}", "--model", "fsl-tiny-rn", "--pretrained", "none"]
    base += ["--shots", "4", "--seed", "1", "--cache-dir", str(cache), "--runs-dir", str(runs)]

    refused = cli("fit", "ldc", *base, "--no-extract")
    assert refused.exit_code == 1 and "lacks images/test/views/center/rn/layer1" in refused.stderr
    assert "Add it with: fsl-cache extract" in refused.stderr and "--for ldc --shots 1,2,4" in refused.stderr
    assert blocks(cache) == defaults

    ldc = cli("fit", "ldc", *base, "--yes", "-o", "epochs=1")
    assert ldc.exit_code == 0, ldc.stderr
    assert "to write" in ldc.stderr and "train_pool/ldc" in ldc.stderr  # the extract plan table
    with_ldc = blocks(cache)
    assert {n: with_ldc[n] for n in defaults} == defaults
    assert (
        "images/train_pool/views/ldc/rn/layer1" in with_ldc
        and "images/test/views/center/rn/layer4" in with_ldc
    )

    safe = cli("fit", "safe", *base, *SAFE_QUICK)
    assert safe.exit_code == 0, safe.stderr
    with_safe = blocks(cache)
    assert {n: with_safe[n] for n in with_ldc} == with_ldc
    assert "images/train_pool/views/flip/rn/layer4" in with_safe
    assert api.cache_verify(manifest(cache)["fingerprint"][:16], cache_dir=cache) == []
    again = cli("fit", "safe", *base, *SAFE_QUICK)  # nothing left to add: no plan, the run is reused
    assert again.exit_code == 0 and "to write" not in again.stderr and "reused" in again.stdout + again.stderr


def test_heavy_maps_need_yes_or_a_yes_at_the_prompt(tmp_path, monkeypatch):
    monkeypatch.setattr("fsl_cache.store_extension.CONFIRM_EXTRACT_BYTES", 0)
    data, cache = write_images(tmp_path / "d"), tmp_path / "c"
    kwargs = dict(
        dataset=f"imagefolder:{data}", shots=1, seeds=[1], cache_dir=cache, runs_dir=tmp_path / "r", **TINY
    )
    with pytest.raises(UsageError, match="Not extracting .* of feature maps.*pass --yes"):
        api.fit("safe", progress=False, **kwargs)  # a new store: created with what safe reads
    asked = []
    with pytest.raises(UsageError, match="pass --yes"):
        api.fit("safe", confirm=lambda q: asked.append(q) or False, progress=False, **kwargs)
    assert asked and "feature maps" in asked[0]
    assert not list(cache.glob("*/*/manifest.json"))  # refused before anything was written
    quick = {"iterations": 4, "lrs": "1e-4", "wds": "0", "eval_every": 2, "warmup": 1}
    (run,) = api.fit("safe", confirm=lambda q: True, options=quick, progress=False, **kwargs)
    assert run.test_acc >= 0 and "images/test/views/center/rn/layer4" in manifest(cache)["arrays"]


def test_without_the_images_the_refusal_stays_and_says_why(tmp_path):
    data, cache = write_images(tmp_path / "d"), tmp_path / "c"
    api.extract(f"imagefolder:{data}", cache_dir=cache, shots=(1,), progress=False, **TINY)
    shutil.rmtree(data)  # the store stays, the images are gone
    with pytest.raises(StoreError, match=r"lacks .*Add it with: fsl-cache extract .*fit cannot add it here"):
        api.fit(
            "ldc",
            dataset=f"imagefolder:{data}",
            shots=1,
            seeds=[1],
            cache_dir=cache,
            runs_dir=tmp_path / "r",
            progress=False,
            **TINY,
        )


def test_grid_extends_each_store_once_before_the_workers(tmp_path):
    data, cache = write_images(tmp_path / "d"), tmp_path / "c"
    api.extract(f"imagefolder:{data}", cache_dir=cache, shots=(1,), progress=False, **TINY)
    result = api.grid(
        ["zero_shot", "ldc"],
        datasets=[f"imagefolder:{data}"],
        shots=[1],
        seeds=[1],
        options={"ldc.epochs": [1]},
        cache_dir=cache,
        runs_dir=tmp_path / "r",
        **TINY,
    )
    assert result.count("done") == 2 and result.count("failed") == 0
    assert "images/train_pool/views/ldc/rn/layer2" in manifest(cache)["arrays"]
