"""User datasets, ``imagefolder:DIR`` and ``csv:FILE``, split deterministically when not split."""

from __future__ import annotations

import csv
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from fsl_cache.datasets.base import SPLITS, DatasetSpec, sha256_file
from fsl_cache.datasets.files import (
    IMAGE_EXTENSIONS,
    check_files_exist,
    hash_items,
    list_images,
    read_lines,
    sorted_subdirs,
    user_path,
)
from fsl_cache.errors import DatasetError

Item = tuple[str, int]

IMAGEFOLDER_LAYOUT = (
    "DIR/<class>/*.jpg (or DIR/{train,val,test}/<class>/*.jpg), optional DIR/classnames.txt "
    "and DIR/templates.txt"
)
CSV_LAYOUT = (
    "a CSV file with a header row path,label[,split] (label: class index or class name; relative "
    "paths resolve against the CSV's folder), optional classnames.txt and templates.txt beside it"
)
DEFAULT_TEMPLATES = ("a photo of a {}.",)
SPLIT_SEED = 0
THREE_WAY = {"val": 20, "test": 30}
"""[PROPOSED] Percent of each class held out when no split is given; the rest (50 %) is train."""
VAL_FROM_TRAIN = {"val": 20}
"""[PROPOSED] Percent of each train class held out as val when there is no ``val/`` folder."""


# ---------------------------------------------------------------------------- stratified split


def stratified_split(
    groups: Sequence[tuple[str, Sequence[str]]], *, held_out: dict[str, int]
) -> dict[str, list[Item]]:
    """Split each class's paths into ``train`` and the ``held_out`` splits (percent of the class).

    ``groups[label] = (class key, paths)``. Per class the paths are sorted, then shuffled by
    ``random.Random(f"{SPLIT_SEED}:{key}")``, so a class's split does not change when other classes
    are added. Each held-out split gets ``max(1, n * pct // 100)`` items when the class has at
    least one item per split, else none; the rest is train. Items stay sorted within a split.
    """
    out: dict[str, list[Item]] = {"train": [], **{name: [] for name in held_out}}
    for label, (key, paths) in enumerate(groups):
        shuffled = sorted(paths)
        random.Random(f"{SPLIT_SEED}:{key}").shuffle(shuffled)
        enough = len(paths) >= 1 + len(held_out)
        start = 0
        for name, pct in held_out.items():
            count = max(1, len(paths) * pct // 100) if enough else 0
            out[name] += [(p, label) for p in sorted(shuffled[start : start + count])]
            start += count
        out["train"] += [(p, label) for p in sorted(shuffled[start:])]
    return out


def split_rule(held_out: dict[str, int]) -> str:
    """The note that records how :func:`stratified_split` made the splits."""
    parts = ", ".join(f"{name} = max(1, {pct}% of n, rounded down)" for name, pct in held_out.items())
    return (
        f"[PROPOSED] stratified split: per class, paths sorted then shuffled with "
        f"random.Random('{SPLIT_SEED}:<class>'); {parts}; train = the rest; classes with fewer "
        f"than {1 + len(held_out)} images go to train only"
    )


# ---------------------------------------------------------------------------- names and templates


def read_classnames(folder: Path, keys: Sequence[str]) -> list[str]:
    """Names from ``folder/classnames.txt`` (one per line, in ``keys`` order), else the keys."""
    path = folder / "classnames.txt"
    if not path.is_file():
        return [key.replace("_", " ") for key in keys]
    names = [line for _, line in read_lines(path)]
    if len(names) != len(keys):
        shown = ", ".join(keys[:5]) + (", ..." if len(keys) > 5 else "")
        raise DatasetError(f"{path} has {len(names)} names but there are {len(keys)} classes ({shown})")
    return names


def read_templates(folder: Path) -> dict[str, tuple[str, ...]]:
    """``tip`` from ``folder/templates.txt`` (one template with ``{}`` a line); coop: the first."""
    path = folder / "templates.txt"
    templates = DEFAULT_TEMPLATES
    if path.is_file():
        templates = tuple(_check_template(path, n, line) for n, line in read_lines(path))
        if not templates:
            raise DatasetError(f"{path} has no templates (one per line, each with {{}})")
    return {"tip": templates, "coop": templates[:1]}


def _check_template(path: Path, lineno: int, line: str) -> str:
    try:
        ok = line.count("{}") == 1 and line.format("x") != line
    except (IndexError, KeyError, ValueError):
        ok = False
    if not ok:
        raise DatasetError(
            f"{path}:{lineno}: a template needs exactly one {{}} and no other braces: '{line}'"
        )
    return line


# ---------------------------------------------------------------------------- imagefolder:DIR


def load_imagefolder(folder: Path | str) -> DatasetSpec:
    """``imagefolder:DIR``: a sub-folder per class (sorted); ``train/ val/ test/`` if present."""
    folder = user_path(folder, what="imagefolder:")
    if not folder.is_dir():
        raise DatasetError(f"imagefolder expects {IMAGEFOLDER_LAYOUT}; missing: {folder}")
    if any((folder / split).is_dir() for split in SPLITS):
        keys, splits, notes = _from_split_folders(folder)
    else:
        keys, splits, notes = _from_class_folders(folder)
    classnames, templates = read_classnames(folder, keys), read_templates(folder)
    check_classes(classnames, f"imagefolder:{folder}")
    return DatasetSpec(
        name=f"imagefolder:{folder}",
        image_root=folder,
        classnames=tuple(classnames),
        templates=templates,
        splits={s: tuple(splits[s]) for s in SPLITS},
        source_hash=hash_items(splits, classnames),
        notes=tuple(notes),
    )


def check_classes(classnames: Sequence[str], name: str) -> None:
    """Refuse a dataset with fewer than two classes: there is nothing to classify (or to sample shots against)."""
    if len(classnames) < 2:
        found = f"only one class ('{classnames[0]}')" if classnames else "no class"
        raise DatasetError(f"{name} has {found}; few-shot classification needs at least 2 classes")


def _class_images(class_dir: Path) -> list[str]:
    images = list_images(class_dir, recursive=True)
    if not images:
        raise DatasetError(f"imagefolder: {class_dir} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return images


def _class_dirs(folder: Path) -> list[str]:
    keys = sorted_subdirs(folder)
    if not keys:
        raise DatasetError(f"imagefolder expects {IMAGEFOLDER_LAYOUT}; no class folders in {folder}")
    return keys


def _from_class_folders(folder: Path):
    keys = _class_dirs(folder)
    groups = [(key, [f"{key}/{p}" for p in _class_images(folder / key)]) for key in keys]
    return keys, stratified_split(groups, held_out=THREE_WAY), [split_rule(THREE_WAY)]


def _from_split_folders(folder: Path):
    for required in ("train", "test"):
        if not (folder / required).is_dir():
            raise DatasetError(
                f"imagefolder with split folders expects DIR/train/<class>/ and DIR/test/<class>/ "
                f"(DIR/val/ optional); missing: {folder / required}"
            )
    unknown = [d for d in sorted_subdirs(folder) if d not in SPLITS]
    if unknown:  # a mistyped split or a stray class folder would otherwise be ignored without a word
        raise DatasetError(
            f"imagefolder {folder} has split folders, so every sub-folder must be train/, val/ or test/; "
            f"found {', '.join(f'{d}/' for d in unknown)}. Rename it to a split, or move it out of {folder}."
        )
    keys = _class_dirs(folder / "train")
    label_of = {key: label for label, key in enumerate(keys)}
    test = _scan_split(folder, "test", label_of)
    if (folder / "val").is_dir():
        splits = {
            "train": _scan_split(folder, "train", label_of),
            "val": _scan_split(folder, "val", label_of),
        }
        return keys, {**splits, "test": test}, ["splits: train/, val/, test/ folders"]
    groups = [(key, [f"train/{key}/{p}" for p in _class_images(folder / "train" / key)]) for key in keys]
    notes = ["splits: train/ and test/ folders; val held out of train/", split_rule(VAL_FROM_TRAIN)]
    return keys, {**stratified_split(groups, held_out=VAL_FROM_TRAIN), "test": test}, notes


def _scan_split(folder: Path, split: str, label_of: dict[str, int]) -> list[Item]:
    items = []
    for key in sorted_subdirs(folder / split):
        if key not in label_of:
            raise DatasetError(
                f"imagefolder: {folder / split / key} is not a class folder of {folder / 'train'}"
            )
        class_dir = folder / split / key
        # a class may lack val or test images, but one without train images is a mistake
        images = _class_images(class_dir) if split == "train" else list_images(class_dir, recursive=True)
        items += [(f"{split}/{key}/{p}", label_of[key]) for p in images]
    return items


# ---------------------------------------------------------------------------- csv:FILE

CSV_COLUMNS = ("path", "label", "split")


@dataclass(frozen=True)
class CsvRow:
    """One data row of a ``csv:FILE`` dataset, as written."""

    line: int
    path: str
    label: str
    split: str | None
    """``None`` when the file has no split column."""


def load_csv(file: Path | str) -> DatasetSpec:
    """``csv:FILE``: ``path,label[,split]`` rows under a header; stratified if no split column."""
    file = user_path(file, what="csv:")
    if not file.is_file():
        raise DatasetError(f"csv expects {CSV_LAYOUT}; missing: {file}")
    rows = _read_rows(file)
    labels, classnames = _resolve_labels(rows, file)
    splits, notes = _csv_splits(rows, labels, classnames)
    expects = f"csv:{file} expects {CSV_LAYOUT}"
    check_files_exist(file.parent, [row.path for row in rows], expects=expects)
    check_classes(classnames, f"csv:{file}")
    return DatasetSpec(
        name=f"csv:{file}",
        image_root=file.parent,
        classnames=tuple(classnames),
        templates=read_templates(file.parent),
        splits={s: tuple(splits[s]) for s in SPLITS},
        source_hash=sha256_file(file),
        notes=tuple(notes),
    )


def _csv_splits(rows: list[CsvRow], labels: list[int], classnames: list[str]):
    if rows[0].split is not None:  # the split column is on every row or on none
        pairs = list(zip(rows, labels, strict=True))
        splits = {s: [(row.path, y) for row, y in pairs if row.split == s] for s in SPLITS}
        return splits, ["splits: the CSV's split column"]
    groups = [
        (name, [row.path for row, y in zip(rows, labels, strict=True) if y == label])
        for label, name in enumerate(classnames)
    ]
    return stratified_split(groups, held_out=THREE_WAY), [split_rule(THREE_WAY)]


def _read_rows(file: Path) -> list[CsvRow]:
    with open(file, newline="", encoding="utf-8-sig") as fh:
        reader = csv.reader(fh)
        try:
            columns = _header(next(reader, []), file)
            rows = [
                _row(reader.line_num, values, columns, file)
                for values in reader
                if any(v.strip() for v in values)
            ]
        except UnicodeDecodeError as err:
            raise DatasetError(f"{file} is not UTF-8 text ({err.reason} at byte {err.start})") from None
        except csv.Error as err:  # e.g. a field over csv.field_size_limit()
            raise DatasetError(f"{file}:{reader.line_num}: not a readable CSV row ({err})") from None
    if not rows:
        raise DatasetError(f"{file}: no rows after the header (expects {CSV_LAYOUT})")
    return rows


def _header(values: list[str], file: Path) -> list[str]:
    columns = [v.strip().lower() for v in values]
    known = set(columns) <= set(CSV_COLUMNS) and len(set(columns)) == len(columns)
    if not (known and "path" in columns and "label" in columns):
        found = ",".join(values) or "nothing"
        raise DatasetError(f"{file}:1: header must name the columns path,label[,split]; found: {found}")
    return columns


def _row(line: int, values: list[str], columns: list[str], file: Path) -> CsvRow:
    if len(values) != len(columns):
        raise DatasetError(
            f"{file}:{line}: expected {len(columns)} columns ({','.join(columns)}), got {len(values)}"
        )
    cells = {c: v.strip() for c, v in zip(columns, values, strict=True)}
    empty = [c for c in columns if not cells[c]]
    if empty:
        raise DatasetError(f"{file}:{line}: empty {empty[0]}")
    split = cells.get("split")
    if split is not None and split not in SPLITS:
        raise DatasetError(f"{file}:{line}: split must be one of train, val, test; got '{split}'")
    return CsvRow(line, cells["path"], cells["label"], split)


def _resolve_labels(rows: list[CsvRow], file: Path) -> tuple[list[int], list[str]]:
    """Integer labels index classnames.txt; other labels are class names, sorted like folders."""
    if not all(re.fullmatch(r"[0-9]+", row.label) for row in rows):
        keys = sorted({row.label for row in rows})
        label_of = {key: label for label, key in enumerate(keys)}
        return [label_of[row.label] for row in rows], read_classnames(file.parent, keys)
    names_path = file.parent / "classnames.txt"
    if not names_path.is_file():
        raise DatasetError(
            f"{file}: labels are integers, so {names_path} must list the class names (line i names label i)"
        )
    classnames = [line for _, line in read_lines(names_path)]
    for row in rows:
        if int(row.label) >= len(classnames):
            raise DatasetError(
                f"{file}:{row.line}: label {row.label} out of range 0..{len(classnames) - 1} "
                f"({names_path.name} has {len(classnames)} names)"
            )
    return [int(row.label) for row in rows], classnames
