"""Smaller stores (issue 18): a train pool of one seed's picks with 5 LDC views, and the run record that says so."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from fsl_cache import api
from fsl_cache.cli import main
from fsl_cache.datasets.shapes import make_shapes_dataset

pytestmark = pytest.mark.usefixtures("one_thread")

SHOTS = 2


@pytest.fixture(scope="module")
def small(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("small")
    data = make_shapes_dataset(root / "data", counts={"train": 4, "val": 2, "test": 4})
    where = dict(
        dataset=f"imagefolder:{data}", model="fsl-tiny-rn", pretrained="shapes", cache_dir=root / "cache"
    )
    api.extract(
        **where, for_methods=("ldc",), shots=(SHOTS,), seeds=(1,), views={"ldc": 5}, workers=0, progress=False
    )
    return {**where, "runs_dir": root / "runs"}


def test_one_seed_store_fits_that_seed_and_refuses_another_in_one_line(small):
    (run,) = api.fit("ldc", shots=SHOTS, seeds=(1,), options={"epochs": 1}, progress=False, **small)
    store = json.loads((run.run_dir / "record.json").read_text())["store"]
    assert store["few_shot"] == {"shots": [SHOTS], "seeds": [1]} and store["views"] == {"ldc": 5}
    args = ["fit", "ldc", "--shots", str(SHOTS), "--seed", "2", "-o", "epochs=1"]
    for key in ("dataset", "model", "pretrained", "cache_dir", "runs_dir"):
        args += [f"--{key.replace('_', '-')}", str(small[key])]
    result = CliRunner().invoke(main, args)
    (line,) = result.output.strip().splitlines()
    assert result.exit_code == 2 and "seed=2" in line
    command = line.split("that has them: ")[1]
    assert command.startswith("fsl-cache extract") and "--seeds 1,2 --views ldc=5" in command
    assert f"--shots {SHOTS}" in command and "--for ldc" in command
