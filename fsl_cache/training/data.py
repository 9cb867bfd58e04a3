"""Cached tensors as batches: one split, one augmentation policy, the taps a head reads.

A :class:`ViewSource` answers ``batch(positions, views)`` with float32 tensors. It holds the split
in memory when it fits the budget (the common case: pooled embeddings are kilobytes per image) and
otherwise streams each batch from the store, so heavy maps never need to fit in RAM.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from ..errors import StoreError

DEFAULT_MEMORY_BUDGET = int(float(os.environ.get("FSL_FIT_MEMORY_GB", "4")) * (1 << 30))
"""Bytes of cached tensors a fit may hold in memory before it streams from the store instead."""


@dataclass(frozen=True)
class SplitRef:
    """The images of one split a fit uses: rows of a store pool, their labels and split indices."""

    name: str
    """``train``, ``val`` or ``test``."""
    pool: str
    """Store pool holding the images, e.g. ``train_pool`` or ``val_full``."""
    rows: np.ndarray
    """Rows in the pool, in split order (int64)."""
    labels: torch.Tensor
    """Class index per image (int64)."""
    split_index: np.ndarray
    """Index of each image in the dataset's split list (what the run record stores)."""

    def __len__(self) -> int:
        return len(self.rows)


class ViewSource(Protocol):
    """Per-image cached tensors of one split under one policy."""

    num_views: int

    def __len__(self) -> int: ...

    def batch(self, positions: np.ndarray, views: np.ndarray | None = None) -> dict[str, torch.Tensor]:
        """Float32 tensors ``{tap: [B, ...]}`` for split positions and their view (``None``: view 0)."""
        ...


class MemoryViews:
    """A split's tensors held in memory as ``{tap: [N, V, ...]}`` (kept in storage dtype)."""

    def __init__(self, arrays: dict[str, torch.Tensor]) -> None:
        self.arrays = arrays
        first = next(iter(arrays.values()))
        self.num_views = first.shape[1]
        self._n = first.shape[0]

    def __len__(self) -> int:
        return self._n

    def batch(self, positions: np.ndarray, views: np.ndarray | None = None) -> dict[str, torch.Tensor]:
        pos = torch.as_tensor(np.asarray(positions, dtype=np.int64))
        view = torch.zeros_like(pos) if views is None else torch.as_tensor(np.asarray(views, dtype=np.int64))
        return {tap: t[pos, view].float() for tap, t in self.arrays.items()}


class StoreViews:
    """A split's tensors read from the store batch by batch, one orthogonal read per distinct view."""

    def __init__(self, store, names: dict[str, str], rows: np.ndarray, num_views: int) -> None:
        self.store, self.names, self.rows, self.num_views = store, names, rows, num_views

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, positions: np.ndarray, views: np.ndarray | None = None) -> dict[str, torch.Tensor]:
        positions = np.asarray(positions, dtype=np.int64)
        views = np.zeros_like(positions) if views is None else np.asarray(views, dtype=np.int64)
        return {tap: self._read(name, positions, views) for tap, name in self.names.items()}

    def _read(self, name: str, positions: np.ndarray, views: np.ndarray) -> torch.Tensor:
        arr = self.store.array(name)
        out = None
        for view in np.unique(views):
            mask = views == view
            data = read_rows_of_view(arr, self.rows[positions[mask]], int(view), name=name)
            if out is None:
                out = np.empty((len(positions),) + data.shape[1:], dtype=data.dtype)
            out[mask] = data
        return torch.from_numpy(out).float()


def read_rows_of_view(arr, rows: np.ndarray, view: int, *, name: str) -> np.ndarray:
    """``arr[rows, view]`` for rows in any order (zarr orthogonal read or h5py increasing indices)."""
    uniq, inverse = np.unique(rows, return_inverse=True)
    try:
        if hasattr(arr, "get_orthogonal_selection"):
            data = arr.get_orthogonal_selection((uniq, view) + (slice(None),) * (arr.ndim - 2))
        else:
            data = arr[list(uniq), view]
    except Exception as err:  # codec checksum, missing chunk: the store is damaged
        raise StoreError(f"cannot read {name} ({type(err).__name__}: {err}); the store may be corrupted: "
                         "run `fsl-cache cache verify KEY`") from err
    return np.asarray(data)[inverse]


def read_rows(store, name: str, rows: np.ndarray) -> np.ndarray:
    """``store.read(name, rows)`` that turns a damaged block into a :class:`StoreError`."""
    try:
        return store.read(name, rows)
    except StoreError:
        raise
    except Exception as err:
        raise StoreError(f"cannot read {name} ({type(err).__name__}: {err}); the store may be corrupted: "
                         "run `fsl-cache cache verify KEY`") from err


def open_views(store, split: SplitRef, *, policy: str, taps: tuple[str, ...],
               memory_budget: int = DEFAULT_MEMORY_BUDGET) -> ViewSource:
    """The ``taps`` of ``split`` under ``policy``: in memory if they fit ``memory_budget``, else streamed."""
    names = {tap: f"images/{split.pool}/views/{policy}/{tap}" for tap in taps}
    missing = [n for n in names.values() if not store.has(n)]
    if missing:
        raise StoreError(f"Store {store.root.name} has no {', '.join(missing)}")
    shapes = {tap: store.arrays[name]["shape"] for tap, name in names.items()}
    num_views = next(iter(shapes.values()))[1]
    if any(s[1] != num_views for s in shapes.values()):
        raise StoreError(f"Taps {', '.join(taps)} of {split.pool}/{policy} disagree on the number of views")
    if views_bytes(store, names.values(), len(split)) <= memory_budget:
        return MemoryViews({tap: torch.from_numpy(np.ascontiguousarray(read_rows(store, name, split.rows)))
                            for tap, name in names.items()})
    return StoreViews(store, names, split.rows, num_views)


def views_bytes(store, names, n: int) -> int:
    """Bytes that ``n`` rows of the arrays ``names`` take (all views)."""
    total = 0
    for name in names:
        entry = store.arrays[name]
        per_row = int(np.prod(entry["shape"][1:], dtype=np.int64)) * np.dtype(entry["dtype"]).itemsize
        total += per_row * n
    return total
