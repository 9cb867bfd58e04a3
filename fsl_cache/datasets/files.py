"""File-system helpers shared by the loaders: listing images, cheap existence checks, hashing."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from fsl_cache.errors import DatasetError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")
MISSING_SHOWN = 3
"""How many missing paths an error names before it only gives the count."""


def user_path(text: str | Path, *, what: str, resolve: bool = True) -> Path:
    """``text`` as given on the command line, ``~`` expanded (and made absolute unless ``resolve=False``).

    A :class:`DatasetError` for what no file system can have: a NUL byte, ``~user`` of an unknown
    user, a symlink loop.
    """
    if "\0" in str(text):
        raise DatasetError(f"{what} {str(text)!r} contains a NUL byte")
    try:
        path = Path(text).expanduser()
        return path.resolve() if resolve else path
    except (RuntimeError, OSError, ValueError) as err:  # RuntimeError: unknown ~user or a symlink loop
        raise DatasetError(f"{what} {text}: {err}") from None


def is_image_name(name: str) -> bool:
    """True for a visible file name with one of :data:`IMAGE_EXTENSIONS` (any case)."""
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def sorted_subdirs(folder: Path) -> list[str]:
    """Names of the visible sub-folders of ``folder``, sorted (the class order of every loader)."""
    return sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))


def list_images(folder: Path, *, recursive: bool = False) -> list[str]:
    """Image files under ``folder`` as sorted POSIX paths relative to it.

    Sorted rather than ``os.listdir`` order, so the item order (which the few-shot sampling
    depends on) is the same on every file system.
    """
    if not recursive:
        return sorted(e.name for e in os.scandir(folder) if e.is_file() and is_image_name(e.name))
    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        rel = Path(dirpath).relative_to(folder)
        found += [(rel / f).as_posix() for f in filenames if is_image_name(f)]
    return sorted(found)


def missing_files(image_root: Path, relpaths: Iterable[str]) -> list[str]:
    """The paths in ``relpaths`` (POSIX, relative to ``image_root``) that do not exist.

    Lists each parent folder once instead of stat-ing every file: 27k EuroSAT paths cost ten
    ``scandir`` calls, which matters on network file systems.
    """
    listings: dict[str, frozenset[str]] = {}
    missing = []
    for rel in relpaths:
        parent, _, name = rel.rpartition("/")
        if parent not in listings:
            listings[parent] = _names_in(image_root / parent)
        if name not in listings[parent]:
            missing.append(rel)
    return missing


def _names_in(folder: Path) -> frozenset[str]:
    try:
        return frozenset(os.listdir(folder))
    except (OSError, ValueError):  # missing, not a folder, unreadable, a NUL byte: its files are missing
        return frozenset()


def check_files_exist(image_root: Path, relpaths: Sequence[str], *, expects: str) -> None:
    """Raise a one-line :class:`DatasetError` naming the first missing images and their count."""
    missing = missing_files(image_root, relpaths)
    if not missing:
        return
    shown = ", ".join(str(image_root / rel) for rel in missing[:MISSING_SHOWN])
    if len(missing) == 1:
        raise DatasetError(f"{expects}; missing: {shown}")
    raise DatasetError(
        f"{expects}; {len(missing)} of {len(relpaths)} listed images are missing, first: {shown}"
    )


def hash_items(splits: dict[str, Sequence[tuple[str, int]]], classnames: Sequence[str]) -> str:
    """SHA-256 of a folder-scanned dataset: its sorted file list with labels, and class names."""
    payload = {"classnames": list(classnames), "splits": {k: list(v) for k, v in splits.items()}}
    return hashlib.sha256(json.dumps(payload, separators=(",", ":")).encode()).hexdigest()


def read_lines(path: Path) -> list[tuple[int, str]]:
    """Non-blank lines of a UTF-8 text file, stripped, with their 1-based line numbers."""
    try:
        text = path.read_text(encoding="utf-8-sig")  # tolerate a BOM from Windows editors
    except UnicodeDecodeError as err:
        raise DatasetError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from None
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
