"""Finding, describing, verifying and removing the stores under a cache folder."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import StoreError, UsageError
from .location import as_location, is_remote, remove_tree, sidecar_dir, tree_bytes
from .store import MANIFEST, FeatureStore, _acquire_lock, block_digest, read_manifest


def default_cache_dir() -> Path:
    """Where stores live unless ``--cache-dir`` says otherwise: ``$FSL_CACHE_DIR`` or ``./cache``
    (a folder, or a URL such as ``s3://bucket/prefix``)."""
    return as_location(os.environ.get("FSL_CACHE_DIR", "cache"))


@dataclass(frozen=True)
class StoreEntry:
    path: Path
    key: str
    """The full fingerprint, or the key fragment of the folder name for an unfinished store."""
    dataset: str
    backbone: str
    precision: str
    format: str
    finished: bool
    bytes: int


def list_stores(cache_dir: Path) -> list[StoreEntry]:
    """Every store folder two levels below ``cache_dir`` (``<dataset>/<backbone>-<key>``)."""
    entries = []
    for folder in sorted(p for p in as_location(cache_dir).glob("*/*") if p.is_dir()):
        manifest_path = folder / MANIFEST
        size = tree_bytes(folder)
        if not manifest_path.exists():
            if (folder / "progress").exists() or (folder / ".lock").exists():
                entries.append(
                    StoreEntry(
                        folder, folder.name.rsplit("-", 1)[-1], folder.parent.name, "?", "?", "?", False, size
                    )
                )
            continue
        try:
            m = json.loads(manifest_path.read_text())
            backbone = f"{m['backbone']['arch']}/{m['backbone']['pretrained']}"
            entries.append(
                StoreEntry(
                    folder,
                    m["fingerprint"],
                    m["dataset"]["name"],
                    backbone,
                    m["precision"],
                    m["format"],
                    True,
                    size,
                )
            )
        except (ValueError, KeyError, TypeError):  # damaged: listed as unfinished, `verify` says why
            entries.append(
                StoreEntry(
                    folder, folder.name.rsplit("-", 1)[-1], folder.parent.name, "?", "?", "?", False, size
                )
            )
    return entries


def find_store(cache_dir: Path, key: str) -> StoreEntry:
    """The one store whose key starts with ``key`` (a folder path is accepted too)."""
    folder = as_location(key)
    if folder.is_dir() and (folder / MANIFEST).exists():
        manifest = read_manifest(folder)
        field = lambda *keys: _get(manifest, keys)  # noqa: E731 -- opening the store says what is wrong
        return StoreEntry(
            folder,
            field("fingerprint"),
            field("dataset", "name"),
            "",
            field("precision"),
            field("format"),
            True,
            0,
        )
    if len(key) < 4:
        raise UsageError(f"Store key '{key}' is too short; give at least 4 characters of the fingerprint")
    matches = [e for e in list_stores(cache_dir) if e.key.startswith(key)]
    if not matches:
        raise UsageError(f"No store with key '{key}' under {cache_dir}. `fsl-cache cache ls` lists them.")
    if len(matches) > 1:
        listed = ", ".join(f"{e.key[:16]} ({e.dataset})" for e in matches)
        raise UsageError(f"Store key '{key}' is ambiguous: {listed}. Give more characters.")
    return matches[0]


def _get(manifest, keys: tuple[str, ...]) -> str:
    for key in keys:
        manifest = manifest.get(key, "?") if isinstance(manifest, dict) else "?"
    return manifest if isinstance(manifest, str) else "?"


@dataclass(frozen=True)
class VerifyProblem:
    array: str
    rows: tuple[int, int]
    message: str

    def __str__(self) -> str:
        return f"{self.array} rows {self.rows[0]}..{self.rows[1] - 1}: {self.message}"


def verify_store(path: Path, *, on_array=None) -> list[VerifyProblem]:
    """Re-read every block of every array and compare it with the digest recorded when written."""
    store = FeatureStore.open(path)
    problems = []
    try:
        for name, entry in store.arrays.items():
            problems += _verify_array(store, name, entry)
            if on_array is not None:
                on_array(name)
    finally:
        store.close()
    return problems


def _verify_array(store: FeatureStore, name: str, entry: dict) -> list[VerifyProblem]:
    try:
        arr = store.array(
            name, raw=True
        )  # the digests are of the bytes written (int8 codes, not their values)
    except StoreError as err:  # missing from the arrays, another shape, a missing part file
        return [VerifyProblem(name, (0, entry["shape"][0]), str(err))]
    problems = []
    covered = 0
    for start, stop, digest in entry.get("blocks", []):
        covered += stop - start
        try:
            block = arr[start:stop]
        except Exception as err:  # a codec checksum or a truncated part file: report, keep checking
            problems.append(VerifyProblem(name, (start, stop), f"unreadable ({type(err).__name__}: {err})"))
            continue
        if block_digest(_normalise(block)) != digest:
            problems.append(
                VerifyProblem(name, (start, stop), "content differs from the digest written at extraction")
            )
    if covered != entry["shape"][0]:
        problems.append(
            VerifyProblem(name, (0, entry["shape"][0]), f"blocks cover {covered} of {entry['shape'][0]} rows")
        )
    return problems


def _normalise(block: np.ndarray) -> np.ndarray:
    if block.dtype.kind == "S":
        return np.array([b.decode("utf-8") for b in block], dtype=object)
    return block


def remove_store(entry: StoreEntry) -> None:
    if not entry.path.exists():
        raise StoreError(f"{entry.path} does not exist")
    lock = _acquire_lock(entry.path)  # never pull a store from under a running extraction
    try:
        remove_tree(entry.path)
    finally:
        lock.close()
    if is_remote(entry.path):  # its unpacked sidecars live on this machine's disk
        shutil.rmtree(sidecar_dir(entry.path, entry.key).parent, ignore_errors=True)
