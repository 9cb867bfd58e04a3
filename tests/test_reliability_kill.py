"""Kill ``fsl-cache extract`` at many moments (SIGKILL and SIGINT), resume, and prove nothing is lost.

Cost control: Python + torch + open_clip take ~5 s to import, so the runs are forked from a *zygote*
process that imported everything once (no torch op, no zarr I/O before the fork). Each child runs the
real CLI entry point (``fsl_cache.cli.main``, exactly what ``python -m fsl_cache`` calls) in its own
process and is killed with real signals; one genuine ``python -m fsl_cache extract`` subprocess is
interrupted as well. The kills of one store are chained (kill → resume → kill ...) and spread over
the run by *progress*, not by time: "after the m-th finished shard, at the j-th block write", plus
targeted points (a progress marker, a zarr chunk or HDF5 part being renamed into place, the HDF5
virtual-dataset file, the manifest half-written / written but not renamed / renamed) and a few
kills at seeded random delays. After every kill the store is checked:

- no ``manifest.json`` unless it is complete (then ``verify`` passes and it equals the reference);
- every progress marker is whole and the bytes on disk under it hash to its digests *and* to the
  uninterrupted reference run's digests (a marker never covers a partial shard).

At the end the resumed store must be bit-identical to the uninterrupted one.
"""

from __future__ import annotations

import json
import os
import random
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import zarr
from dataset_helpers import extract_argv

from fsl_cache.datasets import make_demo_dataset
from fsl_cache.store import FeatureStore, verify_store
from fsl_cache.store.backend import _part_file_name
from fsl_cache.store.store import block_digest

REPO = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
INTERRUPTED = "re-run the same command to resume"

ZYGOTE = r"""
import json, os, signal, sys, time, traceback
import numpy, torch, open_clip, zarr, h5py, PIL.Image  # the expensive imports, once
import fsl_cache.cli, fsl_cache.api, fsl_cache.render, fsl_cache.datasets, fsl_cache.backbones
import fsl_cache.extraction.pipeline, fsl_cache.store.store, fsl_cache.store.backend

from pathlib import Path
from fsl_cache.store.backend import HDF5Backend, ZarrBackend

def die(sig):
    if sig == "PAUSE":  # wait for the signal from outside
        time.sleep(600)
    os.kill(os.getpid(), sig)
    time.sleep(30)  # SIGKILL never returns; SIGINT raises KeyboardInterrupt in the main thread

def markers(root):
    return len(list(Path(root).glob("progress/**/*.json")))

def install(fault):
    if not fault:
        return
    sig, point = getattr(signal, fault["signal"], fault["signal"]), fault["point"]
    state = {"calls": 0}
    if point == "write_block":  # the j-th block write once m shards are finished
        for cls in (ZarrBackend, HDF5Backend):
            orig = cls.write_block
            def write_block(self, *a, _orig=orig, **k):
                root = self.path.parent if isinstance(self, ZarrBackend) else self.root
                if markers(root) >= fault["after_markers"]:
                    state["calls"] += 1
                    if state["calls"] == fault["then"]:
                        die(sig)
                return _orig(self, *a, **k)
            cls.write_block = write_block
    elif point.startswith("replace:"):  # os.replace of a given kind of file, before or after
        kind, when = point.split(":")[1:]
        orig = os.replace
        def matches(src, dst):
            src, dst = Path(src), Path(dst)
            return {"marker": dst.parent.parent.name == "progress" or "progress" in dst.parts[-4:-1],
                    "manifest": dst.name == "manifest.json", "store_h5": dst.name == "store.h5",
                    "part": dst.parent.name == "parts", "chunk": src.suffix == ".partial"}[kind]
        def replace(src, dst, *a, **k):
            if matches(src, dst):
                root = next((p for p in Path(dst).parents if (p / "progress").is_dir()), None)
                ready = root is None or markers(root) >= fault.get("after_markers", 0)
                if ready:
                    state["calls"] += 1
                hit = ready and state["calls"] == fault.get("nth", 1)
                if hit and when == "before":
                    die(sig)
                out = orig(src, dst, *a, **k)
                if hit and when == "after":
                    die(sig)
                return out
            return orig(src, dst, *a, **k)
        os.replace = replace
    elif point == "manifest_half":  # the manifest's temp file half written
        import fsl_cache.store.store as store
        orig = store.json.dump
        def dump(obj, fh, *a, **k):
            if getattr(fh, "name", "").endswith("manifest.json.incomplete"):
                text = json.dumps(obj, *a, **k)
                fh.write(text[: len(text) // 2]); fh.flush()
                die(sig)
            return orig(obj, fh, *a, **k)
        store.json.dump = dump
    elif point == "virtual_dataset":  # HDF5 finalize: the n-th array mapped into store.h5.incomplete
        orig = h5py.Group.create_virtual_dataset
        def create(self, *a, **k):
            out = orig(self, *a, **k)
            state["calls"] += 1
            if state["calls"] == fault["nth"]:
                self.file.flush()
                die(sig)
            return out
        h5py.Group.create_virtual_dataset = create
    else:
        raise ValueError(point)

def child(req):
    install(req.get("fault"))
    code = 0
    try:
        fsl_cache.cli.main(req["args"], prog_name="fsl-cache")
    except SystemExit as exit:
        code = exit.code if isinstance(exit.code, int) else (0 if exit.code is None else 1)
    except BaseException:
        traceback.print_exc()
        code = 99
    sys.stdout.flush(); sys.stderr.flush()
    os._exit(code)

for line in sys.stdin:
    req = json.loads(line)
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        fd = os.open(req["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(fd, 1); os.dup2(fd, 2)
        child(req)
    print(json.dumps({"pid": pid}), flush=True)
    _, status = os.waitpid(pid, 0)
    sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
    print(json.dumps({"signal": sig, "code": os.WEXITSTATUS(status) if os.WIFEXITED(status) else None}), flush=True)
"""


class Zygote:
    """Runs CLI commands in forked children of one pre-imported Python process."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE],
            env=ENV,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=workdir,
        )
        self.runs = 0

    def _read(self, timeout: float) -> dict:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError("zygote child did not finish in time")
        line = self.proc.stdout.readline()
        assert line, "the zygote died"
        return json.loads(line)

    def run(
        self,
        args: list[str],
        *,
        fault: dict | None = None,
        kill_after: tuple[str, float] | None = None,
        timeout: float = 120,
    ) -> tuple[dict, str]:
        """Run ``fsl-cache ARGS``; ``kill_after=(signal, seconds)`` sends a signal from outside."""
        self.runs += 1
        log = self.workdir / f"run{self.runs}.log"
        self.proc.stdin.write(json.dumps({"args": args, "fault": fault, "log": str(log)}) + "\n")
        self.proc.stdin.flush()
        pid = self._read(30)["pid"]
        try:
            if kill_after is not None:
                sig, delay = kill_after
                try:
                    status = self._read(delay)
                except TimeoutError:
                    os.kill(pid, getattr(signal, sig))
                    status = self._read(timeout)
            else:
                status = self._read(timeout)
        except TimeoutError:
            os.kill(pid, signal.SIGKILL)
            self._read(30)
            raise
        return status, log.read_text(errors="replace")

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def extract_args(demo: Path, cache: Path, fmt: str) -> list[str]:
    return extract_argv(
        demo,
        cache,
        for_methods="zero_shot,tip_adapter",
        views=3,
        shots="1,2",
        seeds="1,2",
        workers=0,
        batch_size=4,
        format=fmt,
    )


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("data") / "demo")


@pytest.fixture(scope="module")
def zygote(tmp_path_factory):
    z = Zygote(tmp_path_factory.mktemp("zygote"))
    yield z
    z.close()


def store_dir(cache: Path) -> Path:
    found = [p for p in cache.glob("*/*") if p.is_dir()]
    assert len(found) == 1, found
    return found[0]


def read_markers(root: Path) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted(root.glob("progress/**/*.json"))]


def reference_blocks(ref: Path) -> dict[str, set[tuple[int, int, str]]]:
    manifest = json.loads((ref / "manifest.json").read_text())
    return {name: {tuple(b) for b in entry["blocks"]} for name, entry in manifest["arrays"].items()}


def _normalise(block: np.ndarray) -> np.ndarray:
    if block.dtype.kind == "S":
        return np.array([b.decode("utf-8") for b in block], dtype=object)
    return block


def check_store_consistent(root: Path, ref_blocks: dict, fmt: str) -> int:
    """The invariants after a kill; returns how many shard markers were checked against the disk."""
    if (root / "manifest.json").exists():
        manifest = json.loads((root / "manifest.json").read_text())  # whole: it was renamed into place
        assert verify_store(root) == []
        for name, entry in manifest["arrays"].items():
            assert {tuple(b) for b in entry["blocks"]} == ref_blocks[name], name
    checked = 0
    for marker in read_markers(root):
        part = f"{marker['job']}/{marker['shard']:06d}"
        for name, digest in marker["digests"].items():
            block = (marker["start"], marker["stop"], digest)
            assert block in ref_blocks[name], (
                f"marker {part} claims a block the reference never wrote: {name}"
            )
            if fmt == "zarr":
                data = zarr.open_array(str(root / "arrays.zarr" / name), mode="r")[
                    marker["start"] : marker["stop"]
                ]
            else:
                with h5py.File(root / "parts" / _part_file_name(part), "r") as fh:
                    data = fh[f"{name}@{marker['start']}"][...]
            assert block_digest(_normalise(data)) == digest, f"marker {part} covers bytes that differ: {name}"
        checked += 1
    return checked


def assert_bit_identical(ref: Path, new: Path, fmt: str) -> None:
    volatile = ("created", "updated", "versions")
    a, b = (json.loads((p / "manifest.json").read_text()) for p in (ref, new))
    assert {k: v for k, v in a.items() if k not in volatile} == {
        k: v for k, v in b.items() if k not in volatile
    }
    stores = FeatureStore.open(ref), FeatureStore.open(new)
    try:
        for name in a["arrays"]:
            x, y = (s.read(name) for s in stores)
            assert x.dtype == y.dtype and x.shape == y.shape, name
            assert x.tobytes() == y.tobytes() if x.dtype != object else list(x.ravel()) == list(y.ravel()), (
                name
            )
    finally:
        for s in stores:
            s.close()
    if fmt == "zarr":  # chunk for chunk, byte for byte (zarr's *.partial leftovers aside)
        files = {
            p: {
                f.relative_to(p): f.read_bytes()
                for f in (p / "arrays.zarr").rglob("*")
                if f.is_file() and f.suffix != ".partial"
            }
            for p in (ref, new)
        }
        assert files[ref] == files[new]
    assert verify_store(new) == []
    assert not list(new.rglob("*.incomplete")), "temp files of killed writes are cleaned up on publishing"


def schedule(fmt: str, n_markers: int, rng: random.Random) -> list[dict]:
    """The kills of one chain, in run order: by progress, then the finalize and manifest points.

    An external kill comes at a random delay; its run pauses once it reaches its progress point, so
    the signal always finds it unfinished (else every later fault point would go unreached).
    """
    kinds = ["block"] * 7 + ["external:SIGKILL", "external:SIGINT", "marker:before", "marker:after"]
    rng.shuffle(kinds)
    steps = []
    for kind, m in zip(kinds, sorted(rng.sample(range(n_markers), len(kinds)))):
        sig = rng.choice(["SIGKILL", "SIGINT"])
        if kind == "block":
            steps.append(
                {"point": "write_block", "after_markers": m, "then": rng.randint(1, 40), "signal": sig}
            )
        elif kind.startswith("external"):
            steps.append(
                {
                    "point": "write_block",
                    "after_markers": m,
                    "then": 1,
                    "signal": "PAUSE",
                    "external": (kind.split(":")[1], rng.uniform(0.3, 1.2)),
                }
            )
        else:
            steps.append({"point": f"replace:{kind}", "after_markers": m, "signal": sig})
    if fmt == "zarr":  # a chunk (or zarr.json) written to its temp file, not yet renamed
        steps.insert(2, {"point": "replace:chunk:before", "nth": rng.randint(1, 30), "signal": "SIGKILL"})
        tail = []
    else:
        steps.insert(
            2,
            {
                "point": "replace:part:before",
                "nth": rng.randint(1, 3),
                "signal": rng.choice(["SIGKILL", "SIGINT"]),
            },
        )
        tail = [
            {"point": "virtual_dataset", "nth": rng.randint(1, 20)},
            {"point": "replace:store_h5:before"},
            {"point": "replace:store_h5:after"},
        ]
    tail += [
        {"point": "manifest_half"},
        {"point": "replace:manifest:before"},
        {"point": "replace:manifest:after"},
    ]
    for step in tail:
        step["signal"] = rng.choice(["SIGKILL", "SIGINT"])
    return steps + tail


def check_killed(status: dict, log: str, sig: str) -> bool:
    """True if the run was killed (not finished first); SIGINT must exit 130 with one clean message."""
    if status["code"] == 0:
        return False
    assert "Traceback" not in log, log[-3000:]
    if sig == "SIGKILL":
        assert status["signal"] == signal.SIGKILL, (status, log[-2000:])
    else:
        assert status["code"] == 130, (status, log[-2000:])
        assert "interrupted" in log and INTERRUPTED in log, log[-2000:]
    return True


def interrupt_real_cli(demo: Path, cache: Path, fmt: str) -> None:
    """``python -m fsl_cache extract`` for real, SIGINT once its first shard is done."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "fsl_cache", *extract_args(demo, cache, fmt)],
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if any(
            p.parent.name != "whole" and "whole" not in p.parts for p in cache.glob("*/*/progress/*/*.json")
        ):
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err and INTERRUPTED in err and "Traceback" not in err, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("interrupted:"), "the message is the last line"


@pytest.mark.parametrize("fmt", ["zarr", "hdf5"])
def test_kill_anywhere_then_resume_is_bit_identical(demo, zygote, tmp_path, fmt):
    ref_cache = tmp_path / "ref"
    status, log = zygote.run(extract_args(demo, ref_cache, fmt))
    assert status["code"] == 0, log[-3000:]
    ref = store_dir(ref_cache)
    ref_blocks = reference_blocks(ref)
    n_markers = len(read_markers(ref))

    cache = tmp_path / "killed"
    args = extract_args(demo, cache, fmt)
    kills, markers_checked = 0, 0
    if fmt == "zarr":
        interrupt_real_cli(demo, cache, fmt)
        kills += 1
        markers_checked += check_store_consistent(store_dir(cache), ref_blocks, fmt)
    rng = random.Random(f"kill-{fmt}")
    steps = schedule(fmt, n_markers, rng)
    for step in steps:
        status, log = zygote.run(args, fault=step, kill_after=step.get("external"))
        sig = step["external"][0] if "external" in step else step["signal"]
        assert check_killed(status, log, sig), f"the fault point {step} was never reached"
        kills += 1
        markers_checked += check_store_consistent(store_dir(cache), ref_blocks, fmt)

    status, log = zygote.run(args)  # the last resume, left alone
    assert status["code"] == 0, log[-3000:]
    assert_bit_identical(ref, store_dir(cache), fmt)

    # A finished store: re-running rewrites its manifest; a kill half-way leaves the old one whole.
    status, log = zygote.run(args, fault={"point": "manifest_half", "signal": "SIGKILL"})
    kills += check_killed(status, log, "SIGKILL")
    assert verify_store(store_dir(cache)) == []
    status, log = zygote.run(args)
    assert status["code"] == 0, log[-3000:]
    assert_bit_identical(ref, store_dir(cache), fmt)
    print(f"{fmt}: {kills} kills, {markers_checked} shard markers checked against disk and reference")
    assert kills >= 16
