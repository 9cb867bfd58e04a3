"""Smaller stores (issue 18): a train pool of one seed's picks with 5 LDC views, int8 dense maps, and the
run records that say so."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest
import zarr
from click.testing import CliRunner

from fsl_cache import api
from fsl_cache.cli import main
from fsl_cache.datasets.shapes import make_shapes_dataset
from fsl_cache.errors import UsageError
from fsl_cache.store.catalog import verify_store
from fsl_cache.store.quantise import Dequantised, quantise, scale_name, scale_shape
from fsl_cache.store.reads import read_rows_of_view
from fsl_cache.store.store import FeatureStore

pytestmark = pytest.mark.usefixtures("one_thread")

SHOTS = 2
STORE = dict(for_methods=("ldc",), shots=(SHOTS,), seeds=(1,), views={"ldc": 5}, workers=0, progress=False)
"""``extract --for ldc --shots 2 --seeds 1 --views ldc=5``"""


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("small")
    data = make_shapes_dataset(root / "data", counts={"train": 4, "val": 2, "test": 4})
    where = dict(
        dataset=f"imagefolder:{data}", model="fsl-tiny-rn", pretrained="shapes", cache_dir=root / "cache"
    )
    api.extract(**where, **STORE)
    return where


def _fit(where: dict) -> dict:
    (run,) = api.fit(
        "ldc",
        shots=SHOTS,
        seeds=(1,),
        options={"epochs": 1},
        runs_dir=where["cache_dir"].parent / "runs",
        progress=False,
        **where,
    )
    return json.loads((run.run_dir / "record.json").read_text())


def test_one_seed_store_fits_that_seed_and_refuses_another_in_one_line(small):
    store = _fit(small)["store"]
    assert store["few_shot"] == {"shots": [SHOTS], "seeds": [1]} and store["views"] == {"ldc": 5}
    args = ["fit", "ldc", "--shots", str(SHOTS), "--seed", "2", "-o", "epochs=1"]
    for key in ("dataset", "model", "pretrained", "cache_dir"):
        args += [f"--{key.replace('_', '-')}", str(small[key])]
    result = CliRunner().invoke(main, args)
    (line,) = result.output.strip().splitlines()
    assert result.exit_code == 2 and "seed=2" in line
    command = line.split("that has them: ")[1]
    assert command.startswith("fsl-cache extract") and "--seeds 1,2 --views ldc=5" in command
    assert f"--shots {SHOTS}" in command and "--for ldc" in command


def test_int8_dense_maps_read_back_within_half_a_step_per_channel_and_fit(small):
    fp16 = api.extract(**small, **STORE).store  # nothing to add: the fixture's store
    beside = {**small, "cache_dir": small["cache_dir"].parent / "int8"}  # one store per cache: no --store
    int8 = api.extract(**beside, **STORE, dense_precision="int8").store
    assert int8.name.split("-")[-1] != fp16.name.split("-")[-1]  # another key
    exact, lossy = FeatureStore.open(fp16), FeatureStore.open(int8)
    maps = [n for n in exact.arrays if "/rn/layer" in n]
    assert sorted(lossy.quantised) == sorted(maps) and len(maps) == 16  # 4 layers x 4 view groups
    for name in maps:
        x, y = exact.read(name).astype(np.float32), lossy.read(name)
        assert y.dtype == np.float16 and lossy.arrays[name]["stored_dtype"] == "int8"
        scale = lossy.read(scale_name(name))  # [rows, views, C, 1, 1]: one per channel of each view
        np.testing.assert_allclose(scale, np.abs(x).max(axis=(3, 4), keepdims=True) / 127, rtol=1e-6)
        # half a quantisation step, plus fp16 rounding of the dequantised value
        assert (np.abs(y - x) <= scale / 2 + np.abs(x) * 2**-11 + 1e-7).all(), name
        assert lossy.arrays[name]["stored_bytes"] < 0.6 * exact.arrays[name]["stored_bytes"]
        rows = np.array([len(x) - 1, 0, len(x) - 1])  # scattered rows: zarr's orthogonal selection
        np.testing.assert_array_equal(lossy.read(name, rows), y[rows])
        np.testing.assert_array_equal(read_rows_of_view(lossy.array(name), rows, 0, name=name), y[rows, 0])
    assert verify_store(int8) == []  # digests are of the int8 codes written
    record = _fit(beside)
    assert (
        record["store"]["dense_precision"] == "int8" and record["store"]["fingerprint"] == lossy.fingerprint
    )
    assert any("int8" in w and "dequantised" in w for w in record["warnings"])


def test_grid_refuses_a_missing_seed_before_any_run(small):
    runs = small["cache_dir"].parent / "grid-runs"
    with pytest.raises(UsageError, match="seed=2; .*--seeds 1,2 --views ldc=5"):
        api.grid(
            ["ldc"],
            datasets=[small["dataset"]],
            shots=(SHOTS,),
            seeds=(1, 2),
            options={"epochs": [1]},
            model=small["model"],
            pretrained=small["pretrained"],
            cache_dir=small["cache_dir"],
            runs_dir=runs,
        )
    assert not list(runs.glob("**/record.json"))  # seed 1 was not fitted either


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_int8_vit_tokens_read_like_their_codes_in_both_formats(tmp_path, fmt):
    """ViT token maps keep one scale per channel (the last axis); zarr and h5py readers index them as usual."""
    x = np.random.default_rng(0).standard_normal((10, 3, 5, 8)).astype(np.float16)  # rows, views, tokens, C
    codes, scales = quantise(x, scale_shape("vit/block06", (5, 8)))
    assert scales.shape == (10, 3, 1, 8)
    if fmt == "zarr":
        stored = zarr.array(codes), zarr.array(scales)
    else:
        fh = h5py.File(tmp_path / "q.h5", "w")
        stored = fh.create_dataset("codes", data=codes), fh.create_dataset("scales", data=scales)
    arr = Dequantised(*stored, "float16")
    y = arr[...]
    assert y.dtype == np.float16 and (np.abs(y - x) <= scales / 2 + np.abs(x) * 2**-11 + 1e-7).all()
    rows = np.array([7, 2, 7])
    np.testing.assert_array_equal(read_rows_of_view(arr, rows, 1, name="codes"), y[rows, 1])
    np.testing.assert_array_equal(arr[2:4], y[2:4])
