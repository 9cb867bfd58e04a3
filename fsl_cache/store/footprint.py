"""What arrays take on disk, not only their bytes: every file rounded up to whole file-system blocks,
and the directories and metadata around them.

A store of small arrays is mostly such overhead: a zarr chunk is one file, every level of its chunk
key (``c/0/0/0``) a directory, a progress marker a file, each at least one block (4 KiB on ext4,
xfs and tmpfs). The figures are upper bounds: codecs only shrink the arrays, and the zstd bound is
counted for compressed ones.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from .backend import ArraySpec

DIR_ENTRY = 64
"""Bytes per directory entry (ext4: 8 + the name rounded up to 4; part file names run to ~50)."""
SMALL_FILE = 2048
"""A zarr.json, a progress marker, a group's metadata: under this, and one block however small."""
HDF5_FILE = 2048
"""An HDF5 file's own structure: superblock, root group, its heap and B-tree."""
HDF5_DATASET = 4096
"""One chunked HDF5 dataset: its object header, chunk index and the groups its name nests in."""
HDF5_MAPPING = 256
"""One virtual-dataset mapping in ``store.h5`` (source file and dataset names, selections)."""
CHECKSUM = 4
"""CRC32C (zarr) or Fletcher-32 (HDF5) per chunk."""


def file_bytes(size: int, block: int) -> int:
    """A file of ``size`` bytes on disk: whole blocks, at least one."""
    return max(1, -(-size // block)) * block


def dir_bytes(entries: int, block: int) -> int:
    return file_bytes(entries * DIR_ENTRY, block)


def _payload(spec: ArraySpec, chunk_items: int, string_bytes: int) -> int:
    """Bytes of one chunk as written: zstd's worst-case bound when compressed, plus its checksum."""
    if spec.dtype == "str":  # zarr vlen-utf8 (4-byte lengths) or HDF5 fixed width: string_bytes per item
        raw = chunk_items * string_bytes
    else:
        raw = chunk_items * ArraySpec(spec.name, (1,), spec.dtype, (1,)).nbytes
    if spec.codec == "zstd1" or spec.dtype == "str":
        raw += raw // 256 + 512  # ZSTD_COMPRESSBOUND, rounded up
    return raw + CHECKSUM


def zarr_array(spec: ArraySpec, *, block: int, string_bytes: int = 0) -> int:
    """One zarr v3 array: its folder and zarr.json, the ``c/i/j/...`` folders and a file per chunk
    (edge chunks are stored whole)."""
    grid = [-(-n // c) for n, c in zip(spec.shape, spec.chunks)]
    chunk = _payload(spec, math.prod(spec.chunks), string_bytes)
    total = dir_bytes(2, block) + file_bytes(SMALL_FILE, block)  # the array folder: zarr.json and c/
    for level in range(len(grid)):  # c/ holds grid[0] entries; each c/i holds grid[1]; ...
        total += math.prod(grid[:level]) * dir_bytes(grid[level], block)
    return total + math.prod(grid) * file_bytes(chunk, block)


def zarr_groups(names: Sequence[str], *, existing: Sequence[str], block: int) -> int:
    """The group folders (with their zarr.json) that arrays ``names`` add to those ``existing`` need."""

    def groups(name: str) -> set[str]:
        parts = name.split("/")[:-1]
        return {"/".join(parts[: i + 1]) for i in range(len(parts))} | {""}

    new = set().union(*map(groups, names)) - set().union(set(), *map(groups, existing))
    return len(new) * (dir_bytes(16, block) + file_bytes(SMALL_FILE, block))


def hdf5_part(arrays: Sequence[tuple[ArraySpec, int]], *, block: int, string_bytes: int = 0) -> int:
    """One part file holding ``rows`` of each array (its chunks along axis 0 padded whole)."""
    size = HDF5_FILE
    for spec, rows in arrays:
        chunk_rows = min(spec.chunks[0], rows)
        inner = [-(-n // c) for n, c in zip(spec.shape[1:], spec.chunks[1:])]
        count = -(-rows // chunk_rows) * math.prod(inner)
        chunk = _payload(spec, chunk_rows * math.prod(spec.chunks[1:]), string_bytes)
        size += HDF5_DATASET + count * chunk
    return file_bytes(size, block)


def hdf5_master(specs: Sequence[ArraySpec], *, mappings: int, block: int) -> int:
    """``store.h5``: one virtual dataset per array, one mapping per part block."""
    return file_bytes(HDF5_FILE + len(specs) * HDF5_DATASET + mappings * HDF5_MAPPING, block)
