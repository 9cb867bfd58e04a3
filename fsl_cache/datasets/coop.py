"""Loaders for the 11 CoOp datasets and the ImageNet shift sets, read from CoOp's layout under ROOT.

Each loader checks cheaply (directory listings, no decoding) that the root, the split files and
every listed image exist, and fails with one line naming the missing path and the expected layout.
"""

from __future__ import annotations

import functools
import hashlib
import json
import random
from dataclasses import dataclass
from pathlib import Path

from fsl_cache.datasets.base import DatasetSpec, register_dataset, sha256_file
from fsl_cache.datasets.files import (
    check_files_exist,
    hash_items,
    list_images,
    read_lines,
    sorted_subdirs,
)
from fsl_cache.datasets.templates import templates_for
from fsl_cache.errors import DatasetError

Item = tuple[str, int]

IMAGENET_VAL_PER_CLASS = 20
IMAGENET_VAL_SEED = 0


@dataclass(frozen=True)
class Layout:
    """Where a built-in dataset lives under ROOT (METHODS §1.4)."""

    title: str
    """Display name used in messages, e.g. ``EuroSAT``."""
    folder: str
    """Dataset folder inside ROOT, e.g. ``eurosat``."""
    images: str
    """Image folder inside ``folder``; split-file paths are relative to it."""
    num_classes: int
    """Classes in the full dataset; split-file labels must lie in ``0..num_classes-1``."""
    expects: str
    """The expected layout as shown to users, with ``ROOT`` for the data root."""
    split_file: str | None = None
    """CoOp's ``split_zhou_*.json`` inside ``folder``, for the split-file datasets."""

    def describe(self) -> str:
        return f"{self.title} expects {self.expects}"


def _split_layout(title: str, folder: str, images: str, classes: int, stem: str, pattern: str):
    split_file = f"split_zhou_{stem}.json"
    expects = f"ROOT/{folder}/{pattern} and ROOT/{folder}/{split_file}"
    return Layout(title, folder, images, classes, expects, split_file)


def _wnid_layout(title: str, folder: str, images: str, classes: int, pattern: str) -> Layout:
    expects = f"ROOT/{folder}/{images}/{pattern} and ROOT/{folder}/classnames.txt"
    return Layout(title, folder, images, classes, expects)


_FGVC_EXPECTS = (
    "ROOT/fgvc_aircraft/images/*.jpg, ROOT/fgvc_aircraft/variants.txt and "
    "ROOT/fgvc_aircraft/images_variant_{train,val,test}.txt"
)

# [CODE] CoOp datasets/*.py: dataset_dir, image_dir and split_path of each class. Stanford Cars'
# split paths are relative to the dataset folder itself (image folder ".").
# fmt: off
LAYOUTS: dict[str, Layout] = {
    "imagenet": _wnid_layout("ImageNet", "imagenet", "images", 1000, "{train,val}/<wnid>/*.JPEG"),
    "caltech101": _split_layout("Caltech101", "caltech-101", "101_ObjectCategories", 100,
                                "Caltech101", "101_ObjectCategories/<Class>/*.jpg"),
    "oxford_pets": _split_layout("OxfordPets", "oxford_pets", "images", 37,
                                 "OxfordPets", "images/*.jpg"),
    "stanford_cars": _split_layout("StanfordCars", "stanford_cars", ".", 196,
                                   "StanfordCars", "{cars_train,cars_test}/*.jpg"),
    "oxford_flowers": _split_layout("Flowers102", "oxford_flowers", "jpg", 102,
                                    "OxfordFlowers", "jpg/*.jpg"),
    "food101": _split_layout("Food101", "food-101", "images", 101,
                             "Food101", "images/<class>/*.jpg"),
    "fgvc_aircraft": Layout("FGVCAircraft", "fgvc_aircraft", "images", 100, _FGVC_EXPECTS),
    "sun397": _split_layout("SUN397", "sun397", "SUN397", 397,
                            "SUN397", "SUN397/<letter>/<scene>/*.jpg"),
    "dtd": _split_layout("DTD", "dtd", "images", 47,
                         "DescribableTextures", "images/<texture>/*.jpg"),
    "eurosat": _split_layout("EuroSAT", "eurosat", "2750", 10, "EuroSAT", "2750/<Class>/*.jpg"),
    "ucf101": _split_layout("UCF101", "ucf101", "UCF-101-midframes", 101,
                            "UCF101", "UCF-101-midframes/<Action>/*.jpg"),
    "imagenet_v2": _wnid_layout("ImageNet-V2", "imagenetv2",
                                "imagenetv2-matched-frequency-format-val", 1000, "<0..999>/*.jpeg"),
    "imagenet_sketch": _wnid_layout("ImageNet-Sketch", "imagenet-sketch", "images", 1000,
                                    "<wnid>/*.JPEG"),
    "imagenet_a": _wnid_layout("ImageNet-A", "imagenet-adversarial", "imagenet-a", 200,
                               "<wnid>/*.jpg"),
    "imagenet_r": _wnid_layout("ImageNet-R", "imagenet-rendition", "imagenet-r", 200,
                               "<wnid>/*.jpg"),
}
# fmt: on


# ---------------------------------------------------------------------------- layout checks


def _dataset_dir(root: Path, layout: Layout) -> Path:
    """``ROOT/<folder>``, or an error naming what is missing and the layout expected."""
    if not root.is_dir():
        raise DatasetError(f"{layout.describe()}; missing: {root} (the data root)")
    folder = root / layout.folder
    if not folder.is_dir():
        hint = ""
        if root.name == layout.folder:
            hint = f" (ROOT is the folder that contains {layout.folder}/: try --root {root.parent})"
        raise DatasetError(f"{layout.describe()}; missing: {folder}{hint}")
    return folder


def _require(path: Path, layout: Layout, *, folder: bool = False) -> Path:
    if not (path.is_dir() if folder else path.is_file()):
        raise DatasetError(f"{layout.describe()}; missing: {path}")
    return path


def _check_items(image_root: Path, splits: dict[str, list[Item]], layout: Layout) -> None:
    relpaths = [path for items in splits.values() for path, _ in items]
    check_files_exist(image_root, relpaths, expects=layout.describe())


def _spec(name: str, image_root: Path, classnames, splits, source_hash: str, notes=()):
    return DatasetSpec(
        name=name,
        image_root=image_root,
        classnames=tuple(classnames),
        templates=templates_for(name),
        splits={k: tuple(v) for k, v in splits.items()},
        source_hash=source_hash,
        notes=tuple(notes),
    )


# ---------------------------------------------------------------------------- CoOp split files


def read_split_json(path: Path, *, num_classes: int) -> tuple[dict[str, list[Item]], list[str]]:
    """Parse a CoOp ``split_zhou_*.json``: ``{split: [[relpath, label, classname], ...]}``.

    Returns the splits in file order and the class names ordered by label, ``_`` replaced by a
    space ([CODE] CoOp coop.py::PromptLearner). Any malformed entry is a :class:`DatasetError`.
    """
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise DatasetError(f"Bad split file {path}: not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise DatasetError(f"Bad split file {path}: expected an object with train, val, test")
    names: dict[int, str] = {}
    splits = {s: _parse_split(data, s, path, num_classes, names) for s in ("train", "val", "test")}
    absent = [label for label in range(num_classes) if label not in names]
    if absent:
        raise DatasetError(
            f"Bad split file {path}: no item has label {absent[0]} ({len(absent)} labels unused)"
        )
    return splits, [names[label].replace("_", " ") for label in range(num_classes)]


def _parse_split(data: dict, split: str, path: Path, num_classes: int, names: dict) -> list[Item]:
    if split not in data:
        raise DatasetError(f"Bad split file {path}: missing key '{split}' (needs train, val, test)")
    if not isinstance(data[split], list):
        raise DatasetError(f"Bad split file {path}: '{split}' must be a list of [path, label, classname]")
    return [_parse_entry(e, f"{split}[{i}]", path, num_classes, names) for i, e in enumerate(data[split])]


def _parse_entry(entry, where: str, path: Path, num_classes: int, names: dict[int, str]) -> Item:
    bad = f"Bad split file {path}: {where}"
    if not (isinstance(entry, list) and len(entry) == 3):
        raise DatasetError(f"{bad} must be [path, label, classname], got {str(entry)[:80]}")
    rel, label, name = entry
    if not (isinstance(rel, str) and rel):
        raise DatasetError(f"{bad}: path must be a non-empty string, got {rel!r}")
    if type(label) is not int:  # bool is an int subclass; "3" is not accepted either
        raise DatasetError(f"{bad}: label must be an int, got {label!r}")
    if not 0 <= label < num_classes:
        raise DatasetError(f"{bad}: label {label} out of range 0..{num_classes - 1} ({num_classes} classes)")
    if not isinstance(name, str):
        raise DatasetError(f"{bad}: classname must be a string, got {name!r}")
    if names.setdefault(label, name) != name:
        raise DatasetError(f"{bad}: label {label} is named '{name}' here but '{names[label]}' before")
    return rel, label


def _load_split_json(name: str, root: Path) -> DatasetSpec:
    layout = LAYOUTS[name]
    folder = _dataset_dir(Path(root), layout)
    image_root = _require(folder / layout.images, layout, folder=True)
    split_path = _require(folder / layout.split_file, layout)
    splits, classnames = read_split_json(split_path, num_classes=layout.num_classes)
    _check_items(image_root, splits, layout)
    note = f"splits: CoOp {layout.split_file}"
    return _spec(name, image_root.resolve(), classnames, splits, sha256_file(split_path), [note])


def split_file_spec(name: str, split_path: Path) -> DatasetSpec:
    """``name`` as its CoOp split file alone describes it: items, labels, class names; no image is checked.

    Enough to count pools and size a store (``fsl-cache plan``) where the images are not at hand.
    """
    layout = LAYOUTS[name]
    splits, classnames = read_split_json(Path(split_path), num_classes=layout.num_classes)
    note = f"splits: CoOp {layout.split_file} (images not checked)"
    return _spec(name, Path(split_path).parent, classnames, splits, sha256_file(split_path), [note])


for _name, _layout in LAYOUTS.items():
    if _layout.split_file:
        register_dataset(_name)(functools.partial(_load_split_json, _name))


# ---------------------------------------------------------------------------- FGVC-Aircraft

FGVC_SPLIT_FILES = {s: f"images_variant_{s}.txt" for s in ("train", "val", "test")}


@register_dataset("fgvc_aircraft")
def load_fgvc_aircraft(root: Path) -> DatasetSpec:
    """FGVC-Aircraft with its official variant splits ([CODE] CoOp fgvc_aircraft.py)."""
    layout = LAYOUTS["fgvc_aircraft"]
    folder = _dataset_dir(Path(root), layout)
    image_root = _require(folder / layout.images, layout, folder=True)
    variants_path = _require(folder / "variants.txt", layout)
    variants = [line for _, line in read_lines(variants_path)]
    split_paths = {s: _require(folder / f, layout) for s, f in FGVC_SPLIT_FILES.items()}
    label_of = {v: i for i, v in enumerate(variants)}
    splits = {s: _read_variant_split(p, label_of) for s, p in split_paths.items()}
    _check_items(image_root, splits, layout)
    digest = _hash_files([variants_path, *split_paths.values()])
    classnames = [v.replace("_", " ") for v in variants]
    note = "splits: official images_variant_{train,val,test}.txt"
    return _spec("fgvc_aircraft", image_root.resolve(), classnames, splits, digest, [note])


def _read_variant_split(path: Path, label_of: dict[str, int]) -> list[Item]:
    items = []
    for lineno, line in read_lines(path):
        image_id, _, variant = line.partition(" ")
        if variant not in label_of:
            raise DatasetError(f"{path}:{lineno}: variant '{variant}' is not in variants.txt")
        items.append((f"{image_id}.jpg", label_of[variant]))
    return items


def _hash_files(paths: list[Path]) -> str:
    lines = "".join(f"{p.name} {sha256_file(p)}\n" for p in paths)
    return hashlib.sha256(lines.encode()).hexdigest()


# ---------------------------------------------------------------------------- ImageNet family


def read_wnid_classnames(path: Path) -> dict[str, str]:
    """CoOp's ``classnames.txt``: one ``<wnid> <class name>`` per line, in label order."""
    names = {}
    for lineno, line in read_lines(path):
        wnid, _, name = line.partition(" ")
        if not name.strip():
            raise DatasetError(f"{path}:{lineno}: expected '<wnid> <class name>', got '{line}'")
        names[wnid] = name.strip().replace("_", " ")
    return names


def _scan_wnid_folders(image_dir: Path, label_of: dict[str, int], prefix: str = "") -> list[Item]:
    items = []
    for wnid in sorted_subdirs(image_dir):
        if wnid not in label_of:
            raise DatasetError(
                f"{image_dir / wnid}: class folder '{wnid}' is not among the {len(label_of)} known classes"
            )
        items += [(f"{prefix}{wnid}/{f}", label_of[wnid]) for f in list_images(image_dir / wnid)]
    return items


def _hold_out_val(items: list[Item], num_classes: int) -> tuple[list[Item], list[Item]]:
    """[PROPOSED] ImageNet val: a fixed per-class subset of train, disjoint from any train pool."""
    by_class: dict[int, list[int]] = {}
    for index, (_, label) in enumerate(items):
        by_class.setdefault(label, []).append(index)
    rng = random.Random(IMAGENET_VAL_SEED)
    chosen = set()
    for label in range(num_classes):
        indices = by_class.get(label, [])
        chosen.update(rng.sample(indices, min(IMAGENET_VAL_PER_CLASS, len(indices) // 2)))
    train = [item for index, item in enumerate(items) if index not in chosen]
    return train, [items[index] for index in sorted(chosen)]


IMAGENET_NOTES = (
    "test = official ILSVRC-2012 val ([CODE] CoOp imagenet.py); CoOp has no ImageNet val",
    f"[PROPOSED] val = min({IMAGENET_VAL_PER_CLASS}, n//2) train images per class, drawn with "
    f"random.Random({IMAGENET_VAL_SEED}).sample over each class's file list (classes in label "
    "order) and removed from train",
    "images are sorted by name within each class (CoOp uses os.listdir order, which varies)",
)


@register_dataset("imagenet")
def load_imagenet(root: Path) -> DatasetSpec:
    """ImageNet-1k: classes are the sorted wnid folders of ``images/train`` (classnames.txt)."""
    layout = LAYOUTS["imagenet"]
    folder = _dataset_dir(Path(root), layout)
    names = read_wnid_classnames(_require(folder / "classnames.txt", layout))
    train_dir = _require(folder / "images" / "train", layout, folder=True)
    test_dir = _require(folder / "images" / "val", layout, folder=True)
    wnids = _class_folders(train_dir, names, layout)
    label_of = {wnid: label for label, wnid in enumerate(wnids)}
    train, val = _hold_out_val(_scan_wnid_folders(train_dir, label_of, "train/"), len(wnids))
    splits = {"train": train, "val": val, "test": _scan_wnid_folders(test_dir, label_of, "val/")}
    classnames = [names[w] for w in wnids]
    return _spec(
        "imagenet",
        (folder / "images").resolve(),
        classnames,
        splits,
        hash_items(splits, classnames),
        IMAGENET_NOTES,
    )


def _class_folders(image_dir: Path, names: dict[str, str], layout: Layout) -> list[str]:
    wnids = sorted_subdirs(image_dir)
    if not wnids:
        raise DatasetError(f"{layout.describe()}; no class folders in {image_dir}")
    unknown = [w for w in wnids if w not in names]
    if unknown:
        raise DatasetError(f"{image_dir / unknown[0]}: folder '{unknown[0]}' has no entry in classnames.txt")
    return wnids


def _load_wnid_test_set(name: str, root: Path) -> DatasetSpec:
    # [CODE] CoOp imagenet_sketch.py, imagenet_a.py, imagenet_r.py: labels enumerate the sorted
    # wnid folders present, so A and R are 200-class problems named from ImageNet's classnames.txt
    layout = LAYOUTS[name]
    folder = _dataset_dir(Path(root), layout)
    names = read_wnid_classnames(_require(folder / "classnames.txt", layout))
    image_dir = _require(folder / layout.images, layout, folder=True)
    wnids = _class_folders(image_dir, names, layout)
    test = _scan_wnid_folders(image_dir, {w: label for label, w in enumerate(wnids)})
    return _test_only(name, image_dir, [names[w] for w in wnids], test)


def _test_only(name: str, image_dir: Path, classnames: list[str], test: list[Item]) -> DatasetSpec:
    splits = {"train": [], "val": [], "test": test}
    note = "test-only evaluation set (train and val are empty)"
    return _spec(name, image_dir.resolve(), classnames, splits, hash_items(splits, classnames), [note])


for _name in ("imagenet_sketch", "imagenet_a", "imagenet_r"):
    register_dataset(_name)(functools.partial(_load_wnid_test_set, _name))


@register_dataset("imagenet_v2")
def load_imagenet_v2(root: Path) -> DatasetSpec:
    """ImageNet-V2 matched-frequency: folder ``<label>`` holds class ``label`` of classnames.txt."""
    layout = LAYOUTS["imagenet_v2"]
    folder = _dataset_dir(Path(root), layout)
    names = read_wnid_classnames(_require(folder / "classnames.txt", layout))
    image_dir = _require(folder / layout.images, layout, folder=True)
    test = []
    for label in range(len(names)):  # [CODE] CoOp imagenetv2.py: for label in range(1000)
        class_dir = _require(image_dir / str(label), layout, folder=True)
        test += [(f"{label}/{f}", label) for f in list_images(class_dir)]
    return _test_only("imagenet_v2", image_dir, list(names.values()), test)
