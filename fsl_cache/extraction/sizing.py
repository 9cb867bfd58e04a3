"""Sizing stores before anything is extracted (``fsl-cache plan``): counts from split files alone.

A CoOp dataset's split file gives every item and label, which is all the few-shot pools and the
store's array shapes depend on; the backbone's tap shapes come from its architecture built on the
meta device. So a store of any size is planned without an image, a weight file or a GPU.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from ..backbones import load_architecture
from ..datasets import DatasetSpec, load_dataset
from ..datasets.base import builtin_loaders
from ..datasets.coop import IMAGENET_VAL_PER_CLASS, LAYOUTS, split_file_spec
from ..datasets.templates import templates_for
from ..errors import FslError
from .pipeline import ExtractOptions, TapShapes, method_needs, plan_store, pools_and_metadata
from .plan import expected_bytes, string_bytes
from .text import text_arrays

ALL = "all"
COOP_DATASETS = tuple(name for name in LAYOUTS if not name.startswith("imagenet_"))
"""What ``--dataset all`` means: the 11 datasets of the CoOp benchmark."""
PUBLISHED_SPLITS = {
    "caltech101": (4_128, 1_649, 2_465),
    "oxford_pets": (2_944, 736, 3_669),
    "stanford_cars": (6_509, 1_635, 8_041),
    "oxford_flowers": (4_093, 1_633, 2_463),
    "food101": (50_500, 20_200, 30_300),
    "fgvc_aircraft": (3_334, 3_333, 3_333),
    "sun397": (15_880, 3_970, 19_850),
    "dtd": (2_820, 1_128, 1_692),
    "eurosat": (13_500, 5_400, 8_100),
    "ucf101": (7_639, 1_898, 3_783),
    "imagenet": (1_281_167, 0, 50_000),
}
"""[PAPER] (train, val, test) images of the CoOp splits (CoOp's dataset table; ImageNet: ILSVRC-2012 train and
val, the latter as test). Used only when a dataset has neither its split file nor its images here: the
plan is then an estimate with the images spread evenly over the classes (the 7 split files in the
shared data match these totals)."""


@dataclass(frozen=True)
class StoreSize:
    """What one dataset's store would hold: pools, images encoded, arrays and bytes."""

    dataset: str
    source: str
    """The split file (or dataset root) the counts come from, or why there are none."""
    classes: int | None = None
    estimated: bool = False
    """Counted from :data:`PUBLISHED_SPLITS` (classes balanced), not from the dataset's own split."""
    pools: dict[str, int] | None = None
    """Images per pool (``test``, ``train_pool``, ``val_pool``...)."""
    encoded: int = 0
    """Images the backbone encodes: every pool's center view plus the augmented train views."""
    arrays: int = 0
    raw_bytes: int = 0
    expected_bytes: int = 0
    """Stored bytes expected after compression (:data:`~fsl_cache.extraction.plan.EXPECTED_RATIO`)."""

    @property
    def missing(self) -> bool:
        return self.pools is None

    def to_json(self) -> dict:
        return {
            "dataset": self.dataset,
            "source": self.source,
            "missing": self.missing,
            "estimated": self.estimated,
            "classes": self.classes,
            "pools": self.pools,
            "images": sum((self.pools or {}).values()),
            "encoded": self.encoded,
            "arrays": self.arrays,
            "raw_bytes": self.raw_bytes,
            "expected_bytes": self.expected_bytes,
        }


def expand_datasets(datasets: Sequence[str]) -> list[str]:
    """Dataset specs with ``all`` replaced by the 11 CoOp datasets."""
    out = []
    for name in datasets:
        out += COOP_DATASETS if name == ALL else [name]
    return list(dict.fromkeys(out))


def size_stores(
    datasets: Sequence[str],
    *,
    model: str,
    options: ExtractOptions,
    root: str | Path | None = None,
    splits_dir: str | Path | None = None,
) -> list[StoreSize]:
    """The store each dataset would get from ``extract`` with ``options``, sized without images.

    Built-in CoOp datasets are counted from ``splits_dir/split_zhou_*.json`` or, failing that, from
    their layout under ``root``; a dataset with neither is estimated from :data:`PUBLISHED_SPLITS`, or
    returned as missing, with the reason, when it is not listed there.
    """
    backbone = load_architecture(model)
    base_shapes = {t: tuple(backbone.tap_shape(t)) for t in backbone.taps()}
    sizes = []
    for name in expand_datasets(datasets):
        estimated = False
        try:
            spec, source = _counted_spec(name, root=root, splits_dir=splits_dir)
        except FslError as err:
            if name not in PUBLISHED_SPLITS:
                sizes.append(StoreSize(name, f"missing: {err}"))
                continue
            spec, source = published_spec(name), f"estimate from the published split sizes ({err})"
            estimated = True
        size = _size(spec, source, backbone=backbone, tap_shapes=TapShapes(base_shapes), options=options)
        sizes.append(replace(size, estimated=estimated))
    return sizes


def published_spec(name: str) -> DatasetSpec:
    """``name`` with its :data:`PUBLISHED_SPLITS` counts, images spread evenly over the classes (ImageNet's val
    held out of train as the loader does). Paths are empty: enough to size pools and arrays, nothing else."""
    classes = LAYOUTS[name].num_classes
    train, val, test = PUBLISHED_SPLITS[name]

    def items(total: int) -> tuple[tuple[str, int], ...]:
        return tuple(("", label) for label in range(classes) for _ in range(_share(total, classes, label)))

    splits = {"train": items(train), "val": items(val), "test": items(test)}
    if name == "imagenet":  # [PROPOSED] in the loader: min(20, n//2) train images per class become val
        per_class = min(IMAGENET_VAL_PER_CLASS, train // classes // 2)
        splits |= {"train": items(train - per_class * classes), "val": items(per_class * classes)}
    return DatasetSpec(
        name=name,
        image_root=Path("."),
        classnames=tuple(f"class {i}" for i in range(classes)),
        templates=templates_for(name),
        splits=splits,
        source_hash="",
    )


def _share(total: int, classes: int, label: int) -> int:
    return total // classes + (label < total % classes)


def _counted_spec(name: str, *, root, splits_dir) -> tuple[DatasetSpec, str]:
    layout = LAYOUTS.get(name)
    if layout is not None and layout.split_file and splits_dir is not None:
        path = Path(splits_dir).expanduser() / layout.split_file
        if path.is_file():
            return split_file_spec(name, path), str(path)
    if layout is not None and layout.split_file and root is not None:
        path = Path(root).expanduser() / layout.folder / layout.split_file
        if path.is_file():
            return split_file_spec(name, path), str(path)
    if name in builtin_loaders() and root is None:
        where = f"no {layout.split_file} in {splits_dir}" if layout.split_file else "no split file"
        raise FslError(f"{where}; its counts need the dataset under --root")
    return load_dataset(name, root=root), f"{name} under {root}" if root else name


def _size(spec: DatasetSpec, source: str, *, backbone, tap_shapes, options: ExtractOptions) -> StoreSize:
    pools, whole = pools_and_metadata(spec, options, {})
    needs = [n for m in options.for_methods for n in method_needs(m, spec.name, options)]
    plan = plan_store(
        spec, options, pools, needs, backbone=backbone, tap_shapes=tap_shapes, existing={}, existing_views={}
    )
    text = text_arrays(spec, needs, embed_dim=backbone.embed_dim, descriptions=None)
    strings = sum(len(data) * string_bytes(data) for _, data in whole)  # paths: not in ArraySpec.nbytes
    arrays = [s for s, _ in whole] + text + [a for job in plan.jobs for a in job.arrays]
    return StoreSize(
        dataset=spec.name,
        source=source,
        classes=spec.num_classes,
        pools={name: pool.size for name, pool in pools.items()},
        encoded=sum(job.images for job in plan.jobs),
        arrays=len(arrays),
        raw_bytes=sum(a.nbytes for a in arrays) + strings,
        expected_bytes=sum(expected_bytes(a) for a in arrays) + strings,
    )
