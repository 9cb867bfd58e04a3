"""Cached tensors as batches: one split, one augmentation policy, the taps a head reads.

A :class:`ViewSource` answers ``batch(positions, views)`` with float32 tensors. It holds the split
in memory when it fits the budget (the common case: pooled embeddings are kilobytes per image) and
otherwise streams each batch, so heavy maps never need to fit in RAM: from uncompressed sidecars
that the split's rows are decoded into once (:mod:`fsl_cache.store.unpacked`), or from the store
itself when they cannot be written. A streamed source reads the next batch on a thread while the
current step runs (:meth:`StoreViews.prefetch`).
"""

from __future__ import annotations

import os
import threading
import warnings
from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch

from ..errors import StoreError
from ..splits.refs import SplitRef
from ..store.reads import read_rows, read_rows_of_view
from ..store.store import FeatureStore
from ..store.unpacked import UnpackedRows, UnpackUnavailable, unpack_rows

DEFAULT_MEMORY_BUDGET = int(float(os.environ.get("FSL_FIT_MEMORY_GB", "4")) * (1 << 30))
"""Bytes of cached tensors a fit may hold in memory before it streams from the store instead."""
UNPACK = os.environ.get("FSL_FIT_UNPACK", "1") != "0"
"""Whether a streamed split is decoded once into sidecars (``FSL_FIT_UNPACK=0``: read the store every batch)."""


class ViewSource(Protocol):
    """Per-image cached tensors of one split under one policy.

    Streamed sources (:class:`StoreViews`) also offer ``prefetch(positions, views)``, which a loop
    calls with its next batch once it holds the current one.
    """

    num_views: int

    def __len__(self) -> int: ...

    def batch(self, positions: np.ndarray, views: np.ndarray | None = None) -> dict[str, torch.Tensor]:
        """Float32 tensors ``{tap: [B, ...]}`` for split positions and their view (``None``: view 0)."""
        ...


class MemoryViews:
    """A split's tensors held in memory as ``{tap: [N, V, ...]}`` (kept in storage dtype)."""

    streams = False
    """A batch is a gather in memory (cheap), not a read from the store."""

    def __init__(self, arrays: dict[str, torch.Tensor]) -> None:
        self.arrays = arrays
        first = next(iter(arrays.values()))
        self.num_views = first.shape[1]
        self._n = first.shape[0]

    def __len__(self) -> int:
        return self._n

    def batch(self, positions: np.ndarray, views: np.ndarray | None = None) -> dict[str, torch.Tensor]:
        device = next(iter(self.arrays.values())).device
        pos = torch.as_tensor(np.asarray(positions, dtype=np.int64), device=device)
        view = (
            torch.zeros_like(pos)
            if views is None
            else torch.as_tensor(np.asarray(views, dtype=np.int64), device=device)
        )
        return {tap: t[pos, view].float() for tap, t in self.arrays.items()}


class StoreViews:
    """A split's tensors read batch by batch: from sidecars for the taps in ``unpacked``, else from the store.

    :meth:`prefetch` starts reading a batch on a background thread; the :meth:`batch` call that asks
    for the same positions and views returns it, or raises what the read raised. One batch is in
    flight at a time, so a step prefetches the next batch after it has its own.
    """

    streams = True
    """A batch is read from the store (or its sidecar), worth sharing between lockstep heads."""

    def __init__(
        self,
        store,
        names: dict[str, str],
        rows: np.ndarray,
        num_views: int,
        *,
        unpacked: dict[str, UnpackedRows] | None = None,
    ) -> None:
        self.store, self.names, self.rows, self.num_views = store, names, rows, num_views
        self.unpacked = unpacked or {}
        self._pending: _Pending | None = None

    def __len__(self) -> int:
        return len(self.rows)

    def batch(self, positions: np.ndarray, views: np.ndarray | None = None) -> dict[str, torch.Tensor]:
        positions, views = _batch_index(positions, views)
        pending = self._pending
        if pending is not None and pending.matches(positions, views):
            self._pending = None
            return pending.result()
        return self._load(positions, views)

    def prefetch(self, positions: np.ndarray, views: np.ndarray | None = None) -> None:
        """Start reading ``batch(positions, views)`` on a background thread (replaces an unclaimed prefetch)."""
        positions, views = _batch_index(positions, views)
        if self._pending is not None and self._pending.matches(positions, views):
            return  # already on its way: lockstep members prefetch the same batch
        self.close()
        self._pending = _Pending(self._load, positions, views)

    def close(self) -> None:
        """Wait for a prefetch in flight and drop it; the source stays usable."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.wait()

    def _load(self, positions: np.ndarray, views: np.ndarray) -> dict[str, torch.Tensor]:
        return {tap: self._read(tap, positions, views) for tap in self.names}

    def _read(self, tap: str, positions: np.ndarray, views: np.ndarray) -> torch.Tensor:
        if tap in self.unpacked:
            return torch.from_numpy(self.unpacked[tap].read(positions, views)).float()
        name, arr = self.names[tap], self.store.array(self.names[tap])
        out = None
        for view in np.unique(views):
            mask = views == view
            data = read_rows_of_view(arr, self.rows[positions[mask]], int(view), name=name)
            if out is None:
                out = np.empty((len(positions),) + data.shape[1:], dtype=data.dtype)
            out[mask] = data
        return torch.from_numpy(out).float()


def _batch_index(positions: np.ndarray, views: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    positions = np.asarray(positions, dtype=np.int64)
    return positions, np.zeros_like(positions) if views is None else np.asarray(views, dtype=np.int64)


class _Pending:
    """One batch read on a daemon thread, which ends with the read: nothing outlives its source."""

    def __init__(self, load: Callable, positions: np.ndarray, views: np.ndarray) -> None:
        self.positions, self.views = positions.copy(), views.copy()  # the caller may reuse its arrays
        self._value: dict[str, torch.Tensor] | None = None
        self._error: Exception | None = None
        self._thread = threading.Thread(
            target=self._run, args=(load,), name="fsl-cache-prefetch", daemon=True
        )
        self._thread.start()

    def _run(self, load: Callable) -> None:
        try:
            self._value = load(self.positions, self.views)
        except Exception as err:  # raised again by result(), in the thread that asks for the batch
            self._error = err

    def matches(self, positions: np.ndarray, views: np.ndarray) -> bool:
        return np.array_equal(positions, self.positions) and np.array_equal(views, self.views)

    def wait(self) -> None:
        self._thread.join()

    def result(self) -> dict[str, torch.Tensor]:
        self.wait()
        if self._error is not None:
            raise self._error
        return self._value


def open_views(
    store,
    split: SplitRef,
    *,
    policy: str,
    taps: tuple[str, ...],
    views: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    unpack: bool = UNPACK,
    device: torch.device | None = None,
) -> ViewSource:
    """The ``taps`` of ``split`` under ``policy`` (its first ``views`` views; ``None``: all stored): in memory if
    they fit ``memory_budget`` (in GPU memory when ``device`` is a GPU with room for them), else streamed (from
    sidecars unpacked on first use when ``unpack``)."""
    names = {tap: f"images/{split.pool}/views/{policy}/{tap}" for tap in taps}
    missing = [n for n in names.values() if not store.has(n)]
    if missing:
        raise StoreError(f"Store {store.root.name} has no {', '.join(missing)}")
    shapes = {tap: store.arrays[name]["shape"] for tap, name in names.items()}
    stored = next(iter(shapes.values()))[1]
    if any(s[1] != stored for s in shapes.values()):
        raise StoreError(f"Taps {', '.join(taps)} of {split.pool}/{policy} disagree on the number of views")
    num_views = stored if views is None else min(views, stored)
    size = views_bytes(store, names.values(), len(split)) * num_views // stored
    if size <= memory_budget:
        target = device if device is not None and device.type == "cuda" and _gpu_room(device, size) else "cpu"
        return MemoryViews(
            {
                tap: torch.from_numpy(
                    np.ascontiguousarray(read_rows(store, name, split.rows)[:, :num_views])
                ).to(target)
                for tap, name in names.items()
            }
        )
    unpacked = unpack_views(store, names, split.rows) if unpack and isinstance(store, FeatureStore) else {}
    return StoreViews(store, names, split.rows, num_views, unpacked=unpacked)


def _gpu_room(device: torch.device, size: int) -> bool:
    """Whether ``size`` bytes fit on ``device`` with half of its free memory left for the head's training."""
    free, _ = torch.cuda.mem_get_info(device)
    return size <= free // 2


def unpack_views(store: FeatureStore, names: dict[str, str], rows: np.ndarray) -> dict[str, UnpackedRows]:
    """Sidecars of the arrays ``names`` (tap → array) at ``rows``; a tap whose sidecar cannot be written is left
    out, to be streamed from the store."""
    unpacked = {}
    for tap, name in names.items():
        try:
            unpacked[tap] = unpack_rows(store, name, rows)
        except UnpackUnavailable as err:
            warnings.warn(
                f"{err}; streaming from the store instead (slower; FSL_FIT_UNPACK=0 skips this check)",
                stacklevel=3,
            )
    return unpacked


def views_bytes(store, names, n: int) -> int:
    """Bytes that ``n`` rows of the arrays ``names`` take (all views)."""
    total = 0
    for name in names:
        entry = store.arrays[name]
        per_row = int(np.prod(entry["shape"][1:], dtype=np.int64)) * np.dtype(entry["dtype"]).itemsize
        total += per_row * n
    return total
