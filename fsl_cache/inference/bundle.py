"""A trained head with everything needed to apply it to images, from a run folder or an exported folder.

A run folder (``runs/.../k4-s1-coop-…``) holds ``record.json`` and ``head.safetensors``; class names,
templates, text weights and the backbone's identity come from its store. ``export`` copies all of
that into one self-contained folder (no cache needed)::

    OUT_DIR/
      bundle.json         method, head class/inputs, config, class names, templates, backbone spec,
                          its fingerprint parts and preprocessing, store precision, tap shapes
      head.safetensors    the head's tensors (as the run saved them)
      text.safetensors    class text weights per template set ("text/<set>")
      record.json         the run record (provenance: splits, metrics, versions, deviations)
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..errors import StoreError, UsageError
from ..runs.record import HEAD, RECORD, default_runs_dir, method_of
from ..store.store import FeatureStore

BUNDLE, TEXT = "bundle.json", "text.safetensors"
BUNDLE_FORMAT, BUNDLE_VERSION = "fsl-cache-head", 1


@dataclass(frozen=True)
class HeadBundle:
    """A head's tensors plus its description (``meta``, the content of ``bundle.json``)."""

    meta: dict[str, Any]
    state: dict[str, torch.Tensor]
    text: dict[str, torch.Tensor]
    """``{template set: [C, D]}`` class text weights of the store."""
    source: Path

    @property
    def method(self) -> str:
        """The registered method (a run recorded under a method's former name rebuilds under today's)."""
        return method_of(self.meta)

    @property
    def classnames(self) -> list[str]:
        return list(self.meta["classnames"])

    @property
    def inputs(self) -> tuple[str, ...]:
        return tuple(self.meta["head"]["inputs"])


def load_bundle(path: str | Path) -> HeadBundle:
    """The head in ``path``: an exported folder (``bundle.json``) or a run folder (``record.json``)."""
    path = Path(path)
    if (path / BUNDLE).is_file():
        meta = json.loads((path / BUNDLE).read_text())
        if meta.get("format") != BUNDLE_FORMAT:
            raise UsageError(f"{path / BUNDLE} is not an fsl-cache export")
        text = load_file(str(path / TEXT)) if (path / TEXT).is_file() else {}
        return HeadBundle(
            meta, load_file(str(path / HEAD)), {k.split("/", 1)[1]: v for k, v in text.items()}, path
        )
    if (path / RECORD).is_file() and (path / HEAD).is_file():
        meta, text = meta_from_run(path)
        return HeadBundle(meta, load_file(str(path / HEAD)), text, path)
    raise UsageError(
        f"{path} is neither a run folder (record.json + head.safetensors) nor an export (bundle.json)"
    )


def meta_from_run(run_dir: Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``bundle.json``'s content for a run, read from its record and its store (which must still exist)."""
    record = json.loads((run_dir / RECORD).read_text())
    store_path = Path(record["store"]["path"])
    if not (store_path / "manifest.json").is_file():
        raise StoreError(
            f"The store of run {run_dir} is gone ({store_path}); predict from an export instead "
            "(fsl-cache export RUN OUT_DIR while the store exists)"
        )
    store = FeatureStore.open(store_path)
    try:
        if store.fingerprint != record["store"]["fingerprint"]:
            raise StoreError(f"{store_path} now holds another store than run {run_dir} was fitted on")
        m = store.manifest
        text = {
            name.split("/", 1)[1]: torch.from_numpy(store.read(name)).float()
            for name in store.arrays
            if name.startswith("text/")
        }
        meta = {
            "format": BUNDLE_FORMAT,
            "version": BUNDLE_VERSION,
            "method": method_of(record),
            "head": record["head"],
            "config": record["config"],
            "options": record.get("options", {}),
            "classnames": list(m["dataset"]["classnames"]),
            "templates": m["dataset"].get("templates", {}),
            "backbone": {
                **{
                    k: m["backbone"].get(k)
                    for k in (
                        "arch",
                        "pretrained",
                        "kind",
                        "embed_dim",
                        "random_init",
                        "quick_gelu",
                        "dense_tap",
                        "compute_dtype",
                    )
                },
                "preprocess_cfg": m["backbone"].get("preprocess_cfg"),
                "fingerprint_parts": m["fingerprint_parts"]["backbone"],
            },
            "precision": m.get("precision", "fp16"),
            "zs_scale": m.get("zs_scale", 100.0),
            "tap_shapes": tap_shapes(store, record["head"]["inputs"]),
            "run": {k: record[k] for k in ("dataset", "shots", "seed", "protocol", "run_fingerprint")}
            | {
                "store_fingerprint": store.fingerprint,
                "test_acc": record["metrics"]["test_acc"],
                "val_acc": record["metrics"]["val_acc"],
            },
        }
    finally:
        store.close()
    return meta, text


def tap_shapes(store, taps) -> dict[str, list[int]]:
    """Per-image shape of each center-view tap (no batch or view axis), from any pool that has it."""
    shapes = {}
    for tap in taps:
        for name, entry in store.arrays.items():
            if name.endswith(f"/views/center/{tap}"):
                shapes[tap] = list(entry["shape"][2:])
                break
    return shapes


def export_bundle(run: str | Path, out_dir: str | Path) -> Path:
    """Write the run's head as a self-contained folder (written whole: ``OUT.incomplete`` then renamed)."""
    bundle = load_bundle(run)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"{out} exists and is not empty; choose a new folder")
    tmp = out.with_name(out.name + ".incomplete")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(
        {k: v.contiguous() for k, v in bundle.state.items()},
        str(tmp / HEAD),
        metadata={"method": bundle.method, "format": BUNDLE_FORMAT},
    )
    save_file({f"text/{k}": v.contiguous() for k, v in bundle.text.items()}, str(tmp / TEXT))
    (tmp / BUNDLE).write_text(json.dumps(bundle.meta, indent=2) + "\n")
    if (bundle.source / RECORD).is_file():
        shutil.copyfile(bundle.source / RECORD, tmp / RECORD)
    if out.exists():
        out.rmdir()
    os.replace(tmp, out)
    return out


def find_run(run: str | Path, *, runs_dir: str | Path | None = None) -> Path:
    """A run or export folder, or a run fingerprint prefix looked up under ``runs_dir``."""
    path = Path(run)
    if path.is_dir():
        return path
    root = Path(runs_dir) if runs_dir is not None else default_runs_dir()
    text = str(run)
    matches = (
        [p.parent for p in root.glob(f"*/*/*/*/{RECORD}") if _fingerprint(p).startswith(text)]
        if len(text) >= 6
        else []
    )
    if len(matches) == 1:
        return matches[0]
    if len(matches) > 1:
        raise UsageError(f"Run key '{text}' matches {len(matches)} runs under {root}; give more characters")
    raise UsageError(
        f"No run folder or export '{text}' (nor a run fingerprint prefix of >= 6 characters under {root})"
    )


def _fingerprint(record_path: Path) -> str:
    try:
        return json.loads(record_path.read_text()).get("run_fingerprint", "")
    except (OSError, json.JSONDecodeError):
        return ""
