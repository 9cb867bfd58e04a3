"""FeatureStore.read with shuffled and repeated rows returns exactly the in-memory gather (zarr and HDF5)."""
import numpy as np
import pytest

from fsl_cache.store import ArraySpec, FeatureStore, StoreWriter, fingerprint
from fsl_cache.store.fingerprint import store_dirname
from fsl_cache.store.store import SCHEMA

NAME = "images/train/views/ldc/rn/layer4"


def _store(tmp_path, fmt, data):
    parts = {"test": "store_access", "format": fmt}
    key = fingerprint(parts)
    root = tmp_path / store_dirname(arch="a", weights="w", precision="fp16", key=key)
    manifest = {"schema": SCHEMA, "fingerprint": key, "fingerprint_parts": parts, "format": fmt, "precision": "fp16"}
    spec = ArraySpec(NAME, data.shape, "float16", (4,) + data.shape[1:], "zstd1")  # heavy maps: few samples a chunk
    writer = StoreWriter(root, fmt=fmt, manifest=manifest)
    writer.create(spec)
    for shard, start in enumerate(range(0, len(data), 8)):
        stop = min(start + 8, len(data))
        blocks = writer.begin_shard("job", shard, start, stop)
        for b in range(start, stop, 3):  # batches that straddle chunk boundaries
            blocks.write(spec, b, data[b : min(b + 3, stop)])
        writer.commit(blocks.finish())
    writer.finalize([spec])
    writer.close()
    return FeatureStore.open(root), spec


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_shuffled_and_repeated_rows_equal_the_in_memory_gather(tmp_path, fmt):
    rng = np.random.default_rng(0)
    data = np.maximum(rng.standard_normal((21, 64, 3, 3)), 0).astype(np.float16)
    store, spec = _store(tmp_path, fmt, data)
    assert spec.chunks[0] < len(data)  # several chunks, so the gather crosses them
    for rows in (rng.permutation(21), rng.integers(0, 21, 40), np.array([20, 0, 20, 5, 5, 0]), np.array([7]),
                 np.array([], dtype=np.int64)):
        got = store.read(NAME, rows)
        assert got.dtype == data.dtype and got.shape == data[rows].shape
        assert np.array_equal(got, data[rows])
    assert np.array_equal(store.read(NAME), data)
    store.close()
