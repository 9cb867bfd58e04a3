"""Faults below the extraction: flipped bytes, stores that disagree with their manifest, a full disk,
two writers at once, interrupted runs resumed with other settings, and what may be in a store at all.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr
from click.testing import CliRunner
from dataset_helpers import extract_argv
from PIL import Image

from fsl_cache import api
from fsl_cache.cli import main
from fsl_cache.datasets import make_demo_dataset
from fsl_cache.errors import DiskFullError, StoreError
from fsl_cache.extraction.pipeline import ExtractOptions, prepare_extraction
from fsl_cache.store import FeatureStore, verify_store
from fsl_cache.store.backend import HDF5Backend, ZarrBackend, _part_file_name
from fsl_cache.store.store import StoreWriter, block_digest

REPO = Path(__file__).resolve().parents[1]
TINY = {"model": "fsl-tiny-rn", "pretrained": "none", "workers": 0, "progress": False}
SMALL = {**TINY, "for_methods": ["zero_shot"], "shots": (1,), "seeds": (1,), "batch_size": 8}
"""The cheapest extraction with several shards: 100 test images in 2 shards, 5 train, 5 val."""
RICH = {
    **TINY,
    "for_methods": ["tip_adapter", "safe"],
    "views": 2,
    "shots": (1, 2),
    "seeds": (1,),
    "batch_size": 8,
}
"""Every kind of array: float16 features, zstd-compressed RN maps, int32 params, UTF-8 paths."""


pytestmark = pytest.mark.usefixtures("one_thread")  # bit-identical comparisons (tests/conftest.py)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("data") / "demo")


@pytest.fixture(scope="module")
def stores(demo, tmp_path_factory) -> dict[str, Path]:
    cache = tmp_path_factory.mktemp("stores")
    return {
        fmt: api.extract(f"imagefolder:{demo}", cache_dir=cache, format=fmt, **RICH).store
        for fmt in ("zarr", "hdf5")
    }


@pytest.fixture(scope="module")
def small_refs(demo, tmp_path_factory) -> dict[str, Path]:
    cache = tmp_path_factory.mktemp("refs")
    return {
        fmt: api.extract(f"imagefolder:{demo}", cache_dir=cache, format=fmt, **SMALL).store
        for fmt in ("zarr", "hdf5")
    }


def copy_store(store: Path, tmp_path: Path) -> Path:
    """A copy under the same two-level layout (the folder name carries the key)."""
    dst = tmp_path / "cache" / store.parent.name / store.name
    shutil.copytree(store, dst)
    return dst


def cli(*args: str):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert "Traceback" not in result.output, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    return result


def arrays_and_blocks(root: Path) -> tuple[dict, dict]:
    store = FeatureStore.open(root)
    try:
        data = {name: store.read(name) for name in store.arrays}
        blocks = {name: entry["blocks"] for name, entry in store.arrays.items()}
    finally:
        store.close()
    return data, blocks


def assert_same_store(ref: Path, new: Path) -> None:
    (a, a_blocks), (b, b_blocks) = arrays_and_blocks(ref), arrays_and_blocks(new)
    assert a_blocks == b_blocks
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert verify_store(new) == []


# ---------------------------------------------------------------------------- flipped bytes


def zarr_chunks(root: Path) -> list[tuple[str, Path, tuple[int, int]]]:
    """(array, chunk file, rows it holds) for every chunk of every array in the manifest."""
    manifest = json.loads((root / "manifest.json").read_text())
    found = []
    for name, entry in manifest["arrays"].items():
        rows = entry["chunks"][0]
        for path in sorted((root / "arrays.zarr" / name / "c").rglob("*")):
            if path.is_file():
                first = int(path.relative_to(root / "arrays.zarr" / name / "c").parts[0]) * rows
                found.append((name, path, (first, min(first + rows, entry["shape"][0]))))
    return found


def hdf5_chunks(root: Path) -> list[tuple[str, Path, int, int, tuple[int, int]]]:
    """(array, part file, byte offset, size, rows of its block) for every chunk of every part."""
    found = []
    for part in sorted((root / "parts").glob("*.h5")):
        with h5py.File(part, "r") as fh:
            datasets = []
            fh.visititems(
                lambda key, obj: datasets.append((key, obj)) if isinstance(obj, h5py.Dataset) else None
            )
            for key, ds in datasets:
                name, start = key.rsplit("@", 1)
                block = (int(start), int(start) + ds.shape[0])
                for i in range(ds.id.get_num_chunks()):
                    info = ds.id.get_chunk_info(i)
                    found.append((name, part, info.byte_offset, info.size, block))
    return found


def flip(path: Path, offset: int) -> bytes:
    original = path.read_bytes()
    data = bytearray(original)
    data[offset] ^= 0x10
    path.write_bytes(bytes(data))
    return original


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_a_flipped_byte_anywhere_is_found_by_verify_and_refused_on_read(stores, tmp_path, fmt):
    root = copy_store(stores[fmt], tmp_path)
    rng = random.Random(f"flip-{fmt}")
    if fmt == "zarr":
        sample = [
            (name, path, rng.randrange(path.stat().st_size), rows)
            for name, path, rows in rng.sample(zarr_chunks(root), 12)
        ]
    else:
        sample = [
            (name, part, offset + rng.randrange(size), rows)
            for name, part, offset, size, rows in rng.sample(hdf5_chunks(root), 12)
        ]
    names = {name for name, *_ in sample}
    assert any(n.endswith("/paths") or "/rn/" in n for n in names) or len(names) > 4  # a varied sample
    for name, path, offset, rows in sample:
        original = flip(path, offset)
        try:
            problems = verify_store(root)
            assert problems, f"flipped byte {offset} of {path.name} ({name}) not found"
            assert {p.array for p in problems} == {name}
            assert any(p.rows[0] <= rows[0] and rows[1] <= p.rows[1] for p in problems), (problems, rows)
            with pytest.raises(StoreError, match=f"array '{name}'.*rows"):
                FeatureStore.open(root).read(name)
        finally:
            path.write_bytes(original)
    name, path, offset, rows = sample[0]
    flip(path, offset)
    result = cli("cache", "verify", str(root), "--cache-dir", tmp_path / "cache")
    assert result.exit_code == 1
    assert f"{name} rows {rows[0]}.." in result.output and "remove the store" in result.output


def _delete_array(root: Path, fmt: str, name: str) -> None:
    if fmt == "zarr":
        shutil.rmtree(root / "arrays.zarr" / name)
    else:
        with h5py.File(root / "store.h5", "a") as fh:
            del fh[name]


def _edit_manifest(root: Path, edit) -> None:
    manifest = json.loads((root / "manifest.json").read_text())
    edit(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest))


POOLED = "images/test/views/center/pooled"
DISAGREEMENTS = {
    "array deleted": (lambda root, fmt: _delete_array(root, fmt, POOLED), f"array '{POOLED}'"),
    "part file or array metadata missing": (
        lambda root, fmt: (
            next((root / "parts").glob("test.center*_000001.h5")).unlink()
            if fmt == "hdf5"
            else (root / "arrays.zarr" / POOLED / "zarr.json").unlink()
        ),
        POOLED,
    ),
    "digest edited": (
        lambda root, fmt: _edit_manifest(
            root, lambda m: m["arrays"][POOLED]["blocks"][1].__setitem__(2, "0" * 64)
        ),
        f"{POOLED} rows 64..99: content differs",
    ),
    "shape edited": (
        lambda root, fmt: _edit_manifest(root, lambda m: m["arrays"][POOLED]["shape"].__setitem__(0, 90)),
        "on disk but (90, 1, 64) in the manifest",
    ),
    "dtype edited": (
        lambda root, fmt: _edit_manifest(root, lambda m: m["arrays"][POOLED].__setitem__("dtype", "float32")),
        "dtype float16 on disk but float32",
    ),
    "array added": (
        lambda root, fmt: _edit_manifest(
            root, lambda m: m["arrays"].__setitem__("images/ghost", m["arrays"][POOLED])
        ),
        "array 'images/ghost'",
    ),
    "fingerprint parts edited": (
        lambda root, fmt: _edit_manifest(
            root, lambda m: m["fingerprint_parts"].__setitem__("precision", "fp32")
        ),
        "does not match its contents",
    ),
    "entry malformed": (
        lambda root, fmt: _edit_manifest(root, lambda m: m["arrays"][POOLED].__setitem__("shape", "100")),
        "malformed",
    ),
    "manifest truncated": (
        lambda root, fmt: (root / "manifest.json").write_bytes((root / "manifest.json").read_bytes()[:500]),
        "manifest.json is corrupted",
    ),
    "manifest not an object": (
        lambda root, fmt: (root / "manifest.json").write_text("[1, 2]"),
        "not a JSON object",
    ),
    "arrays folder gone": (
        lambda root, fmt: (
            shutil.rmtree(root / "arrays.zarr") if fmt == "zarr" else (root / "store.h5").unlink()
        ),
        "it is incomplete",
    ),
    "arrays file garbage": (
        lambda root, fmt: (
            (root / "arrays.zarr" / "zarr.json").write_text("{not json")
            if fmt == "zarr"
            else (root / "store.h5").write_bytes(b"garbage")
        ),
        "the store is damaged",
    ),
}


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
@pytest.mark.parametrize("case", list(DISAGREEMENTS))
def test_a_store_that_disagrees_with_its_manifest_is_refused_or_reported(small_refs, tmp_path, fmt, case):
    root = copy_store(small_refs[fmt], tmp_path)
    damage, message = DISAGREEMENTS[case]
    damage(root, fmt)
    result = cli("cache", "verify", str(root), "--cache-dir", tmp_path / "cache")
    assert result.exit_code == 1, result.output
    assert message in " ".join(result.output.split()), result.output
    if case != "digest edited":  # the data itself is intact there; only verify can tell
        with pytest.raises(StoreError):
            store = FeatureStore.open(root)
            store.read(POOLED)
            store.read("images/ghost")


def test_a_missing_zarr_chunk_reads_as_zeros_but_verify_names_it(small_refs, tmp_path):
    """Known limit: zarr reads an absent chunk as its fill value, so only ``verify`` can tell."""
    root = copy_store(small_refs["zarr"], tmp_path)
    (root / "arrays.zarr" / POOLED / "c" / "1" / "0" / "0").unlink()
    assert [str(p) for p in verify_store(root)] == [
        f"{POOLED} rows 64..99: content differs from the digest written at extraction"
    ]


def test_reads_outside_the_array_stay_index_errors(small_refs):
    store = FeatureStore.open(small_refs["zarr"])
    with pytest.raises(IndexError):
        store.read(POOLED, np.array([0, 1000]))
    with pytest.raises(StoreError, match="has no array 'nope'"):
        store.read("nope")


# ---------------------------------------------------------------------------- disk full


class FailAfter:
    """Patch ``cls.method`` to raise ``error`` from its ``n``-th call on."""

    def __init__(self, monkeypatch, cls, method: str, n: int, error: Exception) -> None:
        self.calls = 0
        orig = getattr(cls, method)

        def failing(*args, **kwargs):
            self.calls += 1
            if self.calls >= n:
                raise error
            return orig(*args, **kwargs)

        monkeypatch.setattr(cls, method, failing)


def enospc() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def check_markers_are_whole_shards(root: Path, ref: Path) -> int:
    """Every progress marker covers bytes that are on disk, equal to the reference's blocks."""
    ref_blocks = {
        n: {tuple(b) for b in e["blocks"]}
        for n, e in json.loads((ref / "manifest.json").read_text())["arrays"].items()
    }
    count = 0
    for path in root.glob("progress/**/*.json"):
        marker = json.loads(path.read_text())
        for name, digest in marker["digests"].items():
            assert (marker["start"], marker["stop"], digest) in ref_blocks[name]
            if (root / "arrays.zarr").exists():
                data = zarr.open_array(str(root / "arrays.zarr" / name), mode="r")[
                    marker["start"] : marker["stop"]
                ]
            else:
                part = root / "parts" / _part_file_name(f"{marker['job']}/{marker['shard']:06d}")
                with h5py.File(part, "r") as fh:
                    data = fh[f"{name}@{marker['start']}"][...]
                    data = (
                        np.array([b.decode() for b in data], dtype=object) if data.dtype.kind == "S" else data
                    )
            assert block_digest(data) == digest, (path, name)
        count += 1
    return count


@pytest.mark.parametrize("fmt, nth", [("zarr", 3), ("zarr", 40), ("hdf5", 12), ("hdf5", 55)])
def test_disk_full_mid_array_keeps_the_store_consistent_and_resumes(demo, small_refs, tmp_path, fmt, nth):
    backend = ZarrBackend if fmt == "zarr" else HDF5Backend
    with pytest.MonkeyPatch.context() as mp:
        FailAfter(mp, backend, "write_block", nth, enospc())
        with pytest.raises(DiskFullError) as info:
            api.extract(f"imagefolder:{demo}", cache_dir=tmp_path, format=fmt, **SMALL)
    message = str(info.value)
    assert "Disk full while writing" in message and "still to be written" in message and "is free" in message
    assert "Free " in message and "re-run the same command" in message
    root = next(p for p in tmp_path.glob("*/*") if p.is_dir())
    assert not (root / "manifest.json").exists(), "no manifest for unfinished arrays"
    assert check_markers_are_whole_shards(root, small_refs[fmt]) > 0
    # "freed": the same call resumes and ends bit-identical to an uninterrupted run
    resumed = api.extract(f"imagefolder:{demo}", cache_dir=tmp_path, format=fmt, **SMALL)
    assert_same_store(small_refs[fmt], resumed.store)


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_disk_full_while_publishing_leaves_no_manifest_and_resumes(demo, small_refs, tmp_path, fmt):
    import fsl_cache.store.store as store_module

    with pytest.MonkeyPatch.context() as mp:
        if fmt == "hdf5":  # h5py puts the errno in its message only
            FailAfter(
                mp,
                HDF5Backend,
                "finalize",
                1,
                OSError(
                    "Unable to create file (file write failed: errno = 28, "
                    "error message = 'No space left on device')"
                ),
            )
        else:
            orig = store_module.write_json_atomic

            def write(path, obj):
                if path.name == "manifest.json":
                    path.with_name("manifest.json.incomplete").write_text('{"half')
                    raise enospc()
                return orig(path, obj)

            mp.setattr(store_module, "write_json_atomic", write)
        with pytest.raises(DiskFullError, match="Disk full"):
            api.extract(f"imagefolder:{demo}", cache_dir=tmp_path, format=fmt, **SMALL)
    root = next(p for p in tmp_path.glob("*/*") if p.is_dir())
    assert not (root / "manifest.json").exists()
    resumed = api.extract(f"imagefolder:{demo}", cache_dir=tmp_path, format=fmt, **SMALL)
    assert_same_store(small_refs[fmt], resumed.store)
    assert not list(root.rglob("*.incomplete"))


def test_disk_full_on_the_command_line_is_one_line_then_resumes(demo, small_refs, tmp_path, monkeypatch):
    args = extract_argv(demo, tmp_path, for_methods="zero_shot", shots=1, seeds=1, workers=0, batch_size=8)
    with pytest.MonkeyPatch.context() as mp:
        FailAfter(mp, ZarrBackend, "write_block", 30, enospc())
        result = cli(*args)
    assert result.exit_code == 1
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Disk full while writing" in errors[0], result.output
    result = cli(*args)
    assert result.exit_code == 0, result.output
    assert_same_store(small_refs["zarr"], next(p for p in tmp_path.glob("*/*") if p.is_dir()))


def test_a_failed_run_releases_the_lock_even_if_closing_fails(demo, tmp_path, monkeypatch):
    """In one Python process (a notebook), the next extraction must not find its own stale lock."""
    with pytest.MonkeyPatch.context() as mp:
        FailAfter(mp, HDF5Backend, "write_block", 5, enospc())
        FailAfter(mp, HDF5Backend, "close", 1, OSError(errno.ENOSPC, "close failed"))
        with pytest.raises((OSError, DiskFullError)):
            api.extract(f"imagefolder:{demo}", cache_dir=tmp_path, format="hdf5", **SMALL)
    api.extract(f"imagefolder:{demo}", cache_dir=tmp_path, format="hdf5", **SMALL)


# ---------------------------------------------------------------------------- concurrency


def test_two_extractions_at_once_second_refuses_first_finishes(demo, small_refs, tmp_path):
    """Two real processes: B starts while A holds the store (A is paused with SIGSTOP to be sure)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    args = [
        sys.executable,
        "-m",
        "fsl_cache",
        "extract",
        "--dataset",
        f"imagefolder:{demo}",
        "--model",
        "fsl-tiny-rn",
        "--pretrained",
        "none",
        "--for",
        "zero_shot",
        "--shots",
        "1",
        "--seeds",
        "1",
        "--workers",
        "0",
        "--batch-size",
        "8",
        "--cache-dir",
        str(tmp_path),
    ]
    first = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    second = None
    try:
        deadline = time.time() + 120
        while (
            time.time() < deadline
            and first.poll() is None
            and not list(tmp_path.glob("*/*/progress/*/*.json"))
        ):
            time.sleep(0.01)
        first.send_signal(signal.SIGSTOP)
        second = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    finally:
        first.send_signal(signal.SIGCONT)
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err[-2000:]
    assert second.returncode == 1, second.stderr[-2000:]
    assert "Another process is writing" in second.stderr and "Traceback" not in second.stderr
    assert_same_store(small_refs["zarr"], next(p for p in tmp_path.glob("*/*") if p.is_dir()))


def test_an_extraction_planned_before_another_finished_refuses_instead_of_dropping_its_arrays(demo, tmp_path):
    kwargs = {"root": None, "model": "fsl-tiny-rn", "pretrained": "none", "cache_dir": tmp_path}
    opts = ExtractOptions(for_methods=("zero_shot",), shots=(1,), seeds=(1,), workers=0, batch_size=8)
    api.extract(f"imagefolder:{demo}", cache_dir=tmp_path, **SMALL)
    late = prepare_extraction(f"imagefolder:{demo}", options=opts, **kwargs)  # plans "nothing to add"
    other = api.extract(
        f"imagefolder:{demo}", cache_dir=tmp_path, **{**SMALL, "for_methods": ["tip_adapter"], "views": 2}
    )
    with pytest.raises(StoreError, match="Another extraction finished writing"):
        late.run(progress=False)
    manifest = json.loads((other.store / "manifest.json").read_text())
    assert "images/train_pool/views/tip/pooled" in manifest["arrays"]
    assert verify_store(other.store) == []


# ---------------------------------------------------------------------------- resumed with other settings


def interrupt_before_publishing(monkeypatch) -> None:
    def stop(self, specs):
        raise KeyboardInterrupt

    monkeypatch.setattr(StoreWriter, "finalize", stop)


RESUMED_WITH = {  # (interrupted run, the run that resumes it): same store key, other arrays planned
    "another view count": (
        {"for_methods": ["tip_adapter"], "views": 2},
        {"for_methods": ["tip_adapter"], "views": 3},
    ),
    "more taps per view": (
        {"for_methods": ["tip_adapter"], "views": 2},
        {"for_methods": ["tip_adapter", "safe_a"], "views": 2},
    ),
}


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
@pytest.mark.parametrize("case", list(RESUMED_WITH))
def test_resuming_with_other_settings_redoes_the_shards_of_the_old_plan(demo, tmp_path, fmt, case):
    first, then = RESUMED_WITH[case]
    opts = {**SMALL, "format": fmt}
    with pytest.MonkeyPatch.context() as mp:
        interrupt_before_publishing(mp)
        with pytest.raises(KeyboardInterrupt):
            api.extract(f"imagefolder:{demo}", cache_dir=tmp_path / "c", **{**opts, **first})
    resumed = api.extract(f"imagefolder:{demo}", cache_dir=tmp_path / "c", **{**opts, **then})
    clean = api.extract(f"imagefolder:{demo}", cache_dir=tmp_path / "ref", **{**opts, **then})
    assert_same_store(clean.store, resumed.store)


def test_a_store_is_not_removed_from_under_a_running_extraction(small_refs, tmp_path):
    root = copy_store(small_refs["zarr"], tmp_path)
    writer = StoreWriter(root, fmt="zarr", manifest={})
    try:
        refused = cli("cache", "rm", "--yes", str(root))
        assert refused.exit_code == 1 and "Another process is writing" in refused.output
        assert (root / "manifest.json").exists()
    finally:
        writer.close()
    assert cli("cache", "rm", "--yes", str(root)).exit_code == 0 and not root.exists()


def test_images_skipped_by_an_interrupted_run_stay_recorded(tmp_path):
    root = tmp_path / "data"
    for split, n in (("train", 3), ("val", 2), ("test", 3)):
        for cls in ("cat", "dog"):
            (root / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (16, 16), (40 * i, 90, 200 if cls == "dog" else 0)).save(
                    root / split / cls / f"{i}.png"
                )
    (root / "test" / "dog" / "1.png").write_bytes(b"")
    with pytest.MonkeyPatch.context() as mp:
        interrupt_before_publishing(mp)
        with pytest.raises(KeyboardInterrupt):
            api.extract(f"imagefolder:{root}", cache_dir=tmp_path / "c", skip_bad=True, **SMALL)
    resumed = api.extract(f"imagefolder:{root}", cache_dir=tmp_path / "c", skip_bad=True, **SMALL)
    manifest = json.loads((resumed.store / "manifest.json").read_text())
    paths = FeatureStore.open(resumed.store).read("images/test/paths")
    assert [paths[i] for i in manifest["skipped"]["test"]] == ["test/dog/1.png"]


# ---------------------------------------------------------------------------- what a store may hold

ZARR_CODECS = {"bytes", "crc32c", "zstd", "vlen-utf8", "vlen-bytes", "transpose"}


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_a_store_holds_only_json_zarr_and_hdf5_never_a_pickle(stores, fmt):
    root = stores[fmt]
    for path in (p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if path.suffix == ".json":
            json.loads(path.read_text())  # whole, plain JSON
        elif rel == ".lock":
            assert path.stat().st_size == 0
        elif rel.startswith("arrays.zarr/"):
            assert fmt == "zarr" and "/c/" in rel, rel  # a chunk; its codecs are checked below
        elif rel == "store.h5" or (rel.startswith("parts/") and path.suffix == ".h5"):
            assert fmt == "hdf5" and h5py.is_hdf5(path), rel
        else:
            pytest.fail(f"unexpected file in a store: {rel}")
    if fmt == "zarr":
        for meta in (root / "arrays.zarr").rglob("zarr.json"):
            spec = json.loads(meta.read_text())
            if spec["node_type"] == "array":
                assert spec["data_type"] != "object" and {c["name"] for c in spec["codecs"]} <= ZARR_CODECS, (
                    meta
                )
                assert "crc32c" in {c["name"] for c in spec["codecs"]}, f"{meta}: every chunk is checksummed"
    else:
        for path in [root / "store.h5", *(root / "parts").glob("*.h5")]:
            with h5py.File(path, "r") as fh:
                datasets = []
                fh.visititems(
                    lambda key, obj: datasets.append((key, obj)) if isinstance(obj, h5py.Dataset) else None
                )
                assert datasets
                for key, ds in datasets:
                    assert ds.dtype.kind in "fiuS", (path, key, ds.dtype)  # no object / opaque / vlen data
                    assert path.name == "store.h5" or ds.fletcher32, (path, key)
