"""The feature store: a fingerprinted, append-only folder of named arrays with a manifest.

Layout of one store folder::

    manifest.json            written last; lists only arrays that were written whole
    progress/<job>/<n>.json  one marker per finished shard: rows and SHA-256 of every block
    arrays.zarr/             (zarr) or parts/ + store.h5 (hdf5)
    .lock                    held by the one process that writes (flock; a lease object remotely)
    unpacked/                uncompressed copies of rows that streamed fits read (:mod:`.unpacked`)

The folder may be an fsspec URL (``s3://bucket/prefix/...``, see :mod:`.location`): zarr arrays only,
the lock is then a lease (:mod:`.lease`) and the unpacked sidecars live on local disk.

Readers trust the manifest alone, so an interrupted extraction never exposes a half-written array,
and new views are added by later extractions without touching the arrays already there.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shlex
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import StoreError
from .backend import ArraySpec, open_backend
from .fingerprint import fingerprint
from .lease import Lease, acquire_lease
from .location import as_location, is_remote, write_json_atomic
from .quantise import Dequantised, scale_name

MANIFEST = "manifest.json"
SCHEMA = 1
PRECISIONS = {"fp16": np.float16, "fp32": np.float32}
"""``--precision``: the dtype features are stored (and int8 dense maps read back) in."""


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
    skipped: list[int] = field(default_factory=list)
    """Split indices of unreadable images in the shard (``--skip-bad``), kept for a resumed run."""

    @property
    def part(self) -> str:
        return f"{self.job}/{self.shard:06d}"


class StoreWriter:
    """Writes arrays into a store folder shard by shard; :meth:`finalize` publishes the manifest."""

    def __init__(self, root: Path, *, fmt: str, manifest: dict, lock: bool = True) -> None:
        """``lock=False`` is for the extra ranks of one torchrun job, whose rank 0 holds the lock."""
        root = as_location(root)
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._lock = _acquire_lock(root) if lock else None
        self.manifest = manifest
        self.backend = open_backend(root, fmt, mode="a")
        self.progress = root / "progress"

    def close(self) -> None:
        try:
            self.backend.close()
        finally:  # a failing close (disk full) must still release the lock
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

    def _check_lock(self) -> None:
        """Before acknowledging work: a remote lease may have been taken over (a local flock cannot)."""
        if self._lock is not None:
            self._lock.check()

    def begin_shard(self, job: str, shard: int, start: int, stop: int) -> ShardBlocks:
        """Start writing one shard; it counts as written only once :meth:`commit` gets its marker."""
        return ShardBlocks(self, ShardMarker(job, shard, start, stop))

    def commit(self, marker: ShardMarker) -> None:
        self._check_lock()
        self.backend.commit_part(marker.part)
        path = self._marker_path(marker.job, marker.shard)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(path, marker.__dict__)

    def markers(self) -> list[ShardMarker]:
        found = []
        for path in sorted(self.progress.glob("**/*.json")):
            try:
                found.append(ShardMarker(**json.loads(path.read_text())))
            except (ValueError, TypeError) as err:  # written atomically, so only outside damage gets here
                raise StoreError(
                    f"Progress marker {path} is damaged ({err}); delete it and re-run to redo its shard"
                ) from err
        return found

    def forget_other_jobs(self, owner: dict[str, str]) -> None:
        """Drop markers of arrays in ``owner`` (array → job id) that another job wrote.

        An interrupted run planned with other view counts or taps (a job id covers its arrays and their
        shapes) leaves shards that, counted as done, would publish the wrong data or twice the rows;
        they are redone instead.
        """
        for marker in self.markers():
            if any(owner.get(name, marker.job) != marker.job for name in marker.digests):
                self._marker_path(marker.job, marker.shard).unlink()
                self.backend.drop_part(marker.part)

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
                raise StoreError(
                    f"array {spec.name}: {covered} of {spec.shape[0]} rows written; re-run to resume"
                )
        self.backend.finalize(specs, parts)
        arrays = self.manifest.setdefault("arrays", {})
        strings = [s.name for s in specs if s.dtype == "str"]
        text = _text_bytes(type(self.backend)(self.root, mode="r"), strings) if strings else {}
        for spec in specs:
            entry = spec.to_json()
            entry["bytes"] = text.get(spec.name, spec.nbytes)
            entry["stored_bytes"] = self.backend.stored_bytes(spec.name)
            entry["blocks"] = sorted(digests[spec.name])
            arrays[spec.name] = entry
        self.manifest["updated"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        self._check_lock()
        write_json_atomic(self.root / MANIFEST, self.manifest)
        if not is_remote(self.root):  # one PUT is whole: object storage keeps no temp files
            _remove_leftovers(self.root)
        return self.manifest


def _text_bytes(reader, names: list[str]) -> dict[str, int]:
    """UTF-8 bytes of the values of each string array ``names`` (no fixed item size to multiply), read
    back through ``reader``, which this closes."""
    try:
        return {
            name: sum(
                len(v) if isinstance(v, bytes) else len(str(v).encode())
                for v in reader.open(name)[:].reshape(-1)
            )
            for name in names
        }
    finally:
        reader.close()


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


def _remove_leftovers(root: Path) -> None:
    """Temp files of writes a killed run never finished (zarr's own ``*.partial`` chunks are left:
    finding them means walking every chunk of the store)."""
    for pattern in ("*.incomplete", "progress/**/*.incomplete", "parts/*.incomplete"):
        for path in root.glob(pattern):
            path.unlink(missing_ok=True)


_HELD_LOCKS: set = set()
"""Lock files this process holds open (see :func:`_drop_inherited_locks`)."""


def _drop_inherited_locks() -> None:
    """In a forked child (a decoding worker), close the parent's lock files.

    An flock belongs to the open file, which a fork shares: a child that outlived a killed parent
    would keep the store locked against the re-run. Closed here, the lock is the parent's alone.
    """
    for fh in _HELD_LOCKS:
        fh.close()
    _HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_drop_inherited_locks)


class _StoreLock:
    """The store's ``.lock`` held with flock, naming its holder inside for whoever is refused."""

    def __init__(self, fh) -> None:
        self.fh = fh
        _HELD_LOCKS.add(fh)

    def check(self) -> None:
        """Held until closed: the kernel releases a flock only with its process."""

    def close(self) -> None:
        _HELD_LOCKS.discard(self.fh)
        try:
            self.fh.truncate(0)  # names nobody once released
        finally:
            self.fh.close()


def _acquire_lock(root: Path) -> _StoreLock | Lease:
    if is_remote(root):
        return acquire_lease(root)
    fh = open(root / ".lock", "a+")
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fh.seek(0)
        holder = _describe_holder(fh.read())
        fh.close()
        raise StoreError(
            f"Another process is writing {root}{holder}; wait for it to finish (or stop it) and re-run"
        ) from None
    fh.seek(0)
    fh.truncate()
    command = shlex.join(sys.orig_argv)
    holder = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "command": command if len(command) <= 200 else command[:199] + "…",
        "since": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    json.dump(holder, fh)
    fh.flush()
    return _StoreLock(fh)


def _describe_holder(text: str) -> str:
    """``: pid 123 on host, since …, running `…``` from the lock file (empty if it names nobody)."""
    try:
        h = json.loads(text)
        return f": pid {h['pid']} on {h['host']}, since {h['since']}, running `{h['command']}`"
    except (ValueError, KeyError, TypeError):  # written by an older version, or being written now
        return ""


class FeatureStore:
    """Read access to a finished store. Only arrays listed in the manifest are visible."""

    def __init__(self, root: Path, manifest: dict) -> None:
        self.root = as_location(root)
        self.manifest = manifest
        self.backend = open_backend(root, manifest["format"], mode="r")
        self.quantised = _present_dequantised(manifest)
        """Int8 dense maps (name → its scales), listed in ``arrays`` with the dtype they read as."""

    @classmethod
    def open(cls, root: str | Path) -> FeatureStore:
        root = as_location(root)
        path = root / MANIFEST
        if not path.exists():
            raise StoreError(f"{root} is not a finished feature store (no {MANIFEST}); re-run the extraction")
        manifest = read_manifest(root)
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

    def array(self, name: str, *, raw: bool = False) -> Any:
        """The lazy array (zarr array or h5py dataset) behind ``name``, checked against the manifest;
        an int8 dense map reads dequantised unless ``raw`` (its stored codes, as ``verify`` hashes them)."""
        if name in self.quantised and not raw:
            return Dequantised(
                self.array(name, raw=True), self.array(self.quantised[name]), self.arrays[name]["dtype"]
            )
        if name not in self.arrays:
            raise StoreError(f"Store {self.root.name} has no array '{name}'")
        try:
            arr = self.backend.open(name)
        except StoreError:
            raise
        except Exception as err:  # KeyError from zarr, OSError from h5py
            raise StoreError(
                f"{self._damaged(name)}: listed in the manifest but not readable from the "
                f"{self.manifest['format']} arrays ({type(err).__name__}: {err}); {REMEDY}"
            ) from err
        entry = self.arrays[name]
        if tuple(arr.shape) != tuple(entry["shape"]):
            raise StoreError(
                f"{self._damaged(name)}: shape {tuple(arr.shape)} on disk but {tuple(entry['shape'])} "
                f"in the manifest; {REMEDY}"
            )
        stored = entry.get("stored_dtype", entry["dtype"])
        if stored != "str" and str(np.dtype(arr.dtype)) != stored:
            raise StoreError(
                f"{self._damaged(name)}: dtype {arr.dtype} on disk but {stored} in the manifest; {REMEDY}"
            )
        return arr

    def _damaged(self, name: str) -> str:
        return f"Store {self.root} is damaged: array '{name}'"

    def _bad_rows(self, arr: Any, name: str, rows: np.ndarray | None) -> str:
        """The first written block (of those ``rows`` touch) that cannot be read, as ``rows a..b``."""
        for start, stop, _ in self.arrays[name].get("blocks", []):
            if rows is not None and not ((rows >= start) & (rows < stop)).any():
                continue
            try:
                arr[start:stop]
            except Exception:
                return f"rows {start}..{stop - 1}"
        return f"rows 0..{arr.shape[0] - 1}"

    def read(self, name: str, rows: np.ndarray | None = None) -> np.ndarray:
        """Read all of ``name``, or the given rows (any order, repeats allowed) along axis 0."""
        arr = self.array(name)
        if rows is not None:
            rows = np.asarray(rows, dtype=np.int64)
        try:
            if rows is None:
                data = arr[...]
            else:
                uniq, inverse = np.unique(rows, return_inverse=True)
                data = _read_rows(arr, uniq)[inverse]
        except IndexError:
            raise  # rows out of range: the caller's mistake, not the store's
        except Exception as err:  # a chunk checksum (zarr ValueError, HDF5 OSError), a truncated file
            raise StoreError(
                f"{self._damaged(name)}, {self._bad_rows(arr, name, rows)}: {type(err).__name__}: "
                f"{err}. `fsl-cache cache verify` lists every damaged block; {REMEDY}"
            ) from err
        if data.dtype.kind == "S":
            return np.array([s.decode("utf-8") for s in data.reshape(-1)], dtype=object).reshape(data.shape)
        if data.dtype.kind == "T":
            return data.astype(object)
        return data

    def close(self) -> None:
        self.backend.close()


def _present_dequantised(manifest: dict) -> dict[str, str]:
    """Re-type the int8 dense maps (those with scales beside them) in ``manifest`` to the store's precision."""
    arrays = manifest["arrays"]
    quantised = {n: scale_name(n) for n in arrays if "/views/" in n and scale_name(n) in arrays}
    for name in quantised:
        entry = arrays[name]
        entry.setdefault("stored_dtype", entry["dtype"])
        entry["dtype"] = np.dtype(PRECISIONS[manifest.get("precision", "fp16")]).name
    return quantised


def _read_rows(arr: Any, sorted_rows: np.ndarray) -> np.ndarray:
    n = len(sorted_rows)
    if (
        n
        and 0 <= sorted_rows[0]
        and sorted_rows[-1] < arr.shape[0]
        and sorted_rows[-1] - sorted_rows[0] < n + n // 4
    ):
        # dense rows (a sequential pass, an unpack): a slice reads 3-4x faster than zarr's integer selection,
        # for at most a quarter more rows held for a moment
        lo, hi = int(sorted_rows[0]), int(sorted_rows[-1]) + 1
        block = arr[lo:hi]
        return block if hi - lo == n else block[sorted_rows - lo]
    if hasattr(arr, "get_orthogonal_selection"):
        return arr.get_orthogonal_selection((sorted_rows,) + (slice(None),) * (arr.ndim - 1))
    return arr[sorted_rows]


REMEDY = "remove the store (fsl-cache cache rm KEY) and extract again"


def read_manifest(root: Path) -> Any:
    """The parsed ``manifest.json`` of ``root``; a :class:`StoreError` if it is not JSON."""
    path = root / MANIFEST
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, OSError) as err:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise StoreError(f"{path} is corrupted ({err}); {REMEDY}") from err


def _well_formed(entry: Any) -> bool:
    """An array entry with the fields readers and ``verify`` rely on: shape, dtype, [start, stop, digest] blocks."""
    if not (
        isinstance(entry, dict)
        and isinstance(entry.get("shape"), list)
        and entry["shape"]
        and all(type(n) is int for n in entry["shape"])
        and isinstance(entry.get("dtype"), str)
    ):
        return False
    blocks = entry.get("blocks", [])
    return isinstance(blocks, list) and all(
        isinstance(b, list)
        and len(b) == 3
        and type(b[0]) is int
        and type(b[1]) is int
        and isinstance(b[2], str)
        for b in blocks
    )


def check_manifest(root: Path, manifest: dict) -> None:
    """Refuse a store whose manifest does not hash to its own key or folder name."""
    if not isinstance(manifest, dict):
        raise StoreError(f"{root}: manifest is not a JSON object; the store is corrupted or foreign")
    for key, kind in (
        ("schema", int),
        ("fingerprint", str),
        ("fingerprint_parts", dict),
        ("format", str),
        ("arrays", dict),
    ):
        if key not in manifest:
            raise StoreError(f"{root}: manifest lacks '{key}'; the store is corrupted or foreign")
        if not isinstance(manifest[key], kind):
            raise StoreError(
                f"{root}: manifest '{key}' is not a {kind.__name__}; the store is corrupted or foreign"
            )
    for name, entry in manifest["arrays"].items():
        if not _well_formed(entry):
            raise StoreError(f"{root}: manifest entry of array '{name}' is malformed; the store is corrupted")
    if manifest["schema"] != SCHEMA:
        raise StoreError(f"{root}: store schema {manifest['schema']} is not supported (expected {SCHEMA})")
    try:
        own = fingerprint(manifest["fingerprint_parts"])
    except TypeError as err:  # NaN or Infinity in the parts
        raise StoreError(
            f"{root}: manifest fingerprint parts cannot be hashed ({err}); the store was altered"
        ) from err
    if own != manifest["fingerprint"]:
        raise StoreError(f"{root}: manifest fingerprint does not match its contents; the store was altered")
    if not root.name.endswith(manifest["fingerprint"][:16]):
        raise StoreError(f"{root}: folder name does not carry the store key {manifest['fingerprint'][:16]}")
