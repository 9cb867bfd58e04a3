"""Killed, preempted or out of room: the re-run goes through at once.

- kill -9 of ``extract`` while its decoding workers run: the workers die with it and do not hold
  the store's lock, so the re-run starts at once and ends identical to an uninterrupted run;
- SIGTERM (a scheduler's preemption) stops ``extract``, ``fit`` and ``grid`` like Ctrl-C: exit 143,
  one line saying what was kept and the command that resumes, claims released, resumed results equal;
- claims of runs carry a heartbeat and the owner's process start time;
- the up-front disk check counts what a store takes on disk, not only its array bytes.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dataset_helpers import extract_argv

from fsl_cache import api
from fsl_cache.datasets import make_demo_dataset
from fsl_cache.errors import DiskFullError, StoreError
from fsl_cache.extraction.pipeline import ExtractOptions, prepare_extraction
from fsl_cache.store.store import StoreWriter, _acquire_lock
from fsl_cache.sweeps import try_claim
from fsl_cache.sweeps.claims import claim_path, process_start, stale_owner
from fsl_cache.testing import make_synthetic_store

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
EXTRACT = {
    "model": "fsl-tiny-rn",
    "pretrained": "none",
    "for_methods": ["zero_shot", "tip_adapter"],
    "views": 2,
    "shots": (1, 2),
    "seeds": (1, 2),
    "batch_size": 8,
}
"""About 2 s in one process: 100 test images in 2 shards, a few train and val pools, 2 views."""
SYNTH = {"model": "synthetic", "pretrained": "none"}
RESUME = "re-run the same command to resume: fsl-cache"

pytestmark = pytest.mark.usefixtures("one_thread")  # bit-identical comparisons (tests/conftest.py)
linux_only = pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads /proc")


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("data") / "demo")


@pytest.fixture(scope="module")
def reference(demo, tmp_path_factory) -> Path:
    """The uninterrupted store."""
    cache = tmp_path_factory.mktemp("ref")
    return api.extract(f"imagefolder:{demo}", cache_dir=cache, workers=0, progress=False, **EXTRACT).store


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    cache = tmp_path_factory.mktemp("synthetic")
    make_synthetic_store(cache, views={"tip": 21})
    return cache


def extract_command(demo: Path, cache: Path) -> list[str]:
    e = EXTRACT
    return extract_argv(
        demo,
        cache,
        model=e["model"],
        for_methods=",".join(e["for_methods"]),
        views=e["views"],
        shots="1,2",
        seeds="1,2",
        batch_size=e["batch_size"],
        workers=2,
    )


def start(args: list[str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "fsl_cache", *args],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def children(pid: int) -> list[int]:
    """Live worker processes of ``pid`` (zombies and multiprocessing's resource tracker excluded)."""
    found = []
    for proc in Path("/proc").iterdir():
        try:
            fields = (proc / "stat").read_text().rsplit(")", 1)[1].split()
            command = (proc / "cmdline").read_bytes()
        except (OSError, IndexError):
            continue
        if (
            proc.name.isdigit()
            and int(fields[1]) == pid
            and fields[0] != "Z"
            and b"resource_tracker" not in command
        ):
            found.append(int(proc.name))
    return found


def alive(pids: list[int]) -> list[int]:
    return [p for p in pids if process_start(p) is not None]


def wait_for(condition, proc: subprocess.Popen, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if value := condition():
            return value
        time.sleep(0.02)
    raise AssertionError(f"never happened (exit {proc.poll()}): {proc.stderr.read()[-2000:]}")


def shard_markers(cache: Path) -> list[Path]:
    return [p for p in cache.glob("*/*/progress/*/*.json") if p.parent.name != "whole"]


def store_dir(cache: Path) -> Path:
    (found,) = [p for p in cache.glob("*/*") if p.is_dir()]
    return found


def assert_identical(ref: Path, new: Path) -> None:
    """Same manifest (timestamps aside) and the same bytes in every array file."""
    volatile = ("created", "updated", "versions")
    a, b = (json.loads((p / "manifest.json").read_text()) for p in (ref, new))
    assert {k: v for k, v in a.items() if k not in volatile} == {
        k: v for k, v in b.items() if k not in volatile
    }
    files = [
        {f.relative_to(p): f.read_bytes() for f in (p / "arrays.zarr").rglob("*") if f.is_file()}
        for p in (ref, new)
    ]
    assert files[0] == files[1]


def assert_stopped(proc: subprocess.Popen, sent: float, *, code: int, command: str) -> float:
    """One clean last line naming what was kept and the resume command; returns seconds to exit."""
    _, err = proc.communicate(timeout=60)
    seconds = time.monotonic() - sent
    assert proc.returncode == code, err[-2000:]
    assert "Traceback" not in err, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert last.startswith("terminated:") and f"{RESUME} {command}" in last, last
    return seconds


# ---------------------------------------------------------------------------- kill -9 and the lock


@linux_only
def test_workers_die_with_a_killed_extraction_and_the_rerun_goes_through(demo, reference, tmp_path):
    cache = tmp_path / "cache"
    proc = start(extract_command(demo, cache))
    workers = wait_for(lambda: shard_markers(cache) and children(proc.pid), proc)
    assert len(workers) == 2
    proc.kill()
    proc.wait()
    killed = time.monotonic()
    _acquire_lock(store_dir(cache)).close()  # at once: no worker holds the lock
    while alive(workers) and time.monotonic() - killed < 3.0:
        time.sleep(0.02)
    survived = time.monotonic() - killed
    assert not alive(workers), f"decoding workers still alive {survived:.1f} s after the kill"
    print(f"workers gone {survived:.2f} s after kill -9")
    resumed = api.extract(f"imagefolder:{demo}", cache_dir=cache, workers=0, progress=False, **EXTRACT)
    assert_identical(reference, resumed.store)


def test_forked_children_do_not_hold_the_store_lock(tmp_path):
    writer = StoreWriter(tmp_path / "store", fmt="zarr", manifest={})
    ready, tell = os.pipe()
    child = os.fork()
    if child == 0:  # a worker that outlives its parent's hold on the store
        os.write(tell, b"1")
        time.sleep(5)
        os._exit(0)
    try:
        assert os.read(ready, 1) == b"1"  # the child runs (its fork handlers have run)
        writer.close()
        _acquire_lock(tmp_path / "store").close()
    finally:
        os.kill(child, signal.SIGKILL)
        os.waitpid(child, 0)


def test_a_held_lock_names_its_holder(tmp_path):
    writer = StoreWriter(tmp_path / "store", fmt="zarr", manifest={})
    try:
        with pytest.raises(StoreError) as info:
            _acquire_lock(tmp_path / "store")
    finally:
        writer.close()
    message = str(info.value)
    assert message.startswith(f"Another process is writing {tmp_path / 'store'}: pid {os.getpid()} on ")
    assert socket.gethostname() in message and "since 20" in message and "running `" in message


# ---------------------------------------------------------------------------- SIGTERM


@linux_only
def test_sigterm_stops_extract_at_once_and_the_resumed_store_is_identical(demo, reference, tmp_path):
    cache = tmp_path / "cache"
    args = extract_command(demo, cache)
    proc = start(args)
    workers = wait_for(lambda: shard_markers(cache) and children(proc.pid), proc)
    proc.terminate()
    seconds = assert_stopped(proc, time.monotonic(), code=143, command="extract --dataset")
    assert not alive(workers)
    print(f"extract: exit 143 {seconds:.2f} s after SIGTERM")
    assert seconds < 20  # a scheduler grants tens of seconds; most of this is the interpreter exiting
    assert not (store_dir(cache) / "manifest.json").exists() and shard_markers(cache)
    resumed = api.extract(f"imagefolder:{demo}", cache_dir=cache, workers=0, progress=False, **EXTRACT)
    assert_identical(reference, resumed.store)


def metrics(runs: Path) -> dict[str, dict]:
    return {
        str(p.parent.relative_to(runs)): json.loads(p.read_text())["metrics"]
        for p in runs.glob("*/*/*/*/record.json")
    }


FIT = {"dataset": "synthetic", "shots": 2, "seeds": (1, 2, 3), "options": {"epochs": "200"}, **SYNTH}


def test_sigterm_stops_fit_and_the_resumed_runs_are_identical(synthetic, tmp_path):
    runs = tmp_path / "runs"
    args = ["fit", "tip_adapter_f", "--dataset", "synthetic", "--shots", "2", "--seed", "1,2,3", "-o"]
    args += ["epochs=200", "--model", "synthetic", "--pretrained", "none", "--cache-dir", str(synthetic)]
    proc = start([*args, "--runs-dir", str(runs)])
    wait_for(lambda: metrics(runs), proc)
    proc.terminate()
    seconds = assert_stopped(proc, time.monotonic(), code=143, command="fit tip_adapter_f")
    print(f"fit: exit 143 {seconds:.2f} s after SIGTERM")
    assert 1 <= len(metrics(runs)) < 3, "stopped between runs"
    api.fit("tip_adapter_f", cache_dir=synthetic, runs_dir=runs, progress=False, **FIT)
    api.fit("tip_adapter_f", cache_dir=synthetic, runs_dir=tmp_path / "ref", progress=False, **FIT)
    assert metrics(runs) == metrics(tmp_path / "ref") and len(metrics(runs)) == 3


GRID = {"datasets": ["synthetic"], "shots": (2,), "seeds": (1, 2, 3), "options": {"epochs": ("60", "61")}}


@linux_only
def test_sigterm_stops_a_grid_releases_its_claims_and_it_resumes_identically(synthetic, tmp_path):
    runs = tmp_path / "runs"
    args = ["grid", "tip_adapter_f", "--dataset", "synthetic", "--shots", "2", "--seeds", "1,2,3"]
    args += ["-o", "epochs=60,61", "--model", "synthetic", "--pretrained", "none", "--workers", "2"]
    args += ["--group-size", "1", "--cache-dir", str(synthetic), "--runs-dir", str(runs)]
    proc = start(args)
    wait_for(lambda: len(metrics(runs)) >= 2 and len(children(proc.pid)) >= 2, proc)
    workers = children(proc.pid)
    proc.terminate()
    seconds = assert_stopped(proc, time.monotonic(), code=143, command="grid tip_adapter_f")
    print(f"grid: exit 143 {seconds:.2f} s after SIGTERM, {len(metrics(runs))} of 6 runs kept")
    assert not alive(workers) and seconds < 20
    # released; a worker stopped between linking its claim and holding it leaves one only a dead process owns
    left = list((runs / ".claims").glob("*.claim"))
    assert all(stale_owner(path) is not None for path in left), "no live claim remains"
    assert len(metrics(runs)) < 6
    resumed = api.grid(["tip_adapter_f"], cache_dir=synthetic, runs_dir=runs, **GRID, **SYNTH)
    assert resumed.count("failed") == 0 and resumed.count("busy") == 0
    api.grid(["tip_adapter_f"], cache_dir=synthetic, runs_dir=tmp_path / "ref", **GRID, **SYNTH)
    assert metrics(runs) == metrics(tmp_path / "ref") and len(metrics(runs)) == 6


# ---------------------------------------------------------------------------- claims


def write_claim(runs: Path, key: str, **owner) -> Path:
    path = claim_path(runs, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"started": 0, "token": "theirs", **owner}))
    return path


def test_a_claim_from_another_host_is_taken_over_once_its_heartbeat_is_stale(tmp_path):
    path = write_claim(tmp_path, "a" * 64, host="node-7", pid=os.getpid(), pid_started=1)
    assert try_claim(tmp_path, "a" * 64, stale_after=30) is None  # fresh heartbeat: the owner runs
    os.utime(path, (time.time() - 31, time.time() - 31))
    claim = try_claim(tmp_path, "a" * 64, stale_after=30)
    assert claim is not None and json.loads(path.read_text())["host"] == socket.gethostname()
    claim.release()


def test_a_claim_whose_pid_now_belongs_to_another_process_is_taken_over(tmp_path):
    mine = process_start(os.getpid())
    write_claim(tmp_path, "b" * 64, host=socket.gethostname(), pid=os.getpid(), pid_started=mine)
    assert try_claim(tmp_path, "b" * 64) is None  # this very process: alive
    if mine:  # on Linux the start time tells a reused pid apart
        write_claim(tmp_path, "c" * 64, host=socket.gethostname(), pid=os.getpid(), pid_started=mine - 1)
        claim = try_claim(tmp_path, "c" * 64)
        assert claim is not None
        claim.release()


def test_a_held_claim_keeps_its_heartbeat_fresh(tmp_path):
    claim = try_claim(tmp_path, "d" * 64, stale_after=0.4)  # a heartbeat every 0.1 s
    try:
        time.sleep(1.0)
        assert try_claim(tmp_path, "d" * 64, stale_after=0.4) is None
    finally:
        claim.release()
    assert not claim.path.exists()


# ---------------------------------------------------------------------------- disk space


@pytest.fixture
def small_disk(tmp_path):
    """Mount a tmpfs of a given size under tmp_path (root, or a user namespace); None if not allowed."""
    mounted = []

    def mount(size: int) -> Path | None:
        point = tmp_path / f"disk{len(mounted)}"
        point.mkdir()
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(point)], capture_output=True
        )
        if done.returncode != 0:
            return None
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], check=False)


SMALL = {
    "model": "fsl-tiny-rn",
    "pretrained": "none",
    "for_methods": ["zero_shot"],
    "shots": (1,),
    "seeds": (1,),
}


def test_the_disk_check_counts_blocks_and_metadata_not_only_array_bytes(
    demo, tmp_path, small_disk, monkeypatch
):
    import fsl_cache.extraction.pipeline as pipeline

    options = ExtractOptions(for_methods=("zero_shot",), shots=(1,), seeds=(1,), workers=0, batch_size=16)
    prepared = prepare_extraction(
        f"imagefolder:{demo}",
        root=None,
        model="fsl-tiny-rn",
        pretrained="none",
        cache_dir=tmp_path,
        options=options,
    )
    data, on_disk = prepared.plan.new_bytes, prepared.disk_bytes
    assert on_disk > 4 * data  # a small store is mostly blocks of small files and folders
    extract = dict(workers=0, batch_size=16, progress=False, **SMALL)
    page = 4096
    between = (data + (on_disk - data) // 3) // page * page  # the arrays fit, the store does not
    disk = small_disk(between)
    if disk is None:  # no mount allowed here: the free-space probe says the same
        monkeypatch.setattr(pipeline, "_free_bytes", lambda path: between)
        with pytest.raises(DiskFullError, match="takes up to .* on disk"):
            api.extract(f"imagefolder:{demo}", cache_dir=tmp_path / "probe", **extract)
        return
    with pytest.raises(DiskFullError, match="Not enough disk space: this extraction takes up to"):
        api.extract(f"imagefolder:{demo}", cache_dir=disk, **extract)
    assert not list(disk.iterdir()), "refused before writing anything"
    with monkeypatch.context() as mp:  # counting array bytes only, the run would start and hit a full disk
        mp.setattr(pipeline, "check_fits", lambda need, free_bytes: None)
        with pytest.raises(DiskFullError, match="Disk full while writing"):
            api.extract(f"imagefolder:{demo}", cache_dir=disk, **extract)
    roomy = small_disk(-(-on_disk // page) * page)  # as much as the check asks for is enough
    result = api.extract(f"imagefolder:{demo}", cache_dir=roomy, **extract)
    used = shutil.disk_usage(roomy).used
    print(f"arrays {data} B, estimate {on_disk} B, tmpfs used {used} B")
    assert used <= on_disk and result.images > 0
