"""Helpers for the dataset tests: where the shared reference data lives, fake CoOp layouts on disk,
small generated image folders.

Imported by ``tests/test_datasets*.py``, ``tests/test_shots.py`` and the fit tests that extract real
images (pytest puts ``tests/`` on ``sys.path`` because it has no ``__init__.py``).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def extract_argv(dataset: Path | str, cache: Path | str, *, model: str = "fsl-tiny-rn", **flags) -> list[str]:
    """``fsl-cache extract`` arguments on a random-weight tiny backbone, one ``--flag value`` per keyword
    (``batch_size=4`` gives ``--batch-size 4``, ``for_methods`` gives ``--for``); a path is an ``imagefolder:``."""
    spec = dataset if isinstance(dataset, str) else f"imagefolder:{dataset}"
    argv = ["extract", "--dataset", spec, "--model", model, "--pretrained", "none"]
    for name, value in flags.items():
        argv += ["--for" if name == "for_methods" else f"--{name.replace('_', '-')}", str(value)]
    return [*argv, "--cache-dir", str(cache)]


def shared_dir() -> Path:
    """``$FSL_SHARED`` or ``<repo>/../shared``; fails the test with a clear message when absent."""
    shared = Path(os.environ.get("FSL_SHARED", REPO.parent / "shared"))
    if not (shared / "data" / "coop_splits").is_dir():
        pytest.fail(
            f"Reference data not found at {shared}/data/coop_splits: set FSL_SHARED to the shared/ "
            "folder (CI keeps it at ../shared beside the repository)"
        )
    return shared


@dataclass(frozen=True)
class CoopCase:
    """A dataset whose real CoOp split file ships in shared/data/coop_splits."""

    name: str
    stem: str
    folder: str
    images: str
    num_classes: int
    sizes: tuple[int, int, int]
    """train, val, test (METHODS §1.4 table)."""
    some_classnames: tuple[str, ...]
    template: str


COOP_CASES = (
    CoopCase(
        "caltech101",
        "Caltech101",
        "caltech-101",
        "101_ObjectCategories",
        100,
        (4128, 1649, 2465),
        ("face", "leopard", "motorbike", "airplane"),
        "a photo of a {}.",
    ),
    CoopCase(
        "oxford_pets",
        "OxfordPets",
        "oxford_pets",
        "images",
        37,
        (2944, 736, 3669),
        ("abyssinian", "american bulldog"),
        "a photo of a {}, a type of pet.",
    ),
    CoopCase(
        "stanford_cars",
        "StanfordCars",
        "stanford_cars",
        ".",
        196,
        (6509, 1635, 8041),
        ("2012 Audi TTS Coupe",),
        "a photo of a {}.",
    ),
    CoopCase(
        "oxford_flowers",
        "OxfordFlowers",
        "oxford_flowers",
        "jpg",
        102,
        (4093, 1633, 2463),
        ("passion flower",),
        "a photo of a {}, a type of flower.",
    ),
    CoopCase(
        "dtd",
        "DescribableTextures",
        "dtd",
        "images",
        47,
        (2820, 1128, 1692),
        ("banded", "blotchy"),
        "{} texture.",
    ),
    CoopCase(
        "eurosat",
        "EuroSAT",
        "eurosat",
        "2750",
        10,
        (13500, 5400, 8100),
        (
            "Annual Crop Land",
            "Forest",
            "Herbaceous Vegetation Land",
            "Highway or Road",
            "Industrial Buildings",
            "Pasture Land",
            "Permanent Crop Land",
            "Residential Buildings",
            "River",
            "Sea or Lake",
        ),
        "a centered satellite photo of {}.",
    ),
    CoopCase(
        "ucf101",
        "UCF101",
        "ucf101",
        "UCF-101-midframes",
        101,
        (7639, 1898, 3783),
        ("Apply Eye Makeup",),
        "a photo of a person doing {}.",
    ),
)


def scratch_dir() -> str | None:
    """A RAM-backed folder for the ~86k empty files of the real-split tests, when there is one.

    Creating them takes 1-2 s on tmpfs but can take a minute on a busy shared disk.
    """
    shm = Path("/dev/shm")
    return str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None


def split_file(stem: str) -> Path:
    return shared_dir() / "data" / "coop_splits" / f"split_zhou_{stem}.json"


def touch_all(base: Path, relpaths: Iterable[str]) -> None:
    """Create empty files (enough for the loaders' existence check) at ``base/relpath``."""
    relpaths = list(relpaths)
    for parent in {(base / p).parent for p in relpaths}:
        parent.mkdir(parents=True, exist_ok=True)
    for rel in relpaths:  # os.open: a third of Path.touch's cost, which matters for 60k files
        os.close(os.open(base / rel, os.O_CREAT | os.O_WRONLY, 0o644))


def build_coop_layout(root: Path, case: CoopCase) -> Path:
    """ROOT/<folder>/ with the real split file and an empty file at every listed path."""
    folder = root / case.folder
    folder.mkdir(parents=True)
    source = split_file(case.stem)
    shutil.copyfile(source, folder / source.name)
    split = json.loads(source.read_text())
    touch_all(folder / case.images, {entry[0] for items in split.values() for entry in items})
    return folder


def write_split_json(folder: Path, stem: str, names: list[str], per_split: int = 1) -> Path:
    """A hand-made CoOp split file with ``per_split`` items per class and split."""
    split = {
        s: [[f"{n}/{s}_{i}.jpg", label, n] for label, n in enumerate(names) for i in range(per_split)]
        for s in ("train", "val", "test")
    }
    path = folder / f"split_zhou_{stem}.json"
    folder.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(split))
    return path


def write_images(root: Path, *, classes: int = 3, counts=(5, 2, 2)) -> Path:
    """A small imagefolder dataset (``train/ val/ test/``, 64 px PNGs, one tint per class)."""
    rng = np.random.default_rng(0)
    for split, n in zip(("train", "val", "test"), counts):
        for c in range(classes):
            for i in range(n):
                path = root / split / f"class{c}" / f"{i}.png"
                path.parent.mkdir(parents=True, exist_ok=True)
                pixels = rng.random((64, 64, 3)) * 80 + np.array([70 * c, 100, 200 - 70 * c])
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(path)
    return root
