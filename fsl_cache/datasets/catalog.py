"""Resolving a dataset spec (built-in name, ``imagefolder:DIR``, ``csv:FILE``) to a DatasetSpec."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from fsl_cache.datasets.base import DatasetSpec, builtin_loaders
from fsl_cache.datasets.coop import LAYOUTS
from fsl_cache.datasets.custom import CSV_LAYOUT, IMAGEFOLDER_LAYOUT, load_csv, load_imagefolder
from fsl_cache.datasets.files import user_path
from fsl_cache.errors import UsageError, did_you_mean

DATA_ENV = "FSL_DATA"
CUSTOM_KINDS = {"imagefolder": load_imagefolder, "csv": load_csv}


@dataclass(frozen=True)
class DatasetInfo:
    """One line of ``fsl-cache datasets``."""

    name: str
    """What to pass to ``--dataset``: ``eurosat``, ``imagefolder:DIR``, ``csv:FILE``."""
    num_classes: int | None
    """Classes of the full dataset; ``None`` for user datasets."""
    layout: str
    """The files expected, with ``ROOT`` for ``--root`` / ``$FSL_DATA``."""


def list_datasets() -> list[DatasetInfo]:
    """The built-in datasets (CoOp order, then the ImageNet shift sets) and the two user formats."""
    return [
        *(DatasetInfo(name, layout.num_classes, layout.expects) for name, layout in LAYOUTS.items()),
        DatasetInfo("imagefolder:DIR", None, IMAGEFOLDER_LAYOUT),
        DatasetInfo("csv:FILE", None, CSV_LAYOUT),
    ]


def load_dataset(spec: str, *, root: Path | str | None = None) -> DatasetSpec:
    """Resolve ``spec`` and check its files exist (stat only, nothing is decoded).

    ``spec`` is a built-in name read under ``root`` (default ``$FSL_DATA``), ``imagefolder:DIR`` or
    ``csv:FILE``. Unknown names raise a :class:`UsageError` with the closest valid choice.
    """
    kind, sep, target = spec.partition(":")
    if sep and kind in CUSTOM_KINDS:
        if not target:
            raise UsageError(f"Dataset spec '{spec}' needs a path after the colon, e.g. {kind}:/data/mine")
        return CUSTOM_KINDS[kind](target)
    loaders = builtin_loaders()
    if spec not in loaders:
        raise did_you_mean(spec, [*loaders, "imagefolder:DIR", "csv:FILE"], what="dataset")
    return loaders[spec](_data_root(spec, root))


def _data_root(name: str, root: Path | str | None) -> Path:
    root = root or os.environ.get(DATA_ENV)
    if not root:
        folder = LAYOUTS[name].folder
        raise UsageError(
            f"Dataset '{name}' needs a data root: pass --root DIR or set {DATA_ENV} "
            f"(DIR is the folder that contains {folder}/)"
        )
    return user_path(root, what="--root", resolve=False)
