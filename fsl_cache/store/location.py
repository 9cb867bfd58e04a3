"""Where a cache folder lives: a local folder, or an fsspec URL (``s3://bucket/prefix``) on object storage.

Local folders stay plain :class:`~pathlib.Path` objects. A URL becomes a :class:`upath.UPath`, which
offers the same ``/``, ``glob``, ``exists`` and ``read_text`` over the fsspec file system, so the
store's layout code is one for both. What differs is here: atomic writes (one object PUT is already
whole), removing and sizing a tree, and where the local sidecars of a remote store go.

Credentials and endpoints come from the file system's own configuration: for S3 the standard
``AWS_*`` variables (``AWS_ENDPOINT_URL`` for a non-AWS endpoint) or fsspec's ``FSSPEC_S3_*``.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from ..errors import StoreError

UNPACKED = "unpacked"
SIDECAR_DIR_ENV = "FSL_SIDECAR_DIR"
"""Local folder for the unpacked sidecars of remote stores (default ``~/.cache/fsl-cache/sidecars``)."""


def is_remote(path: Any) -> bool:
    """``True`` for an fsspec URL (or a path made from one), other than ``file://``."""
    text = str(path)
    return "://" in text and not text.startswith(("file://", "local://"))


def as_location(path: str | os.PathLike) -> Any:
    """``path`` as a :class:`Path`, or as a :class:`upath.UPath` when it is a URL."""
    if not is_remote(path):
        return Path(path)
    if not isinstance(path, str):
        return path  # already a UPath
    try:
        from upath import UPath

        # no listing cache: markers, locks and stores written by other processes must show up at once
        return UPath(path, use_listings_cache=False)
    except (ImportError, ValueError) as err:  # fsspec names the package a protocol needs
        raise StoreError(
            f"Cannot open {path}: {err}. Stores on object storage need the s3 extra: "
            "pip install 'fsl-cache[s3]'"
        ) from err


def write_json_atomic(path: Any, obj: Any) -> None:
    """Write JSON to ``path`` whole or not at all: temp file, fsync and rename on disk; one PUT remotely."""
    if is_remote(path):
        path.write_text(json.dumps(obj, indent=1, sort_keys=True))
        return
    tmp = path.with_name(path.name + ".incomplete")
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=1, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def tree_bytes(path: Any, *, skip_suffix: str = "") -> int:
    """Bytes of the files under ``path`` (or of ``path`` itself), less those ending in ``skip_suffix``."""
    if is_remote(path):
        sizes = path.fs.find(path.path, detail=True).values() if path.exists() else []
        return sum(
            int(i.get("size") or 0) for i in sizes if not (skip_suffix and i["name"].endswith(skip_suffix))
        )
    if path.is_file():
        return path.stat().st_size
    return sum(
        p.stat().st_size
        for p in path.rglob("*")
        if p.is_file() and not (skip_suffix and p.name.endswith(skip_suffix))
    )


def remove_tree(path: Any) -> None:
    if is_remote(path):
        path.fs.rm(path.path, recursive=True)
    else:
        shutil.rmtree(path)


def sidecar_dir(store_root: Any, key: str) -> Path:
    """Where the unpacked sidecars of a store go: inside a local store, and for a remote one under
    ``$FSL_SIDECAR_DIR`` (default ``~/.cache/fsl-cache/sidecars``) in a folder named by its store key,
    so every process on one machine shares them and a store's content (its key) never mixes with another's."""
    if not is_remote(store_root):
        return Path(store_root) / UNPACKED
    base = os.environ.get(SIDECAR_DIR_ENV) or Path.home() / ".cache" / "fsl-cache" / "sidecars"
    return Path(base) / key[:16] / UNPACKED
