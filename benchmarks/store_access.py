"""Benchmark: a shuffled minibatch read from the store vs an in-RAM numpy gather of the same rows.

An RN50 ``layer4`` array (``[N, 2048, 7, 7]`` fp16, post-ReLU-like: half zeros, like real maps) is
written through :class:`StoreWriter` in shards with the extraction layout (``array_layout``: ~1 MiB
chunks = 4 samples, zstd-1 for ``/rn/`` maps), then each repeat draws 64 random rows and times

- ``FeatureStore.read(name, rows)`` (what the streaming loader calls; warm page cache), and
- ``data[rows]`` on the same array held in RAM as numpy,

- ``UnpackedRows.read(rows)`` on the uncompressed sidecar a streamed fit reads instead (what
  ``open_views`` builds when the split does not fit in memory; unpacked once, timed separately, then
  read once whole so the timed reads find its pages mapped, as from the second epoch on),

side by side, reporting medians and ``gather ÷ store`` / ``gather ÷ sidecar`` (target ≥ 0.5: at least
half the in-RAM rate). The store's time includes fp16 chunk decode (zstd), checksum and assembly.

    python benchmarks/store_access.py [--samples 1024] [--batch 64] [--repeats 30] [--formats zarr,hdf5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from fsl_cache.extraction.plan import array_layout
from fsl_cache.store import FeatureStore, StoreWriter, fingerprint
from fsl_cache.store.fingerprint import store_dirname
from fsl_cache.store.store import SCHEMA
from fsl_cache.store.unpacked import unpack_rows

NAME = "images/train/views/ldc/rn/layer4"


def write_store(parent: Path, fmt: str, data: np.ndarray, shard: int = 64) -> tuple[Path, str]:
    parts = {"benchmark": "store_access", "format": fmt}
    key = fingerprint(parts)
    root = parent / store_dirname(arch="RN50", weights="none", precision="fp16", key=key)
    manifest = {
        "schema": SCHEMA,
        "fingerprint": key,
        "fingerprint_parts": parts,
        "format": fmt,
        "precision": "fp16",
    }
    spec = array_layout(NAME, tuple(data.shape), "float16")
    writer = StoreWriter(root, fmt=fmt, manifest=manifest)
    writer.create(spec)
    for i, start in enumerate(range(0, len(data), shard)):
        stop = min(start + shard, len(data))
        blocks = writer.begin_shard("job", i, start, stop)
        for b in range(start, stop, 32):  # extraction batches of 32
            blocks.write(spec, b, data[b : min(b + 32, stop)])
        writer.commit(blocks.finish())
    writer.finalize([spec])
    writer.close()
    return root, f"chunks {spec.chunks}, codec {spec.codec}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=1024)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=30)
    ap.add_argument("--formats", default="zarr,hdf5")
    args = ap.parse_args()
    rng = np.random.default_rng(0)
    data = np.maximum(rng.standard_normal((args.samples, 2048, 7, 7), dtype=np.float32), 0).astype(np.float16)
    mb = args.batch * data[0].nbytes / 1e6
    print(
        f"{args.batch} random rows of {args.samples} × layer4 [2048, 7, 7] fp16 ({mb:.1f} MB per minibatch), "
        f"load average {' '.join(f'{x:.1f}' for x in os.getloadavg())} on {os.cpu_count()} cores"
    )
    with tempfile.TemporaryDirectory() as tmp:
        for fmt in args.formats.split(","):
            root, layout = write_store(Path(tmp) / fmt, fmt, data)
            store = FeatureStore.open(root)
            rows = rng.integers(0, args.samples, args.batch)
            assert np.array_equal(store.read(NAME, rows), data[rows])  # and warms the page cache
            t0 = time.perf_counter()
            sidecar = unpack_rows(store, NAME, np.arange(args.samples))
            t_unpack = time.perf_counter() - t0
            assert np.array_equal(sidecar.read(np.arange(args.samples)), data)  # and maps its pages
            t_store, t_ram, t_side = [], [], []
            for _ in range(args.repeats):
                rows = rng.permutation(args.samples)[: args.batch]
                t0 = time.perf_counter()
                store.read(NAME, rows)
                t1 = time.perf_counter()
                data[rows]  # every result is dropped at once, so each read allocates alike
                t2 = time.perf_counter()
                sidecar.read(rows)
                t3 = time.perf_counter()
                t_store.append(t1 - t0)
                t_ram.append(t2 - t1)
                t_side.append(t3 - t2)
            store.close()
            s, r, u = statistics.median(t_store), statistics.median(t_ram), statistics.median(t_side)
            print(
                f"{fmt:5s} ({layout}): store {s * 1e3:7.1f} ms ({mb / s:6.0f} MB/s), in-RAM gather "
                f"{r * 1e3:6.2f} ms ({mb / r:6.0f} MB/s), gather/store = {r / s:.3f} (target >= 0.5)"
            )
            print(
                f"{'':5s} unpacked sidecar: {u * 1e3:6.2f} ms ({mb / u:6.0f} MB/s), gather/sidecar = {r / u:.3f} "
                f"(target >= 0.5); one-time unpack {t_unpack:.2f} s ({data.nbytes / 1e6 / t_unpack:.0f} MB/s)"
            )
    print(f"load average after: {' '.join(f'{x:.1f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
