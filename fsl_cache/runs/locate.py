"""Finding the store a fit reads, and checking it holds what the method needs."""

from __future__ import annotations

import json
import os
import shlex
from pathlib import Path

from ..backbones.taps import resolve_taps
from ..datasets import catalog  # noqa: F401  (registers the built-in loaders)
from ..datasets.base import builtin_loaders
from ..defaults import DEFAULT_SEEDS, DEFAULT_SHOTS, DEFAULT_VIT_BLOCKS
from ..errors import NoStoreError, StoreError, UsageError, did_you_mean
from ..splits.protocol import MissingDraw, few_shot_indices
from ..store.catalog import StoreEntry, find_store
from ..store.fingerprint import slug
from ..store.location import as_location
from ..store.store import MANIFEST
from ..store.text import per_template_name, weights_name


def canonical_dataset(spec: str) -> str:
    """The name a store records for ``spec``: built-in names as is, ``kind:PATH`` with an absolute path."""
    kind, sep, target = spec.partition(":")
    if sep and kind in ("imagefolder", "csv") and target:
        return f"{kind}:{Path(target).expanduser().resolve()}"
    return spec


def weights_tag(pretrained: str) -> str:
    """The weights part of a store folder name, as ``extract`` derives it."""
    return Path(pretrained).stem if os.sep in pretrained or "." in pretrained else pretrained


def locate_store(
    cache_dir: Path, *, dataset: str, model: str, pretrained: str, store: str | None, method: str
) -> StoreEntry:
    """The one finished store for ``dataset`` + backbone (or the store ``store`` names)."""
    name = canonical_dataset(dataset)
    if store is not None:
        entry = find_store(cache_dir, store)
        if entry.dataset != name:
            raise StoreError(f"Store {entry.key[:16]} holds dataset '{entry.dataset}', not '{name}'")
        return entry
    finished = finished_stores(cache_dir)
    prefix = f"{slug(model)}.{slug(weights_tag(pretrained))}-"
    matches = [
        e
        for e in finished
        if e.dataset == name and (e.backbone == f"{model}/{pretrained}" or e.path.name.startswith(prefix))
    ]
    if len(matches) == 1:
        return matches[0]
    if matches:
        listed = ", ".join(f"{e.key[:16]} ({e.precision}, {e.format})" for e in matches)
        raise UsageError(f"Several stores hold {name} with {model}/{pretrained}: {listed}. Pass --store KEY")
    raise _no_store(
        cache_dir, name, dataset=dataset, model=model, pretrained=pretrained, method=method, finished=finished
    )


def _no_store(cache_dir: Path, name: str, *, dataset, model, pretrained, method, finished) -> Exception:
    datasets = {e.dataset for e in finished}
    if name not in datasets and ":" not in name:
        known = set(builtin_loaders()) | datasets
        if name not in known:
            return did_you_mean(name, known, what="dataset")
    others = ", ".join(sorted(e.backbone for e in finished if e.dataset == name))
    hint = (
        f" (stores for {name} there: {others}; pick one with --model/--pretrained or --store KEY)"
        if others
        else ""
    )
    command = (
        f"fsl-cache extract --dataset {shlex.quote(dataset)} --model {model} "
        f"--pretrained {pretrained} --for {method}"
    )
    return NoStoreError(
        f"No feature store for {name} with {model}/{pretrained} under {cache_dir}{hint}. "
        f"Create it first: {command}"
    )


def finished_stores(cache_dir: Path) -> list[StoreEntry]:
    """Finished stores under ``cache_dir`` from their manifests alone (no walk over the array files)."""
    entries = []
    for manifest_path in sorted(as_location(cache_dir).glob(f"*/*/{MANIFEST}")):
        try:
            m = json.loads(manifest_path.read_text())
            entries.append(
                StoreEntry(
                    manifest_path.parent,
                    m["fingerprint"],
                    m["dataset"]["name"],
                    f"{m['backbone']['arch']}/{m['backbone']['pretrained']}",
                    m["precision"],
                    m["format"],
                    True,
                    0,
                )
            )
        except (OSError, json.JSONDecodeError, KeyError):
            continue  # unfinished or foreign folders are not candidates
    return entries


# ---------------------------------------------------------------------------- needs


def extract_settings(manifest: dict) -> dict:
    """The ``extract`` settings that made this store (its key): extending it with them writes into it."""
    fs, pools = manifest.get("few_shot", {}), manifest.get("pools", {})
    return {
        "dataset": manifest["dataset"]["name"],
        "model": manifest["backbone"]["arch"],
        "pretrained": str(manifest["backbone"]["pretrained"]),
        "precision": manifest.get("precision", "fp16"),
        "format": manifest.get("format", "zarr"),
        "shots": tuple(fs.get("shots", DEFAULT_SHOTS)),
        "seeds": tuple(fs.get("seeds", DEFAULT_SEEDS)),
        "full_train": "train_full" in pools,
        "full_val": "val_full" in pools,
        "vit_blocks": _tapped_blocks(manifest.get("arrays", {})) or DEFAULT_VIT_BLOCKS,
        "aug_seed": int(manifest.get("aug_seed", 0)),
        "views": manifest.get("fingerprint_parts", {}).get("views"),
        "dense_precision": manifest.get("fingerprint_parts", {}).get("dense_precision", "same"),
        "descriptions": manifest.get("descriptions", {}).get("file"),
    }


def extract_command(manifest: dict, method: str, *, cache_dir: Path | None, **changes) -> str:
    """The ``fsl-cache extract`` command that adds ``method``'s arrays to this very store
    (with ``changes`` to its settings, e.g. ``seeds``: to another store, which those settings key)."""
    s = {**extract_settings(manifest), **changes}
    words = [
        "fsl-cache extract",
        "--dataset",
        shlex.quote(s["dataset"]),
        "--model",
        s["model"],
        "--pretrained",
        shlex.quote(s["pretrained"]),
        "--for",
        method,
    ]
    if s["precision"] != "fp16":
        words += ["--precision", s["precision"]]
    if s["format"] != "zarr":
        words += ["--format", s["format"]]
    if s["shots"] != DEFAULT_SHOTS:
        words += ["--shots", ",".join(map(str, s["shots"]))]
    if s["seeds"] != DEFAULT_SEEDS:
        words += ["--seeds", ",".join(map(str, s["seeds"]))]
    words += ["--full-train"] * s["full_train"] + ["--full-val"] * s["full_val"]
    if s["views"] is not None:
        words += ["--views", format_views(s["views"])]
    if s["dense_precision"] != "same":
        words += ["--dense-precision", s["dense_precision"]]
    if s["descriptions"] is not None:
        words += ["--descriptions", shlex.quote(s["descriptions"])]
    if s["vit_blocks"] != DEFAULT_VIT_BLOCKS:
        words += ["--vit-blocks", ",".join(map(str, s["vit_blocks"]))]
    if cache_dir is not None:
        words += ["--cache-dir", shlex.quote(str(cache_dir))]
    return " ".join(words)


def format_views(views: int | dict[str, int]) -> str:
    """``--views`` as typed: ``10`` or ``ldc=5,tip=11``."""
    if isinstance(views, dict):
        return ",".join(f"{policy}={n}" for policy, n in sorted(views.items()))
    return str(views)


def missing_arrays(
    store, method_info, *, dataset: str, eval_only: bool = False, options: dict | None = None
) -> list[str]:
    """The arrays ``method_info`` reads that ``store`` lacks (``eval_only``: the center views it is scored on)."""
    return _needs_report(store, method_info, dataset=dataset, eval_only=eval_only, options=options)[0]


def check_needs(
    store,
    method_info,
    *,
    dataset: str,
    cache_dir: Path | None,
    eval_only: bool = False,
    options: dict | None = None,
) -> list[str]:
    """Refuse a store that lacks an array the method reads; return caveats (fewer views than wanted)."""
    missing, caveats = _needs_report(
        store, method_info, dataset=dataset, eval_only=eval_only, options=options
    )
    if missing:
        raise lacks_error(store, method_info.name, missing, cache_dir=cache_dir)
    return caveats


def lacks_error(store, methods: str, missing: list[str], *, cache_dir: Path | None) -> StoreError:
    """ "Store … lacks …, which METHODS need(s). Add it with: fsl-cache extract …" """
    more = f" and {len(missing) - 2} more" if len(missing) > 2 else ""
    verb = "need" if "," in methods else "needs"
    return StoreError(
        f"Store {store.root.name} lacks {', '.join(missing[:2])}{more}, which {methods} {verb}. "
        f"Add it with: {extract_command(store.manifest, methods, cache_dir=cache_dir)}"
    )


def check_draws(store, method: str, *, shots: int, seeds, cache_dir: Path | None) -> None:
    """Refuse, before any run, a (shots, seed) draw the store cannot give, naming the extract command that can."""
    for seed in seeds:
        try:
            few_shot_indices(store, shots=shots, seed=seed)
        except MissingDraw:
            held = store.manifest.get("few_shot", {})
            want = {
                "shots": tuple(sorted({*held.get("shots", ()), shots})),
                "seeds": tuple(sorted({*held.get("seeds", ()), *seeds})),
            }
            raise UsageError(
                f"Store {store.root.name} holds the few-shot picks of seeds {_ints(held.get('seeds'))} "
                f"at shots {_ints(held.get('shots'))}, not shots={shots} seed={seed}; extract a store "
                f"that has them: {extract_command(store.manifest, method, cache_dir=cache_dir, **want)}"
            ) from None


def _ints(values) -> str:
    return ",".join(map(str, values or ())) or "none"


def _needs_report(
    store, method_info, *, dataset: str, eval_only: bool, options: dict | None = None
) -> tuple[list[str], list[str]]:
    manifest = store.manifest
    needs = method_info.needs(dataset, options)
    bb = manifest["backbone"]

    def taps(generic):
        kind, dense = bb.get("kind", "rn"), bb.get("dense_tap", "")
        return resolve_taps(generic, kind=kind, dense_tap=dense, vit_blocks=vit_blocks(store))

    pools = [p for p in manifest.get("pools", {}) if store.has(f"images/{p}/labels")]
    if eval_only:
        pools = [p for p in pools if p == "test"]
    train_pool = next((p for p in ("train_pool", "train_full") if p in pools), None)
    missing = [
        f"images/{p}/views/center/{t}"
        for p in pools
        for t in taps(needs.eval_taps)
        if not store.has(f"images/{p}/views/center/{t}")
    ]
    read = [f"images/{p}/views/center/{t}" for p in pools for t in taps(needs.eval_taps)]
    # a set the dataset does not have is the method's own error to give (task.text names the sets there are)
    missing += [
        per_template_name(t)
        for t in needs.text_raw
        if store.has(weights_name(t)) and not store.has(per_template_name(t))
    ]
    caveats = []
    for view in () if eval_only else needs.train_views:
        prefix = f"images/{train_pool}/views/{view.policy}"
        read += [f"{prefix}/{t}" for t in taps(view.taps)]
        missing += [f"{prefix}/{t}" for t in taps(view.taps) if not store.has(f"{prefix}/{t}")]
        have = int(manifest.get("views", {}).get(f"{train_pool}/{view.policy}", 0))
        least = method_info.cls.min_views.get(view.policy, 2)
        if store.has(f"{prefix}/{taps(view.taps)[0]}") and have < least:
            raise StoreError(
                f"Store {store.root.name} holds {have} '{view.policy}' views per train image; "
                f"{method_info.name} needs at least {least}. Extract into a new store with --for "
                f"{method_info.name} (remove this one with fsl-cache cache rm {manifest['fingerprint'][:16]})"
            )
        if least <= have < view.views:
            caveats.append(
                f"store holds {have} '{view.policy}' views per train image; {method_info.name} wants "
                f"{view.views} (1 + epochs) for fresh augmentation every epoch"
            )
    lossy = [n for n in read if n in store.quantised]
    if lossy:
        caveats.append(
            f"store holds dense maps in int8 (--dense-precision int8, per-channel scales): {method_info.name} "
            f"reads {len(lossy)} of them dequantised, a lossy copy of the {manifest.get('precision', 'fp16')} maps"
        )
    return missing, caveats


def vit_blocks(store) -> tuple[int, ...]:
    """ViT blocks the store tapped (from its array names), or the extraction default."""
    return _tapped_blocks(store.arrays) or DEFAULT_VIT_BLOCKS


def _tapped_blocks(names) -> tuple[int, ...]:
    # split("_"): derived taps such as vit/block06_mean (ldc_lite) name the block they come from
    return tuple(sorted({int(n.rsplit("block", 1)[1].split("_")[0]) for n in names if "/vit/block" in n}))
