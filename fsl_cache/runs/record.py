"""Run records: one folder per run with ``record.json`` and ``head.safetensors``, written whole or not at all.

The folder name carries the run fingerprint (store fingerprint + method + resolved config + shots
+ seed + protocol + code version), so a finished run is found, and not recomputed, by its path.
"""

from __future__ import annotations

import json
import os
import platform
import time
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .. import __version__
from ..backbones.encoder import ZS_SCALE
from ..errors import UsageError
from ..methods import get_method
from ..store.fingerprint import dataset_dirname, fingerprint
from ..store.store import write_json_atomic

FIT_VERSION = 1
"""Bump when stage two changes what a run computes for the same inputs (invalidates old records)."""
RECORD, HEAD = "record.json", "head.safetensors"
RECORD_SCHEMA = 1
RENAMED = {("capt", "CaptHead"): "capt_c"}
"""(recorded method, head class) → today's name: runs recorded as ``capt`` before issue 13 trained what is
now ``capt_c`` (its head class ``CaptHead`` tells them from the prompt-tuning ``capt``)."""


def method_of(record: dict) -> str:
    """The registered name of the method of a run record or bundle meta (renamed methods included)."""
    head = record.get("head") or {}
    return RENAMED.get((record.get("method"), head.get("class")), record.get("method"))


def validation_of(record: dict) -> str:
    """The validation regime of a run record. Records from before regimes were recorded used the K-shot val,
    or under ``--protocol paper`` the whole val split when their method searches it and the store had it."""
    if "validation" in record:
        return record["validation"]
    try:
        full_val = get_method(method_of(record)).cls.paper_full_val
    except UsageError:  # a method no longer registered
        full_val = False
    val = (record.get("splits") or {}).get("val") or {}
    paper_full = record.get("protocol") == "paper" and full_val and val.get("pool") == "val_full"
    return "full" if paper_full else "kshot"


def default_runs_dir() -> Path:
    return Path(os.environ.get("FSL_RUNS_DIR", "runs"))


def run_fingerprint(
    *,
    store_fingerprint: str,
    method: str,
    config: dict,
    shots: int,
    seed: int,
    protocol: str,
    targets: dict[str, str] | None = None,
    logit_scale: float = ZS_SCALE,
    validation: str | None = None,
) -> str:
    """The run's key; ``targets`` (domain-shift target → store fingerprint) count only when given, the
    store's zero-shot ``logit_scale`` only when it is not 100 (the store key does not hold it), the
    ``validation`` regime only when it is not the protocol's default (``None``)."""
    parts = {
        "store": store_fingerprint,
        "method": method,
        "config": config,
        "shots": shots,
        "seed": seed,
        "protocol": protocol,
        "code": {"fsl_cache": __version__, "fit_version": FIT_VERSION},
    }
    if targets:  # runs without targets keep the keys they always had
        parts["targets"] = targets
    if logit_scale != ZS_SCALE:  # likewise runs on stores at the scale every store had before
        parts["logit_scale"] = logit_scale
    if validation is not None:  # likewise runs under their protocol's own regime
        parts["validation"] = validation
    return fingerprint(parts)


def run_dir(
    runs_dir: Path,
    *,
    dataset: str,
    store_dir: str,
    method: str,
    shots: int,
    seed: int,
    protocol: str,
    key: str,
) -> Path:
    """``runs/<dataset>/<store folder>/<method>/k<K>-s<S>-<protocol>-<key16>``."""
    return (
        Path(runs_dir)
        / dataset_dirname(dataset)
        / store_dir
        / method
        / f"k{shots}-s{seed}-{protocol}-{key[:16]}"
    )


def load_record(path: Path, *, key: str) -> dict | None:
    """The finished record in ``path`` if it has this fingerprint and its head file, else ``None``."""
    record_path = path / RECORD
    if not record_path.is_file() or not (path / HEAD).is_file():
        return None
    try:
        record = json.loads(record_path.read_text())
    except json.JSONDecodeError:
        return None
    return record if record.get("run_fingerprint") == key else None


def write_run(path: Path, record: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Head first, record last, each through a temp file and a rename: a record means a whole run."""
    path.mkdir(parents=True, exist_ok=True)
    (path / RECORD).unlink(missing_ok=True)  # a forced re-run is unfinished until its record lands
    tmp = path / (HEAD + ".incomplete")
    plain = {k: v.detach().cpu().contiguous().clone() for k, v in tensors.items()}
    save_file(
        plain, str(tmp), metadata={"method": record["method"], "run_fingerprint": record["run_fingerprint"]}
    )
    os.replace(tmp, path / HEAD)
    write_json_atomic(path / RECORD, record)


def load_head_tensors(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(path) / HEAD))


def versions() -> dict[str, str | None]:
    """Library versions that can change a run's numbers."""
    out: dict[str, str | None] = {"fsl_cache": __version__, "python": platform.python_version()}
    for package in ("torch", "numpy", "scikit-learn", "open_clip_torch", "zarr", "h5py", "safetensors"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = None
    return out


@dataclass(frozen=True)
class RunResult:
    """One finished run as ``fit`` returns it (and as ``--json`` prints it)."""

    method: str
    dataset: str
    shots: int
    seed: int
    protocol: str
    val_acc: float | None
    """``None`` under ``--validation none`` (no val is read)."""
    test_acc: float
    val_mean_per_class: float | None
    test_mean_per_class: float
    heads: dict[str, dict[str, float]]
    """Per head: val and test top-1 (methods with several heads, e.g. LDC)."""
    run_dir: Path
    run_fingerprint: str
    store_fingerprint: str
    reused: bool
    """True when the record existed and nothing was recomputed."""
    seconds: float
    warnings: tuple[str, ...] = ()
    validation: str = "kshot"

    @classmethod
    def from_record(cls, record: dict, path: Path, *, reused: bool) -> RunResult:
        m = record["metrics"]
        val = m["val"]
        heads = {
            name: {"val": val[name]["top1"] if val else None, "test": m["test"][name]["top1"]}
            for name in m["test"]
        }
        return cls(
            method=method_of(record),
            dataset=record["dataset"],
            shots=record["shots"],
            seed=record["seed"],
            protocol=record["protocol"],
            val_acc=m["val_acc"],
            test_acc=m["test_acc"],
            val_mean_per_class=val[m["headline"]]["mean_per_class"] if val else None,
            test_mean_per_class=m["test"][m["headline"]]["mean_per_class"],
            heads=heads,
            run_dir=path,
            run_fingerprint=record["run_fingerprint"],
            store_fingerprint=record["store"]["fingerprint"],
            reused=reused,
            seconds=record["timings"]["total_s"],
            warnings=tuple(record.get("warnings", [])),
            validation=validation_of(record),
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "dataset": self.dataset,
            "shots": self.shots,
            "seed": self.seed,
            "protocol": self.protocol,
            "validation": self.validation,
            "val_acc": _rounded(self.val_acc),
            "test_acc": round(self.test_acc, 4),
            "val_mean_per_class": _rounded(self.val_mean_per_class),
            "test_mean_per_class": round(self.test_mean_per_class, 4),
            "heads": self.heads,
            "run_dir": str(self.run_dir),
            "run_fingerprint": self.run_fingerprint,
            "store": self.store_fingerprint,
            "reused": self.reused,
            "seconds": round(self.seconds, 3),
            "warnings": list(self.warnings),
        }


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
