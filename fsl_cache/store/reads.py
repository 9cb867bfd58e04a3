"""Reads that turn a damaged block (codec checksum, missing chunk) into a :class:`StoreError` that says what to do."""

from __future__ import annotations

import numpy as np

from ..errors import StoreError


def read_rows_of_view(arr, rows: np.ndarray, view: int, *, name: str) -> np.ndarray:
    """``arr[rows, view]`` for rows in any order (zarr orthogonal read or h5py increasing indices)."""
    uniq, inverse = np.unique(rows, return_inverse=True)
    try:
        if hasattr(arr, "get_orthogonal_selection"):
            data = arr.get_orthogonal_selection((uniq, view) + (slice(None),) * (arr.ndim - 2))
        else:
            data = arr[list(uniq), view]
    except Exception as err:  # codec checksum, missing chunk: the store is damaged
        raise StoreError(
            f"cannot read {name} ({type(err).__name__}: {err}); the store may be corrupted: "
            "run `fsl-cache cache verify KEY`"
        ) from err
    return np.asarray(data)[inverse]


def read_rows(store, name: str, rows: np.ndarray) -> np.ndarray:
    """``store.read(name, rows)`` that turns a damaged block into a :class:`StoreError`."""
    try:
        return store.read(name, rows)
    except StoreError:
        raise
    except Exception as err:
        raise StoreError(
            f"cannot read {name} ({type(err).__name__}: {err}); the store may be corrupted: "
            "run `fsl-cache cache verify KEY`"
        ) from err
