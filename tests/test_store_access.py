"""Shuffled reads: FeatureStore.read and the unpacked sidecars return exactly the in-memory gather (zarr and
HDF5); stale sidecars are rebuilt; streamed sources prefetch and train like in-memory ones."""

import threading

import numpy as np
import pytest
import torch

from fsl_cache.errors import StoreError
from fsl_cache.methods.tip_adapter import TipHead, build_keys, build_values
from fsl_cache.splits import SplitRef
from fsl_cache.store import (
    ArraySpec,
    FeatureStore,
    StoreWriter,
    fingerprint,
    list_stores,
    unpacked,
    verify_store,
)
from fsl_cache.store.fingerprint import store_dirname
from fsl_cache.store.store import SCHEMA
from fsl_cache.store.unpacked import _blocks, unpack_rows
from fsl_cache.testing import make_synthetic_store
from fsl_cache.training import MemoryViews, StoreViews, TrainData, TrainSettings, open_views, train

NAME = "images/train/views/ldc/rn/layer4"


def _store(tmp_path, fmt, data):
    parts = {"test": "store_access", "format": fmt}
    key = fingerprint(parts)
    root = tmp_path / store_dirname(arch="a", weights="w", precision="fp16", key=key)
    manifest = {
        "schema": SCHEMA,
        "fingerprint": key,
        "fingerprint_parts": parts,
        "format": fmt,
        "precision": "fp16",
    }
    spec = ArraySpec(
        NAME, data.shape, "float16", (4,) + data.shape[1:], "zstd1"
    )  # heavy maps: few samples a chunk
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
    for rows in (
        rng.permutation(21),
        rng.integers(0, 21, 40),
        np.array([20, 0, 20, 5, 5, 0]),
        np.array([7]),
        np.array([], dtype=np.int64),
    ):
        got = store.read(NAME, rows)
        assert got.dtype == data.dtype and got.shape == data[rows].shape
        assert np.array_equal(got, data[rows])
    assert np.array_equal(store.read(NAME), data)
    store.close()


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_sidecar_reads_equal_the_store_for_shuffled_and_repeated_rows(tmp_path, fmt):
    rng = np.random.default_rng(1)
    data = np.maximum(rng.standard_normal((21, 3, 4, 2)), 0).astype(np.float16)  # [N, V, ...]
    store, _ = _store(tmp_path, fmt, data)
    rows = np.array([17, 3, 3, 20, 0, 9, 4, 5, 6, 17, 12])  # split order, with repeats
    block = 3 * data[0].nbytes  # blocks of 3 rows: several blocks, cut at chunk boundaries
    sidecar = unpack_rows(store, NAME, rows, block_bytes=block)
    assert len(sidecar) == len(rows) and sidecar.path.parent == store.root / "unpacked"
    for positions in (
        rng.permutation(len(rows)),
        rng.integers(0, len(rows), 30),
        np.array([], dtype=np.int64),
    ):
        got = sidecar.read(positions)
        assert got.dtype == data.dtype and np.array_equal(got, store.read(NAME, rows[positions]))
        views = rng.integers(0, 3, len(positions))
        assert np.array_equal(sidecar.read(positions, views), data[rows[positions], views])
    assert verify_store(store.root) == []  # sidecars are not arrays of the store
    store.close()


def test_blocks_cut_at_chunk_boundaries_unless_a_chunk_exceeds_a_block():
    rows = np.array([0, 1, 2, 5, 6, 7, 8, 9, 13])
    assert [b.tolist() for b in _blocks(rows, chunk_rows=4, limit=5)] == [[0, 1, 2], [5, 6, 7, 8, 9], [13]]
    assert [b.tolist() for b in _blocks(rows, chunk_rows=8, limit=2)] == [
        [0, 1],
        [2, 5],
        [6, 7],
        [8, 9],
        [13],
    ]
    assert [b.tolist() for b in _blocks(rows, chunk_rows=1, limit=100)] == [rows.tolist()]


def test_a_stale_or_partial_sidecar_is_rebuilt_never_trusted(tmp_path, monkeypatch):
    data = np.arange(21 * 6, dtype=np.float16).reshape(21, 6)
    store, _ = _store(tmp_path, "zarr", data)
    rows = np.array([4, 2, 19])
    builds = []
    build = unpacked._build
    monkeypatch.setattr(unpacked, "_build", lambda *a: builds.append(1) or build(*a))

    def rebuilt() -> bool:
        before = len(builds)
        again = unpack_rows(store, NAME, rows)
        assert np.array_equal(again.read(np.arange(3)), data[rows])
        return len(builds) > before

    assert rebuilt() and not rebuilt()  # built once, then reused as it is
    path = unpack_rows(store, NAME, rows).path
    record = path.with_suffix(".json")
    record.write_text(record.read_text().replace(store.fingerprint, "0" * 64))  # unpacked from another store
    assert rebuilt()
    np.save(path, np.zeros((3, 6), np.float16))  # right shape, but with no record of its source
    record.unlink()
    assert rebuilt()
    with open(path, "r+b") as fh:  # truncated
        fh.truncate(path.stat().st_size - 4)
    assert rebuilt()
    path.unlink()  # a killed build: only its *.incomplete file is left
    path.with_name(path.name + ".incomplete").write_bytes(b"half")
    assert rebuilt() and not path.with_name(path.name + ".incomplete").exists()
    assert not rebuilt()

    def damaged(*args):
        raise StoreError("damaged block")

    monkeypatch.setattr(store, "read", damaged)  # a build that fails half-way leaves nothing behind
    with pytest.raises(StoreError, match="damaged block"):
        unpack_rows(store, NAME, np.array([1, 7]))
    assert [p.name for p in path.parent.glob("*.npy*")] == [path.name]
    store.close()


def test_a_short_disk_streams_from_the_store_with_one_warning(tmp_path, monkeypatch):
    root = make_synthetic_store(tmp_path, views={"tip": 3})
    store = FeatureStore.open(root)
    split = _split(np.array([3, 1, 1, 0]))
    monkeypatch.setattr(unpacked, "SPARE_BYTES", 1 << 62)
    with pytest.warns(UserWarning, match="needs .* GB .* streaming from the store instead"):
        stream = open_views(store, split, policy="tip", taps=("pooled",), memory_budget=0)
    assert (
        isinstance(stream, StoreViews)
        and stream.unpacked == {}
        and not list((root / "unpacked").glob("*.npy"))
    )
    memory = open_views(store, split, policy="tip", taps=("pooled",))
    positions, views = np.array([3, 0, 2]), np.array([2, 1, 0])
    torch.testing.assert_close(stream.batch(positions, views), memory.batch(positions, views), rtol=0, atol=0)
    assert (
        open_views(store, split, policy="tip", taps=("pooled",), memory_budget=0, unpack=False).unpacked == {}
    )
    store.close()


def _split(rows):
    return SplitRef("train", "train_pool", rows, torch.zeros(len(rows), dtype=torch.long), rows)


def _tip_fit(store, split, labels, memory_budget):
    source = open_views(store, split, policy="tip", taps=("pooled",), memory_budget=memory_budget)
    feats = torch.stack(
        [
            source.batch(np.arange(len(split)), np.full(len(split), v))["pooled"]
            for v in range(source.num_views)
        ],
        dim=1,
    )
    text = torch.randn(4, feats.shape[-1], generator=torch.Generator().manual_seed(0))
    text = torch.nn.functional.normalize(text, dim=-1)
    head = TipHead(
        build_keys(feats[:, 1:]),
        build_values(labels, 4),
        text,
        alpha=1.0,
        beta=1.0,
        scale=100.0,
        train_keys=True,
    )
    settings = TrainSettings(epochs=3, batch_size=8, lr=1e-2, eps=1e-4, policy="tip")
    train(head, TrainData(source, labels), settings=settings, generator=torch.Generator().manual_seed(5))
    return source, head.adapter.weight.detach()


def test_a_streamed_fit_reads_through_sidecars_and_trains_like_the_in_memory_fit(tmp_path):
    root = make_synthetic_store(tmp_path, views={"tip": 5})
    store = FeatureStore.open(root)
    pool_labels = store.read("images/train_pool/labels").astype(np.int64)
    rows = np.random.default_rng(0).permutation(len(pool_labels))[:20]
    split = _split(rows)
    labels = torch.from_numpy(pool_labels[rows])
    memory, w_memory = _tip_fit(store, split, labels, memory_budget=1 << 30)
    stream, w_stream = _tip_fit(store, split, labels, memory_budget=0)
    assert isinstance(memory, MemoryViews) and isinstance(stream, StoreViews)
    assert set(stream.unpacked) == {"pooled"} and stream.unpacked["pooled"].path.exists()
    assert torch.equal(w_memory, w_stream)
    assert verify_store(root) == [] and [e.finished for e in list_stores(tmp_path)] == [True]
    store.close()


def test_prefetch_returns_the_synchronous_batch_and_raises_its_store_error(tmp_path):
    root = make_synthetic_store(tmp_path, views={"tip": 4})
    store = FeatureStore.open(root)
    split = _split(np.array([5, 0, 3, 3, 9, 2]))
    for unpack in (True, False):
        source = open_views(
            store, split, policy="tip", taps=("pooled", "zs_logits/tip"), memory_budget=0, unpack=unpack
        )
        assert bool(source.unpacked) == unpack
        batches = [
            (np.array([4, 1, 0]), np.array([3, 0, 2])),
            (np.array([2, 5]), None),
            (np.array([3]), np.array([1])),
        ]
        expected = [source.batch(p, v) for p, v in batches]
        for (p, v), want in zip(batches, expected):  # the trainer's order: prefetch the next, then ask for it
            source.prefetch(p, v)
            for tap, tensor in source.batch(p, v).items():
                assert torch.equal(tensor, want[tap])
        loads = []
        load = source._load
        source._load = lambda *a: loads.append(1) or load(*a)
        source.prefetch(*batches[0])
        source.batch(*batches[0])
        assert len(loads) == 1  # served by the prefetch, not read again
        source.prefetch(*batches[0])
        source.prefetch(*batches[0])  # lockstep members prefetch the same batch: read once
        for tap, tensor in source.batch(*batches[1]).items():  # another batch is read on the spot
            assert torch.equal(tensor, expected[1][tap])
        source.prefetch(*batches[2])  # the unclaimed one is dropped
        for tap, tensor in source.batch(*batches[2]).items():
            assert torch.equal(tensor, expected[2][tap])
        assert len(loads) == 4
        source.prefetch(*batches[0])
        source.close()
        assert not any(t.name == "fsl-cache-prefetch" for t in threading.enumerate())
    chunk = next(
        p
        for p in (root / "arrays.zarr/images/train_pool/views/tip/pooled").rglob("*")
        if p.is_file() and p.name != "zarr.json"
    )
    raw = bytearray(chunk.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # the chunk's CRC32C no longer matches
    chunk.write_bytes(bytes(raw))
    source = open_views(store, split, policy="tip", taps=("pooled",), memory_budget=0, unpack=False)
    with pytest.raises(StoreError) as sync:
        source.batch(np.array([0, 1]))
    source.prefetch(np.array([0, 1]))
    with pytest.raises(StoreError) as background:
        source.batch(np.array([0, 1]))
    assert str(background.value) == str(sync.value) and "may be corrupted" in str(sync.value)
    store.close()
