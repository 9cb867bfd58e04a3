"""Plan an extraction: which pools, views and arrays a store needs, and what is still missing.

Planning touches no image and runs no network, so ``extract`` can show what it will write and how
big it will be before it starts, and refuse when the disk cannot hold it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

from ..backbones.taps import resolve_taps
from ..backbones.views import Policy
from ..console import human_bytes
from ..errors import DiskFullError, UsageError
from ..methods.needs import Needs
from ..store.backend import ArraySpec
from ..store.footprint import dir_bytes, file_bytes, hdf5_master, hdf5_part, zarr_array, zarr_groups
from ..store.quantise import is_dense, scale_name, scale_shape

SHARD_SAMPLES = 64
"""Samples per shard: the unit of resume, of multi-process ownership and of light-array chunks."""
TARGET_CHUNK_BYTES = 1 << 20
"""Heavy maps are chunked to ~1 MiB (1-8 samples): shuffled minibatch reads stay fast (PERFORMANCE §2d)."""


@dataclass(frozen=True)
class Pool:
    """A set of images of one split that a store holds, in ascending split-index order."""

    name: str
    split: str
    indices: np.ndarray

    @property
    def size(self) -> int:
        return len(self.indices)


@dataclass(frozen=True)
class Job:
    """One pass of the backbone over a pool under one policy, producing ``arrays``."""

    pool: Pool
    policy: str
    views: int
    taps: tuple[str, ...]
    arrays: tuple[ArraySpec, ...]
    custom_policy: Policy | None = None
    """A method's own crop policy named ``policy`` (built-in policies are looked up by name)."""

    @property
    def id(self) -> str:
        # Shapes are part of the id: shards a killed run wrote with another view count are not this job's.
        arrays = ",".join(f"{a.name}{list(a.shape)}{a.dtype}" for a in self.arrays)
        return f"{self.pool.name}.{self.policy}.{hashlib.sha256(arrays.encode()).hexdigest()[:10]}"

    @property
    def num_shards(self) -> int:
        return -(-self.pool.size // SHARD_SAMPLES)

    def shard_rows(self, shard: int) -> tuple[int, int]:
        return shard * SHARD_SAMPLES, min((shard + 1) * SHARD_SAMPLES, self.pool.size)

    @property
    def images(self) -> int:
        return self.pool.size * self.views


@dataclass
class ExtractionPlan:
    """Everything an extraction will write that the store does not have yet."""

    pools: dict[str, Pool]
    whole: list[tuple[ArraySpec, np.ndarray]] = field(default_factory=list)
    text: list[ArraySpec] = field(default_factory=list)
    """Class text weights still to encode (their data needs the text tower, not known at plan time)."""
    jobs: list[Job] = field(default_factory=list)
    existing: dict[str, ArraySpec] = field(default_factory=dict)
    view_counts: dict[str, int] = field(default_factory=dict)

    @property
    def new_arrays(self) -> list[ArraySpec]:
        return [s for s, _ in self.whole] + self.text + [a for job in self.jobs for a in job.arrays]

    @property
    def new_bytes(self) -> int:
        return sum(a.nbytes for a in self.new_arrays)

    @property
    def all_arrays(self) -> list[ArraySpec]:
        return list(self.existing.values()) + self.new_arrays


EXPECTED_RATIO = {"zstd1": 1.78, "none": 1.0}
"""Raw ÷ stored bytes of each codec on what it is given. zstd-1 on RN feature maps (the arrays it is
used for): 1.78 measured on the ``fsl-tiny-rn`` ``shapes`` store of the 12-class shapes set (RN maps
of every pool and view, 36 MB, 50-63 % zeros after ReLU; per-layer 1.62-2.11, layer4 highest).
RN50 with random weights gave 2.02-2.10 (PERFORMANCE.md, finding 7), so 1.78 errs large; ratio ≈ 1 /
(fraction of non-zeros), and pretrained RN50's sparsity is not yet measured."""


def expected_bytes(spec: ArraySpec) -> int:
    """What ``spec`` is expected to take stored: its raw bytes over its codec's expected ratio."""
    return int(spec.nbytes / EXPECTED_RATIO.get(spec.codec, 1.0))


def array_layout(name: str, shape: tuple[int, ...], dtype: str) -> ArraySpec:
    """Chunking and codec by measurement: zstd-1 for post-ReLU maps, none for Gaussian-like tensors."""
    codec = "zstd1" if "/rn/" in name else "none"
    per_sample = int(np.prod(shape[1:], dtype=np.int64)) * (
        np.dtype(dtype).itemsize if dtype != "str" else 64
    )
    samples = SHARD_SAMPLES
    while samples > 1 and samples * per_sample > TARGET_CHUNK_BYTES:
        samples //= 2
    first = min(samples, shape[0]) or 1
    if samples == 1 and len(shape) > 2 and per_sample > TARGET_CHUNK_BYTES:
        return ArraySpec(name, shape, dtype, (1, 1) + shape[2:], codec)  # one view of one image
    return ArraySpec(name, shape, dtype, (first,) + shape[1:], codec)


def tap_arrays(
    prefix: str,
    *,
    n: int,
    views: int,
    taps: tuple[str, ...],
    tap_shapes: dict,
    num_classes: int,
    template_sets: tuple[str, ...],
    dtype: str,
    dense_dtype: str | None = None,
) -> list[ArraySpec]:
    """The arrays one view group produces: each tap, zero-shot logits if ``pooled`` is tapped, aug params.

    ``dense_dtype="int8"``: dense maps as int8 codes with their per-channel scales beside them.
    """
    specs = []
    for tap in taps:
        name, shape = f"{prefix}/{tap}", tuple(tap_shapes[tap])
        if dense_dtype is None or not is_dense(shape):
            specs.append(array_layout(name, (n, views) + shape, dtype))
            continue
        specs += [
            array_layout(name, (n, views) + shape, dense_dtype),
            array_layout(scale_name(name), (n, views) + scale_shape(tap, shape), "float32"),
        ]
    if "pooled" in taps:
        specs += [
            array_layout(f"{prefix}/zs_logits/{t}", (n, views, num_classes), dtype) for t in template_sets
        ]
    return specs


def plan_extraction(
    *,
    pools: dict[str, Pool],
    needs: list[Needs],
    kind: str,
    dense_tap: str,
    vit_blocks: tuple[int, ...],
    tap_shapes: dict[str, tuple[int, ...]],
    num_classes: int,
    template_sets: tuple[str, ...],
    dtype: str,
    dense_dtype: str | None = None,
    views_override: int | dict[str, int] | None,
    existing: dict[str, ArraySpec],
    existing_views: dict[str, int],
) -> ExtractionPlan:
    """Jobs for the view groups the ``needs`` ask for, minus arrays the store already holds."""
    plan = ExtractionPlan(pools=pools, existing=existing, view_counts=dict(existing_views))
    groups: dict[tuple[str, str], tuple[int, list[str]]] = {}
    custom = {v.policy: v.custom_policy for n in needs for v in n.train_views if v.custom_policy is not None}

    def want(pool: str, policy: str, views: int, generic: tuple[str, ...]) -> None:
        taps = resolve_taps(generic, kind=kind, dense_tap=dense_tap, vit_blocks=vit_blocks)
        old_views, old_taps = groups.get((pool, policy), (0, []))
        groups[(pool, policy)] = (max(views, old_views), list(dict.fromkeys(old_taps + list(taps))))

    eval_taps = tuple(dict.fromkeys(t for n in needs for t in n.eval_taps))
    for pool in pools:
        want(pool, "center", 1, eval_taps)
    train = next((p for p in pools if p.startswith("train")), None)
    _check_view_policies(views_override, needs)
    for need in needs if train is not None else ():  # test-only sets (ImageNet-A ...) have no train views
        for view in need.train_views:
            want(train, view.policy, view_count(views_override, view.policy, view.views), view.taps)

    for (pool_name, policy), (views, taps) in groups.items():
        plan.jobs += _group_job(
            plan,
            pools[pool_name],
            policy,
            views,
            tuple(taps),
            tap_shapes=tap_shapes,
            num_classes=num_classes,
            template_sets=template_sets,
            dtype=dtype,
            dense_dtype=dense_dtype,
            custom_policy=custom.get(policy),
        )
    return plan


def view_count(override: int | dict[str, int] | None, policy: str, wanted: int) -> int:
    """Views to extract under ``policy``: ``--views N`` for every policy, ``--views POLICY=N`` for one."""
    if isinstance(override, dict):
        return override.get(policy, wanted)
    return override or wanted


def _check_view_policies(override, needs: list[Needs]) -> None:
    if not isinstance(override, dict):
        return
    used = sorted({v.policy for n in needs for v in n.train_views})
    unknown = [p for p in override if p not in used]
    if unknown:
        raise UsageError(
            f"--views {unknown[0]}={override[unknown[0]]}: no method asked for (--for) trains on "
            f"'{unknown[0]}' views; their policies: {', '.join(used) or 'none'}"
        )


def _group_job(
    plan: ExtractionPlan,
    pool: Pool,
    policy: str,
    views: int,
    taps: tuple[str, ...],
    *,
    custom_policy: Policy | None,
    **layout,
) -> list[Job]:
    key = f"{pool.name}/{policy}"
    have = plan.view_counts.get(key)
    if have is not None and have != views:
        raise UsageError(
            f"The store already holds {have} '{policy}' views of {pool.name}; this extraction asks for {views}. "
            f"Pass --views {have} to add to it, or remove the store (fsl-cache cache rm) to start over."
        )
    plan.view_counts[key] = views
    prefix = f"images/{pool.name}/views/{policy}"
    missing_taps = tuple(t for t in taps if f"{prefix}/{t}" not in plan.existing)
    if not missing_taps:
        return []
    specs = tap_arrays(prefix, n=pool.size, views=views, taps=missing_taps, **layout)
    if f"{prefix}/aug_params" not in plan.existing:
        specs.append(array_layout(f"{prefix}/aug_params", (pool.size, views, 5), "int32"))
    return [Job(pool, policy, views, missing_taps, tuple(specs), custom_policy)]


def disk_footprint(plan: ExtractionPlan, *, fmt: str, block: int, manifest_bytes: int) -> dict[str, int]:
    """What the plan takes on disk in ``fmt`` with ``block``-byte file-system blocks, as
    ``{job id: bytes, "metadata": bytes}``: arrays with their files and folders, progress markers,
    and (under ``metadata``) the small arrays, the manifest (twice: it is rewritten through a temp
    file) and the store's own folders. ``manifest_bytes`` is the size of the manifest before this plan.
    """
    sizes = {job.id: _job_disk(job, fmt=fmt, block=block) for job in plan.jobs}
    small = [(spec, string_bytes(data)) for spec, data in plan.whole] + [(spec, 0) for spec in plan.text]
    meta = sum(_whole_disk(spec, fmt=fmt, block=block, string_bytes=n) for spec, n in small)
    meta += 2 * file_bytes(manifest_bytes + _manifest_growth(plan), block)
    names = [a.name for a in plan.new_arrays]
    if fmt == "zarr":
        meta += zarr_groups(names, existing=list(plan.existing), block=block)
    else:
        blocks = sum(-(-a.shape[0] // SHARD_SAMPLES) for a in plan.all_arrays)
        meta += hdf5_master(plan.all_arrays, mappings=blocks, block=block)
        meta += dir_bytes(sum(job.num_shards for job in plan.jobs) + len(small), block)  # parts/
    meta += 4 * dir_bytes(len(small) + len(plan.jobs) + 4, block) + file_bytes(1, block)  # folders, .lock
    return {**sizes, "metadata": meta}


def _job_disk(job: Job, *, fmt: str, block: int) -> int:
    markers = job.num_shards * file_bytes(_marker_bytes(job.arrays), block) + dir_bytes(job.num_shards, block)
    if fmt == "zarr":
        return markers + sum(zarr_array(a, block=block) for a in job.arrays)
    rows = [stop - start for start, stop in map(job.shard_rows, range(job.num_shards))]
    return markers + sum(hdf5_part([(a, n) for a in job.arrays], block=block) for n in rows)


def _whole_disk(spec: ArraySpec, *, fmt: str, block: int, string_bytes: int) -> int:
    """A small array written in one block, with its progress marker and folder."""
    marker = file_bytes(_marker_bytes([spec]), block) + dir_bytes(1, block)
    if fmt == "zarr":
        return marker + zarr_array(spec, block=block, string_bytes=string_bytes)
    return marker + hdf5_part([(spec, spec.shape[0])], block=block, string_bytes=string_bytes)


def _marker_bytes(arrays) -> int:
    return 256 + sum(len(a.name) + 80 for a in arrays)  # job, rows, a SHA-256 per array


def _manifest_growth(plan: ExtractionPlan) -> int:
    """Manifest bytes the new arrays add: an entry each and a [start, stop, digest] line per block."""
    return sum(512 + len(a.name) + 160 * -(-a.shape[0] // SHARD_SAMPLES) for a in plan.new_arrays)


def string_bytes(data: np.ndarray) -> int:
    """Bytes per item of a string array: the longest, plus zarr's 4-byte length."""
    if data.dtype.kind not in "OUS":
        return 0
    return max((len(str(s).encode("utf-8")) for s in data.reshape(-1)), default=0) + 4


def check_fits(need: int, *, free_bytes: int) -> None:
    """Refuse an extraction whose on-disk size (:func:`disk_footprint`) exceeds the free space."""
    if need > free_bytes:
        raise DiskFullError(
            f"Not enough disk space: this extraction takes up to {human_bytes(need)} on disk "
            f"but only {human_bytes(free_bytes)} is free. Free space, pick another --cache-dir, "
            f"or extract fewer views/methods (--for, --views)."
        )
