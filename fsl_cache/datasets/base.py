"""The dataset contract: what every loader returns and how loaders are registered."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset resolved on disk: its items per split, class names and prompt templates.

    Paths in ``splits`` are relative to ``image_root``; labels index ``classnames``. Item order is
    the order of the source split file, which the CoOp sampling depends on.
    """

    name: str
    """Canonical name: a built-in name (``eurosat``) or ``imagefolder:/abs/dir`` / ``csv:/abs/file``."""
    image_root: Path
    """Folder the relative item paths are resolved against."""
    classnames: tuple[str, ...]
    """Class names as they go into prompts (``_`` already replaced by a space)."""
    templates: dict[str, tuple[str, ...]]
    """Template sets by name; ``tip`` is always present and is the default set."""
    splits: dict[str, tuple[tuple[str, int], ...]]
    """``train``/``val``/``test`` → ((relative path, label), ...); ``val`` may be empty (ImageNet)."""
    source_hash: str
    """SHA-256 of whatever defines the splits (split file bytes, or the listed files and labels)."""
    notes: tuple[str, ...] = field(default=())
    """Facts a user should see in the store metadata, e.g. how a missing split was generated."""

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def labels(self, split: str) -> list[int]:
        return [label for _, label in self.splits[split]]

    def path(self, split: str, index: int) -> Path:
        return self.image_root / self.splits[split][index][0]

    def fingerprint_parts(self) -> dict:
        """What identifies this dataset in a store fingerprint (hashable, order-preserving)."""
        items = hashlib.sha256(
            json.dumps({s: self.splits[s] for s in SPLITS}, separators=(",", ":")).encode()
        ).hexdigest()
        return {
            "name": self.name,
            "classnames": list(self.classnames),
            "source_sha256": self.source_hash,
            "items_sha256": items,
        }


Loader = Callable[[Path], DatasetSpec]
_LOADERS: dict[str, Loader] = {}


def register_dataset(name: str) -> Callable[[Loader], Loader]:
    """Register ``fn(root) -> DatasetSpec`` as the loader of the built-in dataset ``name``."""

    def wrap(fn: Loader) -> Loader:
        _LOADERS[name] = fn
        return fn

    return wrap


def builtin_loaders() -> dict[str, Loader]:
    return dict(_LOADERS)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
