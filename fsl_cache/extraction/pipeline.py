"""Stage one end to end: dataset + backbone → plan → shards → a finished, fingerprinted store."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import open_clip
import torch

from .. import __version__
from ..backbones import load_backbone
from ..backbones.backbone import PREPROJ
from ..backbones.encoder import Encoder
from ..backbones.taps import derived_shape, derived_tap
from ..backbones.views import POLICIES, ViewRenderer
from ..console import progress_bar
from ..datasets import DatasetSpec, load_dataset
from ..datasets.descriptions import Descriptions, load_descriptions
from ..defaults import DEFAULT_MODEL, DEFAULT_PRETRAINED, DEFAULT_SEEDS, DEFAULT_SHOTS, DEFAULT_VIT_BLOCKS
from ..errors import DiskFullError, FslError, StoreError, UsageError, check_writable_folder
from ..methods.needs import DEFAULT_FOR, Needs
from ..methods.registry import check_option_names, get_method
from ..splits.sampling import few_shot_pools
from ..store.backend import FORMATS, ArraySpec
from ..store.catalog import default_cache_dir
from ..store.fingerprint import EXTRACTION_VERSION, dataset_dirname, fingerprint, store_dirname
from ..store.location import as_location, is_remote
from ..store.quantise import DENSE_PRECISIONS
from ..store.store import (
    MANIFEST,
    PRECISIONS,
    SCHEMA,
    FeatureStore,
    StoreWriter,
    check_manifest,
    read_manifest,
)
from .plan import (
    ExtractionPlan,
    Pool,
    array_layout,
    check_fits,
    disk_footprint,
    human_bytes,
    plan_extraction,
)
from .ranks import SINGLE_PROCESS, Ranks, rank_device, ranks_from_env
from .runner import RunStats, run_job
from .text import encode_text, text_arrays

OptionSets = Mapping[str, Any] | Sequence[Mapping[str, Any]] | None
"""``-o`` method options: one set, several (each served), or none."""


def option_sets(options: OptionSets) -> tuple[dict, ...]:
    if options is None:
        return ({},)
    if isinstance(options, Mapping):
        return (dict(options),)
    return tuple(dict(o) for o in options) or ({},)


@dataclass(frozen=True)
class ExtractOptions:
    """Everything ``fsl-cache extract`` accepts besides the dataset and backbone."""

    for_methods: tuple[str, ...] = DEFAULT_FOR
    method_options: dict | tuple[dict, ...] = field(default_factory=dict)
    """``-o`` method options that change what is stored (capt ``visual_depth`` adds a tap): unscoped ones
    reach every method of ``for_methods`` that has the field, ``method.key`` ones that method. Several
    sets (a grid's combinations): the store serves each."""
    views: int | dict[str, int] | None = None
    """Override the view count of every augmented view group (an int) or of some policies
    (``{"ldc": 5}``); default: what the methods need. Recorded in the store key when given."""
    precision: str = "fp16"
    """Storage dtype; compute runs in fp16 on CUDA and fp32 on CPU."""
    dense_precision: str = "same"
    """``int8``: dense maps quantised per channel (lossy, :mod:`fsl_cache.store.quantise`); in the store key."""
    format: str = "zarr"
    batch_size: int = 64
    """Images per forward pass (all views of a sample stay in one batch)."""
    workers: int = 2
    device: str = "cpu"
    shots: tuple[int, ...] = DEFAULT_SHOTS
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    full_train: bool = False
    full_val: bool = False
    vit_blocks: tuple[int, ...] = DEFAULT_VIT_BLOCKS
    skip_bad: bool = False
    aug_seed: int = 0
    descriptions: str | Path | None = None
    """A class-description file in CuPL's JSON format (APE); its SHA-256 is part of the store key."""

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise UsageError(f"--precision must be one of {', '.join(PRECISIONS)}, got '{self.precision}'")
        if self.dense_precision not in DENSE_PRECISIONS:
            raise UsageError(
                f"--dense-precision must be one of {', '.join(DENSE_PRECISIONS)}, got '{self.dense_precision}'"
            )
        if self.format not in FORMATS:
            raise UsageError(f"--format must be one of {', '.join(FORMATS)}, got '{self.format}'")
        if self.batch_size < 1 or self.workers < 0:
            raise UsageError("--batch-size must be >= 1 and --workers >= 0")
        for options in option_sets(self.method_options):
            check_option_names(self.for_methods, options)
        counts = self.views.values() if isinstance(self.views, dict) else [self.views]
        if any(n is not None and n < 1 for n in counts):
            raise UsageError(f"--views must be >= 1, got {self.views}")


@dataclass
class ExtractResult:
    store: Path
    fingerprint: str
    arrays: dict[str, dict]
    images_per_s: float
    images: int
    seconds: float
    device: str
    random_init: bool
    new_arrays: list[str] = field(default_factory=list)
    skipped: dict[str, list[int]] = field(default_factory=dict)
    """Rows of each pool whose image could not be read (``--skip-bad``)."""
    skipped_paths: dict[str, list[str]] = field(default_factory=dict)
    """The same images by path (relative to the dataset root), in the same order."""

    def to_json(self) -> dict:
        arrays = {
            n: {"shape": a["shape"], "dtype": a["dtype"], "bytes": a["bytes"]} for n, a in self.arrays.items()
        }
        return {
            "store": str(self.store),
            "fingerprint": self.fingerprint,
            "arrays": arrays,
            "images_per_s": round(self.images_per_s, 2),
            "images": self.images,
            "seconds": round(self.seconds, 3),
            "device": self.device,
            "random_init": self.random_init,
            "new_arrays": self.new_arrays,
            "skipped": self.skipped,
            "skipped_paths": self.skipped_paths,
        }


def extract(
    dataset: str,
    *,
    root: str | Path | None = None,
    model: str = DEFAULT_MODEL,
    pretrained: str = DEFAULT_PRETRAINED,
    cache_dir: str | Path | None = None,
    options: ExtractOptions = ExtractOptions(),
    on_plan: Callable[[PreparedExtraction], None] | None = None,
    progress: bool = True,
) -> ExtractResult:
    """Extract what ``options.for_methods`` need from ``dataset`` into a fingerprinted store.

    Under ``torchrun`` every rank calls this with the same arguments; they share the work by shard.
    """
    ranks = ranks_from_env()
    options = replace(options, device=rank_device(options.device, ranks))
    cache_dir = as_location(cache_dir) if cache_dir is not None else default_cache_dir()
    remote = is_remote(cache_dir)
    if not remote:  # object storage has no folder permissions or free space to check
        check_writable_folder(cache_dir, what="the cache folder (--cache-dir / $FSL_CACHE_DIR)")
    prepared = prepare_extraction(
        dataset, root=root, model=model, pretrained=pretrained, cache_dir=cache_dir, options=options
    )
    error = None
    if ranks.is_main:
        if on_plan is not None:
            on_plan(prepared)
        try:
            if not remote:
                check_fits(prepared.disk_bytes, free_bytes=_free_bytes(prepared.store_dir))
        except DiskFullError as err:
            error = err
    ranks.raise_if_any(error)
    return prepared.run(progress=progress and ranks.is_main, ranks=ranks)


@dataclass
class PreparedExtraction:
    """A planned extraction: what will be written where, before any image is decoded."""

    spec: DatasetSpec
    backbone: object
    options: ExtractOptions
    store_dir: Path
    key: str
    manifest: dict
    plan: ExtractionPlan
    planned_on: str | None = None
    """SHA-256 of the manifest the plan was made against (``None``: there was none)."""
    descriptions: Descriptions | None = None

    def run(self, *, progress: bool = True, ranks: Ranks = SINGLE_PROCESS) -> ExtractResult:
        writer, error = None, None
        if ranks.is_main:  # rank 0 creates the store folder and takes the lock before the others open it
            try:
                writer = StoreWriter(self.store_dir, fmt=self.options.format, manifest=self.manifest)
                if _manifest_digest(self.store_dir) != self.planned_on:
                    writer.close()
                    # Planned against an older manifest, it would drop the other run's arrays on publishing.
                    raise StoreError(
                        f"Another extraction finished writing {self.store_dir} while this one was being "
                        "planned; re-run the same command to plan against what it wrote"
                    )
            except StoreError as err:
                error = err
        ranks.raise_if_any(error)
        if not ranks.is_main:
            writer = StoreWriter(self.store_dir, fmt=self.options.format, manifest=self.manifest, lock=False)
        try:
            stats = self._write(writer, progress=progress, ranks=ranks)
        except OSError as err:
            if not _is_disk_full(err):
                raise
            raise self._disk_full(err, writer) from err
        finally:
            writer.close()
        ranks.barrier()  # the manifest exists before any rank returns
        store = FeatureStore.open(self.store_dir)
        return ExtractResult(
            store=self.store_dir,
            fingerprint=self.key,
            arrays=store.arrays,
            images_per_s=stats.images_per_s,
            images=stats.images,
            seconds=stats.seconds,
            device=str(self.backbone.device),
            random_init=self.backbone.random_init,
            new_arrays=[a.name for a in self.plan.new_arrays],
            skipped=stats.skipped,
            skipped_paths={pool: self.item_paths(pool, rows) for pool, rows in stats.skipped.items()},
        )

    @cached_property
    def footprint(self) -> dict[str, int]:
        """On-disk bytes per job id and ``metadata`` (:func:`~fsl_cache.extraction.plan.disk_footprint`)."""
        manifest = len(json.dumps(self.manifest, indent=1, sort_keys=True, default=str))
        block = _block_size(self.store_dir)
        return disk_footprint(self.plan, fmt=self.options.format, block=block, manifest_bytes=manifest)

    @property
    def disk_bytes(self) -> int:
        """What this extraction takes on disk at most: arrays, block rounding, folders, markers, manifest."""
        return sum(self.footprint.values())

    def item_paths(self, pool: str, rows: list[int]) -> list[str]:
        """Image paths (relative to the dataset root) of ``rows`` of ``pool``."""
        p = self.plan.pools[pool]
        items = self.spec.splits[p.split]
        return [str(items[int(p.indices[row])][0]) for row in rows]

    def _disk_full(self, err: OSError, writer: StoreWriter) -> DiskFullError:
        done = {marker.part for marker in writer.markers()}
        left = self.footprint["metadata"] + sum(
            self.footprint[job.id]
            * sum(f"{job.id}/{s:06d}" not in done for s in range(job.num_shards))
            // job.num_shards
            for job in self.plan.jobs
        )
        free = _free_bytes(self.store_dir)
        # free may exceed left: blocks reserved for root, or a quota, still refuse the write
        amount = f"at least {human_bytes(left - free)}" if left > free else "space"
        return DiskFullError(
            f"Disk full while writing {self.store_dir} ({err.strerror or err}): up to {human_bytes(left)} of this "
            f"extraction is still to be written and {human_bytes(free)} is free. Free {amount} on that disk "
            "(or pick another --cache-dir) and re-run the same command: the finished shards are kept."
        )

    def _write(self, writer: StoreWriter, *, progress: bool, ranks: Ranks) -> RunStats:
        text = self._text_weights(writer if ranks.is_main else None)
        if ranks.is_main:
            writer.forget_other_jobs({a.name: job.id for job in self.plan.jobs for a in job.arrays})
            for spec, data in self.plan.whole:
                writer.write_whole(spec, data)
            for job in self.plan.jobs:  # one process creates arrays; then every rank fills its shards
                for spec in job.arrays:
                    writer.create(spec)
        ranks.barrier()
        stats = RunStats()
        opts = self.options
        encoder = Encoder(
            self.backbone, text, np.dtype(PRECISIONS[opts.precision]), scale=float(self.manifest["zs_scale"])
        )
        renderer = ViewRenderer(self.backbone.preprocess_cfg)
        total = sum(job.images for job in self.plan.jobs)
        error = None
        with progress_bar(
            total // ranks.world_size, f"extract {self.spec.name}", enabled=progress
        ) as advance:
            try:
                for job in self.plan.jobs:
                    run_job(
                        job,
                        spec=self.spec,
                        writer=writer,
                        encoder=encoder,
                        renderer=renderer,
                        aug_seed=opts.aug_seed,
                        batch_size=opts.batch_size,
                        workers=opts.workers,
                        skip_bad=opts.skip_bad,
                        stats=stats,
                        advance=advance,
                        rank=ranks.rank,
                        world_size=ranks.world_size,
                    )
            except FslError as err:
                error = err
            except OSError as err:  # shared with the other ranks, which would otherwise wait forever
                if not _is_disk_full(err):
                    raise
                error = self._disk_full(err, writer)
        ranks.raise_if_any(error)
        everyone = ranks.gather((stats.images, stats.seconds, stats.skipped))
        stats = RunStats(sum(e[0] for e in everyone), max(e[1] for e in everyone))
        for _, _, skipped in everyone:
            _merge_skipped(writer.manifest, skipped)
            for pool, indices in skipped.items():
                stats.skipped.setdefault(pool, []).extend(indices)
        ranks.barrier()  # every rank's shards are committed before the manifest is published
        if ranks.is_main:
            pools = {job.id: job.pool.name for job in self.plan.jobs}
            for marker in writer.markers():  # shards an interrupted run finished skipped images too
                if marker.skipped and marker.job in pools:
                    _merge_skipped(writer.manifest, {pools[marker.job]: marker.skipped})
            skipped = writer.manifest.get("skipped", {})
            writer.manifest["skipped_paths"] = {
                pool: self.item_paths(pool, rows) for pool, rows in skipped.items()
            }
            writer.manifest["views"] = self.plan.view_counts
            writer.finalize(self.plan.all_arrays)
        return stats

    def _text_weights(self, writer: StoreWriter | None) -> dict[str, torch.Tensor]:
        """Class text weights per template set: read back if stored, else encoded (and written by ``writer``)."""
        return encode_text(
            self.backbone,
            self.spec,
            self.plan.text,
            descriptions=self.descriptions,
            read=lambda name: FeatureStore.open(self.store_dir).read(name),
            write=writer.write_whole if writer is not None else None,
        )

    def summary_rows(self) -> list[tuple[str, str, str, int]]:
        """(pool/policy, views, arrays, bytes on disk) per job, for the pre-flight table."""
        rows = [
            (f"{job.pool.name}/{job.policy}", str(job.views), ", ".join(job.taps), self.footprint[job.id])
            for job in self.plan.jobs
        ]
        if self.plan.whole or self.plan.text or rows:
            rows.append(
                ("metadata", "-", "labels, paths, splits, text, manifest", self.footprint["metadata"])
            )
        return rows


def method_needs(method: str, dataset: str, options: ExtractOptions) -> list[Needs]:
    """What ``method`` reads on ``dataset`` when fitted with each set of options extraction was given."""
    info = get_method(method)
    return [info.needs(dataset, info.scoped(o)) for o in option_sets(options.method_options)]


def prepare_extraction(
    dataset: str, *, root, model: str, pretrained: str, cache_dir, options: ExtractOptions
) -> PreparedExtraction:
    spec = load_dataset(dataset, root=root)
    needs = [n for m in options.for_methods for n in method_needs(m, spec.name, options)]
    descriptions = (
        load_descriptions(options.descriptions, spec.classnames) if options.descriptions is not None else None
    )
    compute = "fp16" if (options.precision == "fp16" and options.device.startswith("cuda")) else "fp32"
    backbone = load_backbone(model, pretrained, device=options.device, precision=compute)
    parts = {
        "dataset": spec.fingerprint_parts(),
        "backbone": backbone.fingerprint_parts(),
        "precision": options.precision,
        "format": options.format,
        "few_shot": {"shots": sorted(options.shots), "seeds": sorted(options.seeds)},
        "aug_seed": options.aug_seed,
        "extraction_version": EXTRACTION_VERSION,
    }
    if isinstance(options.views, dict):  # a per-policy count makes another store; plain --views N conflicts
        parts["views"] = options.views
    if options.dense_precision != "same":  # absent by default: stores extracted before it keep their keys
        parts["dense_precision"] = options.dense_precision
    if descriptions is not None:  # other sentences make other class weights: another store
        parts["descriptions"] = descriptions.sha256
    key = fingerprint(parts)
    weights = Path(pretrained).stem if os.sep in pretrained or "." in pretrained else pretrained
    cache_dir = as_location(cache_dir) if cache_dir is not None else default_cache_dir()
    store_dir = (
        cache_dir
        / dataset_dirname(spec.name)
        / store_dirname(arch=backbone.arch, weights=weights, precision=options.precision, key=key)
    )
    planned_on = _manifest_digest(
        store_dir
    )  # before reading it: a newer manifest then refuses, never an older
    manifest = _load_or_new_manifest(
        store_dir, key=key, parts=parts, spec=spec, backbone=backbone, options=options
    )
    if descriptions is not None:
        manifest["descriptions"] = descriptions.record()
    existing = {n: ArraySpec.from_json(n, a) for n, a in manifest.get("arrays", {}).items()}
    pools, whole = pools_and_metadata(spec, options, existing)
    manifest["pools"] = {
        **manifest.get("pools", {}),
        **{p.name: {"split": p.split, "size": p.size} for p in pools.values()},
    }
    base_shapes = {t: tuple(backbone.tap_shape(t)) for t in backbone.taps()}
    tap_shapes = TapShapes(base_shapes)
    plan = plan_store(
        spec,
        options,
        pools,
        needs,
        backbone=backbone,
        tap_shapes=tap_shapes,
        existing=existing,
        existing_views=manifest.get("views", {}),
    )
    plan.whole = whole + _projection_arrays(backbone, plan, existing)
    for job in plan.jobs:
        if job.custom_policy is not None:
            manifest["policies"].setdefault(job.policy, job.custom_policy.__dict__)
    plan.text = text_arrays(
        spec, needs, embed_dim=backbone.embed_dim, descriptions=descriptions, existing=existing
    )
    return PreparedExtraction(
        spec, backbone, options, store_dir, key, manifest, plan, planned_on, descriptions
    )


def plan_store(
    spec: DatasetSpec,
    options: ExtractOptions,
    pools,
    needs,
    *,
    backbone,
    tap_shapes,
    existing,
    existing_views,
) -> ExtractionPlan:
    """The extraction plan of ``spec`` under ``options`` for ``needs`` (``backbone``: anything with
    ``kind`` and ``dense_tap``, a loaded backbone or the meta-device shapes ``plan`` sizes from)."""
    return plan_extraction(
        pools=pools,
        needs=needs,
        kind=backbone.kind,
        dense_tap=backbone.dense_tap,
        vit_blocks=options.vit_blocks,
        tap_shapes=tap_shapes,
        num_classes=spec.num_classes,
        template_sets=tuple(spec.templates),
        dtype=np.dtype(PRECISIONS[options.precision]).name,
        dense_dtype="int8" if options.dense_precision == "int8" else None,
        views_override=options.views,
        existing=existing,
        existing_views=existing_views,
    )


def _projection_arrays(backbone, plan: ExtractionPlan, existing: dict) -> list:
    """The image tower's last projection, once per store, when a job taps ``preproj`` (``pooled = preproj W0ᵀ + b``)."""
    if not any(PREPROJ in job.taps for job in plan.jobs) or "proj/weight" in existing:
        return []
    weight, bias = backbone.projection()
    arrays = [(array_layout("proj/weight", tuple(weight.shape), "float32"), weight.numpy())]
    if bias is not None:
        arrays.append((array_layout("proj/bias", tuple(bias.shape), "float32"), bias.numpy()))
    return arrays


class TapShapes(dict):
    """Per-image shapes of backbone taps and of taps derived from them (``rn/layer1_pool7``)."""

    def __missing__(self, tap: str) -> tuple[int, ...]:
        base, _ = derived_tap(tap)
        if base not in self:  # a plain tap that is not there would recurse here forever
            blocks = [t for t in self if t.startswith("vit/block")]
            hint = f"; --vit-blocks must lie in 1..{len(blocks)}" if blocks else ""
            raise UsageError(f"The backbone has no tap '{base}'{hint}")
        return derived_shape(tap, self)


def pools_and_metadata(
    spec: DatasetSpec, options: ExtractOptions, existing: dict
) -> tuple[dict[str, Pool], list]:
    """The pools to hold and the small arrays that describe them (labels, paths, few-shot splits)."""
    fewshot = few_shot_pools(spec, shots=options.shots, seeds=options.seeds)
    all_of = lambda split: np.arange(len(spec.splits[split]))  # noqa: E731
    pools = {"test": Pool("test", "test", all_of("test"))}
    if spec.splits["train"]:
        train = (
            Pool("train_full", "train", all_of("train"))
            if options.full_train
            else Pool("train_pool", "train", np.asarray(fewshot.train_union))
        )
        pools[train.name] = train
    if spec.splits["val"]:
        val = (
            Pool("val_full", "val", all_of("val"))
            if options.full_val
            else Pool("val_pool", "val", np.asarray(fewshot.val_union))
        )
        pools[val.name] = val
    whole = []
    for pool in pools.values():
        items = [spec.splits[pool.split][i] for i in pool.indices]
        whole += [
            (
                array_layout(f"images/{pool.name}/split_index", (pool.size,), "int32"),
                pool.indices.astype(np.int32),
            ),
            (
                array_layout(f"images/{pool.name}/labels", (pool.size,), "int32"),
                np.array([label for _, label in items], np.int32),
            ),
            (
                array_layout(f"images/{pool.name}/paths", (pool.size,), "str"),
                np.array([p for p, _ in items], dtype=object),
            ),
        ]
    for (k, s), subset in fewshot.subsets.items():
        for part, idx in (("train", subset.train), ("val", subset.val)):
            whole.append(
                (array_layout(f"splits/k{k}_s{s}/{part}", (len(idx),), "int32"), np.asarray(idx, np.int32))
            )
    return pools, [(a, d) for a, d in whole if a.name not in existing and a.shape[0] > 0]


def _load_or_new_manifest(
    store_dir: Path, *, key: str, parts: dict, spec: DatasetSpec, backbone, options: ExtractOptions
) -> dict:
    path = store_dir / MANIFEST
    if path.exists():
        manifest = read_manifest(store_dir)
        check_manifest(store_dir, manifest)
        if manifest["fingerprint"] != key:
            raise StoreError(
                f"{store_dir} belongs to another extraction (key {manifest['fingerprint'][:16]}); remove it"
            )
        return manifest
    return {
        "schema": SCHEMA,
        "fingerprint": key,
        "fingerprint_parts": parts,
        "format": options.format,
        "precision": options.precision,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "versions": _versions(),
        "dataset": {
            "name": spec.name,
            "classnames": list(spec.classnames),
            "templates": {k: list(v) for k, v in spec.templates.items()},
            "notes": list(spec.notes),
            "split_sizes": {k: len(v) for k, v in spec.splits.items()},
        },
        "backbone": {
            "arch": backbone.arch,
            "pretrained": backbone.pretrained,
            "kind": backbone.kind,
            "embed_dim": backbone.embed_dim,
            "random_init": backbone.random_init,
            "preprocess_cfg": backbone.preprocess_cfg,
            "quick_gelu": backbone.quick_gelu,
            "dense_tap": backbone.dense_tap,
            "notes": list(backbone.notes),
            "compute_dtype": str(backbone.dtype).replace("torch.", ""),
        },
        "zs_scale": backbone.logit_scale,
        "zs_scale_from": "100 (random weights or a tiny test model)"
        if backbone.fixed_logit_scale
        else "checkpoint logit_scale.exp()",
        "aug_seed": options.aug_seed,
        "policies": {name: (p.__dict__ if p else None) for name, p in POLICIES.items()},
        "few_shot": parts["few_shot"],
        "views": {},
        "skipped": {},
        "arrays": {},
    }


def _merge_skipped(manifest: dict, skipped: dict[str, list[int]]) -> None:
    for pool, indices in skipped.items():
        merged = sorted(set(manifest.setdefault("skipped", {}).get(pool, [])) | set(indices))
        manifest["skipped"][pool] = merged


def _versions() -> dict:
    return {
        "fsl_cache": __version__,
        "torch": torch.__version__,
        "open_clip": open_clip.__version__,
        "numpy": np.__version__,
    }


def _manifest_digest(store_dir: Path) -> str | None:
    try:
        return hashlib.sha256((store_dir / MANIFEST).read_bytes()).hexdigest()
    except FileNotFoundError:
        return None


def _is_disk_full(err: OSError) -> bool:
    # h5py reports the C library's errno only in its message
    return err.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(err)


def _existing(path: Path) -> Path:
    while not path.exists():
        path = path.parent
    return path


def _free_bytes(path: Path) -> int:
    return shutil.disk_usage(_existing(path)).free


def _block_size(path: Path) -> int:
    """The file system's allocation unit: every file takes whole ones (an object takes its bytes)."""
    if is_remote(path):
        return 1
    stats = os.statvfs(_existing(path))
    return max(stats.f_frsize or stats.f_bsize, 512)
