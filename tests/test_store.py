"""The store contract, run against both backends: blocks, manifest, digests, refusal of foreign stores."""

import json

import h5py
import numpy as np
import pytest

from fsl_cache.errors import StoreError
from fsl_cache.store import ArraySpec, FeatureStore, StoreWriter, fingerprint, verify_store
from fsl_cache.store.fingerprint import store_dirname
from fsl_cache.store.store import SCHEMA


def _manifest(fmt: str) -> tuple[str, dict]:
    parts = {"test": fmt}
    key = fingerprint(parts)
    return key, {
        "schema": SCHEMA,
        "fingerprint": key,
        "fingerprint_parts": parts,
        "format": fmt,
        "precision": "fp16",
    }


def _write(tmp_path, fmt: str, *, shards=((0, 3), (3, 5))):
    key, manifest = _manifest(fmt)
    root = tmp_path / store_dirname(arch="a", weights="w", precision="fp16", key=key)
    feats = np.arange(5 * 2 * 4, dtype=np.float16).reshape(5, 2, 4)
    feat_spec = ArraySpec("images/test/views/center/pooled", (5, 2, 4), "float16", (3, 2, 4))
    path_spec = ArraySpec("images/test/paths", (5,), "str", (5,))
    writer = StoreWriter(root, fmt=fmt, manifest=manifest)
    try:
        writer.write_whole(path_spec, np.array(["a.jpg", "b c.png", "ü.jpg", "d", "e"], dtype=object))
        writer.create(feat_spec)
        for shard, (start, stop) in enumerate(shards):
            blocks = writer.begin_shard("job", shard, start, stop)
            for row in range(start, stop):  # one batch per row: blocks must assemble in order
                blocks.write(feat_spec, row, feats[row : row + 1])
            writer.commit(blocks.finish())
        writer.finalize([feat_spec, path_spec])
    finally:
        writer.close()
    return root, feats


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_round_trip_and_row_reads(tmp_path, fmt):
    root, feats = _write(tmp_path, fmt)
    store = FeatureStore.open(root)
    np.testing.assert_array_equal(store.read("images/test/views/center/pooled"), feats)
    rows = np.array([4, 0, 4, 2])
    np.testing.assert_array_equal(store.read("images/test/views/center/pooled", rows), feats[rows])
    assert list(store.read("images/test/paths")) == ["a.jpg", "b c.png", "ü.jpg", "d", "e"]
    assert store.arrays["images/test/views/center/pooled"]["bytes"] == feats.nbytes
    store.close()
    assert verify_store(root) == []


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_verify_names_array_and_rows_of_a_flipped_byte(tmp_path, fmt):
    root, feats = _write(tmp_path, fmt)
    if fmt == "zarr":
        chunk = next(
            p for p in (root / "arrays.zarr/images/test/views/center/pooled/c").rglob("*") if p.is_file()
        )
        offset = 4  # inside the values, before the trailing CRC32C
    else:
        chunk = root / "parts" / "job_000001.h5"
        with h5py.File(chunk, "r") as fh:
            offset = fh["images/test/views/center/pooled@3"].id.get_chunk_info(0).byte_offset + 4
    data = bytearray(chunk.read_bytes())
    data[offset] ^= 0xFF
    chunk.write_bytes(bytes(data))
    problems = verify_store(root)
    assert problems, "a flipped byte must be found"
    assert all(p.array == "images/test/views/center/pooled" for p in problems)
    assert {p.rows for p in problems} <= {(0, 3), (3, 5)}


def test_finalize_refuses_uncovered_rows(tmp_path):
    with pytest.raises(StoreError, match="2 of 5 rows"):
        _write(tmp_path, "zarr", shards=((3, 5),))


def test_unfinished_store_is_not_readable(tmp_path):
    key, manifest = _manifest("zarr")
    root = tmp_path / store_dirname(arch="a", weights="w", precision="fp16", key=key)
    writer = StoreWriter(root, fmt="zarr", manifest=manifest)
    writer.write_whole(ArraySpec("x", (2,), "int32", (2,)), np.array([1, 2], np.int32))
    writer.close()
    with pytest.raises(StoreError, match="not a finished feature store"):
        FeatureStore.open(root)


def test_altered_or_foreign_manifest_is_refused(tmp_path):
    root, _ = _write(tmp_path, "zarr")
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["fingerprint_parts"]["test"] = "other"
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(StoreError, match="does not match"):
        FeatureStore.open(root)
    renamed = root.parent / "elsewhere-0000000000000000"
    _write(tmp_path / "b", "zarr")[0].rename(renamed)
    with pytest.raises(StoreError, match="folder name"):
        FeatureStore.open(renamed)


def test_second_writer_is_refused_while_first_holds_the_store(tmp_path):
    key, manifest = _manifest("zarr")
    root = tmp_path / "s"
    first = StoreWriter(root, fmt="zarr", manifest=manifest)
    with pytest.raises(StoreError, match="Another process is writing"):
        StoreWriter(root, fmt="zarr", manifest=manifest)
    first.close()
    StoreWriter(root, fmt="zarr", manifest=manifest).close()
