"""Stores on object storage: ``--cache-dir s3://...`` against a local S3 server (moto) started here.

One module-wide store: an extraction killed with SIGKILL in the middle of a remote chunk write, then
resumed, must equal a local uninterrupted extraction block for block; ``cache verify`` passes on it;
two processes then fit and grid from it at once, reading through one local sidecar folder.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from dataset_helpers import extract_argv

pytest.importorskip("s3fs", reason="s3fs is missing: pip install -e '.[test]' (the s3 extra)")
moto_server = pytest.importorskip("moto.server", reason="moto[server] is missing: pip install -e '.[test]'")

from fsl_cache.cli import main  # noqa: E402
from fsl_cache.datasets import make_demo_dataset  # noqa: E402
from fsl_cache.errors import StoreError  # noqa: E402
from fsl_cache.store import FeatureStore, verify_store  # noqa: E402
from fsl_cache.store.location import as_location  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

REPO = Path(__file__).resolve().parents[1]
BUCKET = "fsl-test"
EXTRACT = dict(
    model="fsl-tiny-rn", pretrained="none", for_methods=("zero_shot", "tip_adapter"), shots=(1,), seeds=(1,)
)

KILLED_CHILD = r"""
import os, signal, sys
from fsl_cache.store.backend import ZarrBackend
from fsl_cache.store.store import StoreWriter

shards = {"done": 0}
commit = StoreWriter.commit
def counting_commit(self, marker):
    commit(self, marker)
    shards["done"] += not marker.job.startswith("whole/")
StoreWriter.commit = counting_commit

write_block = ZarrBackend.write_block
def dying_write_block(self, spec, start, data, **kw):
    if shards["done"] and len(data) > 1:  # half a block on S3, then killed mid-write
        write_block(self, spec, start, data[: len(data) // 2], **kw)
        os.kill(os.getpid(), signal.SIGKILL)
    return write_block(self, spec, start, data, **kw)
ZarrBackend.write_block = dying_write_block

import fsl_cache.cli
fsl_cache.cli.main(sys.argv[1:], prog_name="fsl-cache")
"""

FIT_AND_GRID = r"""
import sys
import fsl_cache.cli
for args in (sys.argv[1].split("|"), sys.argv[2].split("|")):
    try:
        fsl_cache.cli.main(args, prog_name="fsl-cache")
    except SystemExit as exit:
        if exit.code:
            raise
"""


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on a free local port, its bucket, and the environment that points at it."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "FSL_SIDECAR_DIR": str(tmp_path_factory.mktemp("sidecars")),
    }
    with pytest.MonkeyPatch.context() as mp:
        for name, value in env.items():
            mp.setenv(name, value)
        import boto3

        boto3.client("s3").create_bucket(Bucket=BUCKET)
        yield env
    server.stop()


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("data") / "demo")


def extract_args(demo: Path, cache: str) -> list[str]:
    return extract_argv(
        demo, cache, for_methods="zero_shot,tip_adapter", views=11, shots=1, seeds=1, workers=0, batch_size=64
    )


def child_env(s3: dict) -> dict:
    return {**os.environ, **s3, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}


@pytest.fixture(scope="module")
def remote_store(s3, demo, tmp_path_factory):
    """The store at ``s3://BUCKET/cache``: killed mid-write in a child process, resumed here."""
    cache = f"s3://{BUCKET}/cache"
    killed = subprocess.run(
        [sys.executable, "-c", KILLED_CHILD, *extract_args(demo, cache)],
        env=child_env(s3),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert killed.returncode == -9, killed.stderr[-3000:]
    (folder,) = [p for p in as_location(cache).glob("*/*")]
    assert not (folder / "manifest.json").exists() and (folder / ".lock").exists()
    markers = list(folder.glob("progress/**/*.json"))
    assert any("whole" not in p.parts for p in markers), "killed before any shard was finished"

    resumed = CliRunner().invoke(main, extract_args(demo, cache))  # takes over the dead writer's lease
    assert resumed.exit_code == 0, resumed.output
    assert not (folder / ".lock").exists(), "the lease is released after the run"
    return cache, folder


def test_killed_remote_extraction_resumes_to_the_uninterrupted_store(remote_store, demo, tmp_path):
    _, folder = remote_store
    runner = CliRunner()
    local = runner.invoke(main, extract_args(demo, str(tmp_path / "local")))
    assert local.exit_code == 0, local.output
    ref = FeatureStore.open(next((tmp_path / "local").glob("*/*")))
    remote = FeatureStore.open(str(folder))
    assert remote.fingerprint == ref.fingerprint
    assert set(remote.arrays) == set(ref.arrays)
    for name, entry in ref.arrays.items():  # every block of every array, by its digest: nothing lost
        assert remote.arrays[name]["blocks"] == entry["blocks"], name
    name = next(n for n in ref.arrays if n.startswith("images/test/views/"))
    assert (remote.read(name) == ref.read(name)).all()


def test_cache_ls_info_verify_on_s3(remote_store):
    cache, folder = remote_store
    key = FeatureStore.open(str(folder)).fingerprint
    runner = CliRunner()
    listed = runner.invoke(main, ["cache", "ls", "--json", "--cache-dir", cache])
    assert listed.exit_code == 0, listed.output
    (entry,) = [json.loads(line) for line in listed.output.splitlines() if line.strip()]
    assert entry["key"] == key and entry["finished"] and entry["bytes"] > 0
    verified = runner.invoke(main, ["cache", "verify", key[:8], "--cache-dir", cache])
    assert verified.exit_code == 0, verified.output
    info = runner.invoke(main, ["cache", "info", key[:8], "--json", "--cache-dir", cache])
    assert info.exit_code == 0 and key in info.output


def test_two_processes_fit_and_grid_from_one_s3_store(remote_store, s3, demo, tmp_path):
    cache, folder = remote_store
    key = FeatureStore.open(str(folder)).fingerprint
    common = ["--dataset", f"imagefolder:{demo}", "--model", "fsl-tiny-rn", "--pretrained", "none"]
    common += ["--cache-dir", cache, "--shots", "1"]
    env = {**child_env(s3), "FSL_FIT_MEMORY_GB": "1e-9"}  # stream the views: through the local sidecar
    procs = []
    for i in range(2):
        runs = str(tmp_path / f"runs{i}")
        fit = ["fit", "tip_adapter", *common, "--seed", "1", "--runs-dir", runs]
        grid = ["grid", "zero_shot,tip_adapter", *common, "--seeds", "1", "--runs-dir", runs]
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", FIT_AND_GRID, "|".join(fit), "|".join(grid)],
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    for proc in procs:
        out, err = proc.communicate(timeout=240)
        assert proc.returncode == 0, err[-3000:]
    results = []
    for i in range(2):
        records = sorted((tmp_path / f"runs{i}").glob("**/record.json"))
        assert len(records) == 2  # tip_adapter (fit; the grid skips it), zero_shot
        results.append({str(r.relative_to(tmp_path / f"runs{i}")): _metrics(r) for r in records})
    assert results[0] == results[1]
    sidecars = Path(s3["FSL_SIDECAR_DIR"]) / key[:16] / "unpacked"
    assert list(sidecars.glob("*.npy")), "remote views are read through local sidecars"
    assert not list(folder.glob("unpacked/*")), "nothing is unpacked into the remote store"


def _metrics(path: Path) -> dict:
    record = json.loads(path.read_text())
    return record.get("metrics", record.get("results"))


def test_hdf5_on_s3_is_refused_with_a_clear_error(s3):
    with pytest.raises(StoreError, match="HDF5 stores need a local --cache-dir"):
        from fsl_cache.store.backend import open_backend

        open_backend(as_location(f"s3://{BUCKET}/h5/ds/st"), "hdf5", mode="a")


def test_a_live_writer_keeps_others_out_of_a_remote_store(s3):
    from fsl_cache.store.store import _acquire_lock

    root = as_location(f"s3://{BUCKET}/locked/ds/st")
    held = _acquire_lock(root)
    try:
        with pytest.raises(StoreError, match=f"Another process is writing .*pid {os.getpid()}"):
            _acquire_lock(root)
    finally:
        held.close()
    _acquire_lock(root).close()  # released: free again


def test_two_torchrun_ranks_write_one_remote_store(s3, demo, tmp_path):
    """Rank 0 holds the lease, both ranks write their own shards to S3: the store equals a local one-process
    extraction block for block, and verifies clean."""
    cache = f"s3://{BUCKET}/ranks"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    ranks = subprocess.run(
        [*torchrun, "-m", "fsl_cache", *extract_args(demo, cache)],
        env=child_env(s3),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert ranks.returncode == 0, ranks.stderr[-3000:]
    local = CliRunner().invoke(main, extract_args(demo, str(tmp_path / "local")))
    assert local.exit_code == 0, local.output
    (folder,) = as_location(cache).glob("*/*")
    remote, ref = FeatureStore.open(str(folder)), FeatureStore.open(next((tmp_path / "local").glob("*/*")))
    assert remote.fingerprint == ref.fingerprint and remote.arrays.keys() == ref.arrays.keys()
    for name, entry in ref.arrays.items():
        assert remote.arrays[name]["blocks"] == entry["blocks"], name
    assert verify_store(str(folder)) == []
    assert len({p.stem for p in folder.glob("progress/*/*.json")}) > 1, "the work was split into shards"
    assert not (folder / ".lock").exists()
