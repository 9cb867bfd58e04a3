"""The feature store: a fingerprinted, append-only folder of named arrays with a manifest.

Layout of one store folder::

    manifest.json            written last; lists only arrays that were written whole
    progress/<job>/<n>.json  one marker per finished shard: rows and SHA-256 of every block
    arrays.zarr/             (zarr) or parts/ + store.h5 (hdf5)
    .lock                    held by the one process that writes

Readers trust the manifest alone, so an interrupted extraction never exposes a half-written array,
and new views are added by later extractions without touching the arrays already there.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import StoreError
from .backend import ArraySpec, open_backend
from .fingerprint import fingerprint

MANIFEST = "manifest.json"
SCHEMA = 1


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write JSON to ``path`` whole or not at all (temp file, fsync, rename)."""
    tmp = path.with_name(path.name + ".incomplete")
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def block_digest(data: np.ndarray) -> str:
    return _update_digest(hashlib.sha256(), data).hexdigest()


def _update_digest(digest, data: np.ndarray):
    if data.dtype.kind in "OUT" or data.dtype.kind == "S":
        digest.update("\0".join(_as_str(s) for s in data.reshape(-1)).encode("utf-8") + b"\0")
    else:
        digest.update(np.ascontiguousarray(data).tobytes())
    return digest


def _as_str(value) -> str:
    return value.decode("utf-8") if isinstance(value, bytes) else str(value)


@dataclass
class ShardMarker:
    """What one finished shard wrote: its rows and the digest of each array's block."""

    job: str
    shard: int
    start: int
    stop: int
    digests: dict[str, str] = field(default_factory=dict)

    @property
    def part(self) -> str:
        return f"{self.job}/{self.shard:06d}"


class StoreWriter:
    """Writes arrays into a store folder shard by shard; :meth:`finalize` publishes the manifest."""

    def __init__(self, root: Path, *, fmt: str, manifest: dict, lock: bool = True) -> None:
        """``lock=False`` is for the extra ranks of one torchrun job, whose rank 0 holds the lock."""
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._lock = _acquire_lock(root) if lock else None
        self.manifest = manifest
        self.backend = open_backend(root, fmt, mode="a")
        self.progress = root / "progress"

    def close(self) -> None:
        self.backend.close()
        if self._lock is not None:
            self._lock.close()

    def create(self, spec: ArraySpec) -> None:
        self.backend.create(spec)

    def _marker_path(self, job: str, shard: int) -> Path:
        return self.progress / job / f"{shard:06d}.json"

    def is_done(self, job: str, shard: int) -> bool:
        return self._marker_path(job, shard).exists()

    def write_whole(self, spec: ArraySpec, data: np.ndarray) -> None:
        """Write a small array in one block (labels, paths, text weights, split indices)."""
        job = "whole/" + spec.name.replace("/", ".")
        if self.is_done(job, 0):
            return
        self.create(spec)
        marker = ShardMarker(job, 0, 0, len(data))
        self.backend.write_block(spec, 0, data, part=marker.part, part_rows=(0, len(data)))
        marker.digests[spec.name] = block_digest(data)
        self.commit(marker)

    def begin_shard(self, job: str, shard: int, start: int, stop: int) -> "ShardBlocks":
        """Start writing one shard; it counts as written only once :meth:`commit` gets its marker."""
        return ShardBlocks(self, ShardMarker(job, shard, start, stop))

    def commit(self, marker: ShardMarker) -> None:
        self.backend.commit_part(marker.part)
        path = self._marker_path(marker.job, marker.shard)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, marker.__dict__)

    def markers(self) -> list[ShardMarker]:
        found = []
        for path in sorted(self.progress.glob("**/*.json")):
            found.append(ShardMarker(**json.loads(path.read_text())))
        return found

    def finalize(self, specs: list[ArraySpec]) -> dict:
        """Assemble and publish: every array in ``specs`` must be covered by finished shards."""
        parts: dict[str, list[tuple[str, int, int]]] = {s.name: [] for s in specs}
        digests: dict[str, list] = {s.name: [] for s in specs}
        for marker in self.markers():
            for name, digest in marker.digests.items():
                if name in parts:
                    parts[name].append((marker.part, marker.start, marker.stop))
                    digests[name].append([marker.start, marker.stop, digest])
        for spec in specs:
            covered = sum(stop - start for _, start, stop in parts[spec.name])
            if covered != spec.shape[0]:
                raise StoreError(f"array {spec.name}: {covered} of {spec.shape[0]} rows written; re-run to resume")
        self.backend.finalize(specs, parts)
        arrays = self.manifest.setdefault("arrays", {})
        for spec in specs:
            entry = spec.to_json()
            entry["bytes"] = spec.nbytes
            entry["stored_bytes"] = self.backend.stored_bytes(spec.name)
            entry["blocks"] = sorted(digests[spec.name])
            arrays[spec.name] = entry
        self.manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        write_json_atomic(self.root / MANIFEST, self.manifest)
        return self.manifest


class ShardBlocks:
    """The blocks of one shard as they are written batch by batch, with running digests."""

    def __init__(self, writer: StoreWriter, marker: ShardMarker) -> None:
        self.writer = writer
        self.marker = marker
        self._digests: dict[str, Any] = {}

    def write(self, spec: ArraySpec, row: int, data: np.ndarray) -> None:
        """Write ``data`` at absolute ``row``; batches of a shard must arrive in row order."""
        rows = (self.marker.start, self.marker.stop)
        self.writer.backend.write_block(spec, row, data, part=self.marker.part, part_rows=rows)
        _update_digest(self._digests.setdefault(spec.name, hashlib.sha256()), data)

    def finish(self) -> ShardMarker:
        self.marker.digests = {name: d.hexdigest() for name, d in self._digests.items()}
        return self.marker


def _acquire_lock(root: Path):
    fh = open(root / ".lock", "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.close()
        raise StoreError(f"Another process is writing {root}; wait for it to finish (or stop it) and re-run")
    return fh


class FeatureStore:
    """Read access to a finished store. Only arrays listed in the manifest are visible."""

    def __init__(self, root: Path, manifest: dict) -> None:
        self.root = root
        self.manifest = manifest
        self.backend = open_backend(root, manifest["format"], mode="r")

    @classmethod
    def open(cls, root: str | Path) -> "FeatureStore":
        root = Path(root)
        path = root / MANIFEST
        if not path.exists():
            raise StoreError(f"{root} is not a finished feature store (no {MANIFEST}); re-run the extraction")
        try:
            manifest = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise StoreError(f"{path} is corrupted ({err}); remove the store and extract again") from err
        check_manifest(root, manifest)
        return cls(root, manifest)

    @property
    def fingerprint(self) -> str:
        return self.manifest["fingerprint"]

    @property
    def arrays(self) -> dict[str, dict]:
        return self.manifest["arrays"]

    @property
    def classnames(self) -> list[str]:
        return self.manifest["dataset"]["classnames"]

    def has(self, name: str) -> bool:
        return name in self.arrays

    def array(self, name: str) -> Any:
        """The lazy array (zarr array or h5py dataset) behind ``name``."""
        if name not in self.arrays:
            raise StoreError(f"Store {self.root.name} has no array '{name}'")
        return self.backend.open(name)

    def read(self, name: str, rows: np.ndarray | None = None) -> np.ndarray:
        """Read all of ``name``, or the given rows (any order, repeats allowed) along axis 0."""
        arr = self.array(name)
        if rows is None:
            data = arr[...]
        else:
            rows = np.asarray(rows, dtype=np.int64)
            uniq, inverse = np.unique(rows, return_inverse=True)
            data = _read_rows(arr, uniq)[inverse]
        if data.dtype.kind == "S":
            return np.array([s.decode("utf-8") for s in data.reshape(-1)], dtype=object).reshape(data.shape)
        if data.dtype.kind == "T":
            return data.astype(object)
        return data

    def close(self) -> None:
        self.backend.close()


def _read_rows(arr: Any, sorted_rows: np.ndarray) -> np.ndarray:
    if hasattr(arr, "get_orthogonal_selection"):
        return arr.get_orthogonal_selection((sorted_rows,) + (slice(None),) * (arr.ndim - 1))
    return arr[sorted_rows]


def check_manifest(root: Path, manifest: dict) -> None:
    """Refuse a store whose manifest does not hash to its own key or folder name."""
    for key in ("schema", "fingerprint", "fingerprint_parts", "format", "arrays"):
        if key not in manifest:
            raise StoreError(f"{root}: manifest lacks '{key}'; the store is corrupted or foreign")
    if manifest["schema"] != SCHEMA:
        raise StoreError(f"{root}: store schema {manifest['schema']} is not supported (expected {SCHEMA})")
    if fingerprint(manifest["fingerprint_parts"]) != manifest["fingerprint"]:
        raise StoreError(f"{root}: manifest fingerprint does not match its contents; the store was altered")
    if not root.name.endswith(manifest["fingerprint"][:16]):
        raise StoreError(f"{root}: folder name does not carry the store key {manifest['fingerprint'][:16]}")
