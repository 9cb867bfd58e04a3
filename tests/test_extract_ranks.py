"""Two torchrun ranks (gloo, CPU) fill one store that equals the single-process store bit for bit."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

from fsl_cache.datasets import make_demo_dataset
from fsl_cache.store import FeatureStore, verify_store

ARGS = [
    "extract",
    "--model",
    "fsl-tiny-rn",
    "--pretrained",
    "none",
    "--for",
    "tip_adapter,safe",
    "--shots",
    "1,2,4",
    "--seeds",
    "1,2",
    "--workers",
    "0",
    "--batch-size",
    "16",
]


def _run(prefix: list[str], dataset: str, cache: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1]), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(
        prefix + ARGS + ["--dataset", dataset, "--cache-dir", str(cache)],
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]


def test_two_ranks_write_the_same_store_as_one(tmp_path):
    dataset = f"imagefolder:{make_demo_dataset(tmp_path / 'demo')}"
    _run([sys.executable, "-m", "fsl_cache"], dataset, tmp_path / "one")
    torchrun = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        # a free port of its own: another suite (or an xdist worker) may run a torchrun test at once
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "fsl_cache",
    ]
    _run(torchrun, dataset, tmp_path / "two")
    one = next((tmp_path / "one").rglob("manifest.json")).parent
    two = next((tmp_path / "two").rglob("manifest.json")).parent
    assert one.name == two.name
    a, b = FeatureStore.open(one), FeatureStore.open(two)
    assert a.arrays.keys() == b.arrays.keys()
    for name in a.arrays:
        np.testing.assert_array_equal(a.read(name), b.read(name), err_msg=name)
        assert a.arrays[name]["blocks"] == b.arrays[name]["blocks"], name
    assert verify_store(two) == []
    shard_owners = {p.stem for p in (two / "progress").glob("*/*.json")}
    assert len(shard_owners) > 1, "the work was split into several shards"
