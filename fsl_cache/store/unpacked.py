"""Unpacked sidecars: rows of a store array decoded once into a plain ``.npy`` file, read through a memory map.

A fit that streams heavy maps (its split does not fit the memory budget) gathers random rows every
step, and from the store each row decodes a whole compressed multi-sample chunk. Decoding the
split's rows once, chunk after chunk in order, into an uncompressed row-major file makes every
later gather a copy out of the page cache. Inside the store folder::

    unpacked/<array>-<rows key>.npy           the rows (sorted, distinct), written whole then renamed
    unpacked/<array>-<rows key>.json          where they came from: store key, array entry, rows
    unpacked/<array>-<rows key>.lock          held while one process builds the file

A sidecar is trusted only when its record matches the store, the array's manifest entry and the rows;
anything else (a killed build, another version of the array) is rebuilt. ``cache rm`` removes the
sidecars with their store and ``cache verify`` reads only the manifest's arrays.

A store on object storage gets its ``unpacked/`` folder on local disk instead, under
``$FSL_SIDECAR_DIR/<store key>/`` (:func:`~.location.sidecar_dir`): memory maps need local files,
and the processes of one machine then share one unpacking.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np

from ..errors import StoreError
from .location import sidecar_dir, write_json_atomic

BLOCK_BYTES = 64 << 20
"""Rows decoded and written per step, so unpacking holds a bounded amount of memory."""
SPARE_BYTES = 1 << 30
"""Free space an unpack leaves on the disk (other writers, the run records)."""


class UnpackUnavailable(StoreError):
    """A sidecar cannot be written (disk too small, read-only store folder); the caller streams instead."""


class UnpackedRows:
    """Some rows of one store array, decoded, read by position in the ``rows`` they were unpacked for."""

    def __init__(self, path: Path, data: np.ndarray, inverse: np.ndarray) -> None:
        self.path = path
        self._data = data  # [distinct rows, ...], memory-mapped
        self._inverse = inverse  # position in ``rows`` -> row of ``_data``

    def __len__(self) -> int:
        return len(self._inverse)

    def read(self, positions: np.ndarray, views: np.ndarray | None = None) -> np.ndarray:
        """``array[rows[positions]]``, or ``array[rows[positions], views]``, for positions in any order."""
        index = self._inverse[np.asarray(positions, dtype=np.int64)]
        if views is None:
            return self._data[index]
        return self._data[index, np.asarray(views, dtype=np.int64)]


def unpack_rows(store, name: str, rows: np.ndarray, *, block_bytes: int = BLOCK_BYTES) -> UnpackedRows:
    """Rows ``rows`` of store array ``name`` from their sidecar, unpacking them first if it is missing or stale.

    Raises :class:`UnpackUnavailable` when the disk lacks room or the store folder is not writable,
    and :class:`StoreError` when the store's own data is damaged.
    """
    uniq, inverse = np.unique(np.asarray(rows, dtype=np.int64), return_inverse=True)
    record = _record(store, name, uniq)
    path = sidecar_dir(store.root, store.fingerprint) / f"{name.replace('/', '.')}-{record['rows'][:16]}.npy"
    data = _open(path, record)
    if data is None:
        data = _build_locked(store, name, uniq, path, record, block_bytes)
    return UnpackedRows(path, data, inverse.reshape(-1))


def _record(store, name: str, uniq: np.ndarray) -> dict:
    """What a sidecar of ``uniq`` rows of ``name`` must have been unpacked from."""
    entry = store.arrays[name]
    blocks = json.dumps(entry.get("blocks", []), sort_keys=True).encode()
    return {
        "store": store.fingerprint,
        "array": name,
        "shape": [len(uniq)] + list(entry["shape"][1:]),
        "dtype": entry["dtype"],
        "blocks": hashlib.sha256(blocks).hexdigest(),
        "rows": hashlib.sha256(uniq.tobytes()).hexdigest(),
    }


def _open(path: Path, record: dict) -> np.ndarray | None:
    """The memory-mapped sidecar at ``path`` if it was unpacked from ``record``; ``None`` otherwise."""
    try:
        if json.loads(path.with_suffix(".json").read_text()) != record:
            return None
        data = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError):  # absent, a damaged record, a header or size that does not add up
        return None
    if list(data.shape) != record["shape"] or str(data.dtype) != record["dtype"]:
        return None
    return np.asarray(data)  # plain ndarray over the map: gathers return plain arrays


def _build_locked(
    store, name: str, uniq: np.ndarray, path: Path, record: dict, block_bytes: int
) -> np.ndarray:
    """Unpack under the sidecar's lock; a process that waited on it reuses what the holder built."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = open(path.with_suffix(".lock"), "a+")
    except OSError as err:
        raise UnpackUnavailable(f"Cannot write sidecars in {path.parent} ({err.strerror})") from err
    with lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = _open(path, record)
        if data is None:
            _build(store, name, uniq, path, record, block_bytes)
            data = _open(path, record)
    if data is None:
        raise StoreError(f"Sidecar {path} does not read back as written; remove {path.parent} and re-run")
    return data


def _build(store, name: str, uniq: np.ndarray, path: Path, record: dict, block_bytes: int) -> None:
    """Write the rows ``uniq`` of ``name`` to ``path`` block by block: ``*.incomplete``, record, rename."""
    path.unlink(missing_ok=True)  # never let a new record sit beside an old file
    path.with_suffix(".json").unlink(missing_ok=True)
    dtype = np.dtype(record["dtype"])
    row_bytes = int(np.prod(record["shape"][1:], dtype=np.int64)) * dtype.itemsize
    _check_space(path.parent, len(uniq) * row_bytes, name)
    tmp = path.with_name(path.name + ".incomplete")
    header = {
        "descr": np.lib.format.dtype_to_descr(dtype),
        "fortran_order": False,
        "shape": tuple(record["shape"]),
    }
    chunk_rows = int(store.arrays[name].get("chunks", [1])[0])
    try:
        with open(tmp, "wb") as fh:
            np.lib.format.write_array_header_2_0(fh, header)
            for block in _blocks(uniq, chunk_rows=chunk_rows, limit=max(1, block_bytes // max(row_bytes, 1))):
                np.ascontiguousarray(store.read(name, block), dtype=dtype).tofile(fh)
            fh.flush()
            os.fsync(fh.fileno())  # data on disk before the rename makes it trusted
        write_json_atomic(path.with_suffix(".json"), record)
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, OSError):  # disk full, quota, read-only: the store's own reads raise StoreError
            raise UnpackUnavailable(
                f"Cannot unpack {name} into {path.parent} ({err.strerror or err})"
            ) from err
        raise


def _check_space(folder: Path, need: int, name: str) -> None:
    free = shutil.disk_usage(folder).free
    if need + SPARE_BYTES > free:
        raise UnpackUnavailable(
            f"Unpacking {name} needs {need / 1e9:.1f} GB (+{SPARE_BYTES / 1e9:.0f} GB spare) "
            f"in {folder}, {free / 1e9:.1f} GB are free"
        )


def _blocks(uniq: np.ndarray, *, chunk_rows: int, limit: int):
    """Sorted rows in blocks of at most ``limit``, cut at chunk boundaries where possible so each chunk decodes once."""
    start = 0
    while start < len(uniq):
        stop = min(start + limit, len(uniq))
        if stop < len(uniq):
            chunk_start = np.searchsorted(uniq, uniq[stop] // chunk_rows * chunk_rows)
            stop = int(chunk_start) if chunk_start > start else stop  # a chunk larger than a block is cut
        yield uniq[start:stop]
        start = stop
