"""Synthetic feature stores for tests: valid, fingerprinted stores written from numpy, no backbone needed.

Like zarr's ``testing`` module this is infrastructure users can reuse to test their own methods::

    from fsl_cache.testing import make_synthetic_store
    store_dir = make_synthetic_store(tmp_path / "cache", num_classes=4, zero_shot=0.0)
    fsl_cache.api.fit("linear_probe", dataset="synthetic", shots=4, model="synthetic", pretrained="none",
                      cache_dir=tmp_path / "cache")

Features live in the first half of the embedding dimensions: class ``c`` has mean
``separation · e_c`` plus Gaussian noise, so classes are separable. Text weights mix ``e_c`` with a
random direction in the *other* half: with ``zero_shot=0`` they are orthogonal to every image
feature, zero-shot logits are exactly 0 and zero-shot accuracy is chance (``1/C``, ties go to
class 0); with ``zero_shot=1`` zero-shot is as good as the features allow.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from .datasets.base import DatasetSpec
from .defaults import DEFAULT_SEEDS
from .methods import get_method
from .splits.sampling import few_shot_pools
from .store.backend import ArraySpec
from .store.fingerprint import EXTRACTION_VERSION, dataset_dirname, fingerprint, store_dirname
from .store.store import SCHEMA, StoreWriter

ZS_SCALE = 100.0


@dataclass(frozen=True)
class SyntheticSpec:
    """How a synthetic store is generated (all of it enters the store fingerprint)."""

    name: str = "synthetic"
    """Dataset name the store records (use a built-in name such as ``eurosat`` to get its per-dataset defaults)."""
    num_classes: int = 4
    dim: int = 32
    """Embedding width D (image features use the first D/2 dimensions, text the rest)."""
    per_class: tuple[int, int, int] = (16, 8, 12)
    """Images per class in the train, val and test splits."""
    shots: tuple[int, ...] = (1, 2, 4)
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    views: Mapping[str, int] = field(default_factory=lambda: {"tip": 21})
    """Augmented train views per policy (view 0 is the center view)."""
    zero_shot: float = 0.0
    """Alignment of text weights with the class means: 0 = chance, 1 = aligned."""
    separation: float = 3.0
    noise: float = 1.0
    view_noise: float = 0.3
    """Spread of augmented views around an image's center feature."""
    full_train: bool = False
    full_val: bool = False
    templates: tuple[str, ...] = ("tip", "coop")
    """Template sets written as text/<set> (all share the same synthetic class weights) and text_raw/<set>."""
    extra_taps: Mapping[str, tuple[int, ...]] = field(default_factory=dict)
    """Further per-view taps (e.g. ``{"rn/layer4": (8, 2, 2)}``) filled with noise, for methods that need them."""
    preproj: bool = False
    """Also write ``preproj`` for every view and a projection ``proj/weight`` (I + noise), ``proj/bias`` with
    ``pooled = preproj W0ᵀ + b`` (ProLIP's inputs)."""
    precision: str = "fp16"
    format: str = "zarr"
    seed: int = 0


def make_synthetic_store(cache_dir: str | Path, **spec) -> Path:
    """Write the store that :class:`SyntheticSpec` ``(**spec)`` describes under ``cache_dir``; returns its folder."""
    s = SyntheticSpec(**spec)
    rng = np.random.default_rng(s.seed)
    data, pools = _generate(s, rng)
    parts = _fingerprint_parts(s)
    key = fingerprint(parts)
    root = (
        Path(cache_dir)
        / dataset_dirname(s.name)
        / store_dirname(arch="synthetic", weights="none", precision=s.precision, key=key)
    )
    if (root / "manifest.json").exists():
        return root
    writer = StoreWriter(root, fmt=s.format, manifest=_manifest(s, parts, key) | {"pools": pools})
    try:
        specs = [_write(writer, name, array) for name, array in data.items()]
        writer.finalize(specs)
    finally:
        writer.close()
    return root


def _generate(s: SyntheticSpec, rng: np.random.Generator) -> tuple[dict[str, np.ndarray], dict]:
    c, half = s.num_classes, s.dim // 2
    if c > half:
        raise ValueError(f"num_classes ({c}) must be <= dim / 2 ({half})")
    splits = {name: np.repeat(np.arange(c), n) for name, n in zip(("train", "val", "test"), s.per_class)}
    feats = {name: _features(labels, s, rng) for name, labels in splits.items()}
    text = _text_weights(s, rng)
    pools = few_shot_pools(_dataset_spec(s, splits), shots=s.shots, seeds=s.seeds)
    chosen = {
        "train_full" if s.full_train else "train_pool": (
            "train",
            np.arange(len(splits["train"])) if s.full_train else np.array(pools.train_union),
        ),
        "val_full" if s.full_val else "val_pool": (
            "val",
            np.arange(len(splits["val"])) if s.full_val else np.array(pools.val_union),
        ),
        "test": ("test", np.arange(len(splits["test"]))),
    }
    out: dict[str, np.ndarray] = {f"text/{t}": text for t in s.templates}
    out |= {f"text_raw/{t}": text[:, None, :] for t in s.templates}  # one unit-norm template: t itself
    proj = _projection(s) if s.preproj else None
    if proj is not None:
        out |= {"proj/weight": proj[0], "proj/bias": proj[1]}
    for pool, (split, index) in chosen.items():
        out |= _pool_arrays(pool, split, index, feats[split][index], splits[split][index], text, s, rng, proj)
    for (k, seed), subset in pools.subsets.items():
        out[f"splits/k{k}_s{seed}/train"] = np.asarray(subset.train, np.int32)
        out[f"splits/k{k}_s{seed}/val"] = np.asarray(subset.val, np.int32)
    return out, {pool: {"split": split, "size": len(index)} for pool, (split, index) in chosen.items()}


def _features(labels: np.ndarray, s: SyntheticSpec, rng: np.random.Generator) -> np.ndarray:
    x = np.zeros((len(labels), s.dim))
    x[np.arange(len(labels)), labels] = s.separation
    x[:, : s.dim // 2] += s.noise * rng.standard_normal((len(labels), s.dim // 2))
    return x


def _text_weights(s: SyntheticSpec, rng: np.random.Generator) -> np.ndarray:
    half = s.dim // 2
    other = np.zeros((s.num_classes, s.dim))
    other[:, half:] = rng.standard_normal((s.num_classes, s.dim - half))
    other /= np.linalg.norm(other, axis=1, keepdims=True)
    w = s.zero_shot * np.eye(s.num_classes, s.dim) + (1.0 - s.zero_shot) * other
    return (w / np.linalg.norm(w, axis=1, keepdims=True)).astype(np.float32)


def _projection(s: SyntheticSpec) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([s.seed, 1])  # its own stream: the other arrays stay as without preproj
    weight = np.eye(s.dim) + 0.1 * rng.standard_normal((s.dim, s.dim))
    return weight.astype(np.float32), (0.1 * rng.standard_normal(s.dim)).astype(np.float32)


def _pool_arrays(pool, split, index, x, labels, text, s: SyntheticSpec, rng, proj) -> dict[str, np.ndarray]:
    dtype = np.float16 if s.precision == "fp16" else np.float32
    out = {
        f"images/{pool}/split_index": index.astype(np.int32),
        f"images/{pool}/labels": labels.astype(np.int32),
        f"images/{pool}/paths": np.array([f"{split}/{i:05d}.png" for i in index], dtype=object),
    }
    groups = {"center": 1, **(s.views if pool.startswith("train") else {})}
    for policy, v in groups.items():
        views = (
            x[:, None, :]
            + s.view_noise * rng.standard_normal((len(x), v, s.dim)) * (np.arange(v) > 0)[None, :, None]
        )
        views[:, :, s.dim // 2 :] = 0.0  # augmentation never leaks into the text subspace
        prefix = f"images/{pool}/views/{policy}"
        f_hat = views / np.linalg.norm(views, axis=-1, keepdims=True)
        out[f"{prefix}/pooled"] = views.astype(dtype)
        if proj is not None:  # the pre-projection feature that the projection maps onto these views
            out[f"{prefix}/preproj"] = np.linalg.solve(proj[0], (views - proj[1])[..., None])[..., 0].astype(
                dtype
            )
        for t in s.templates:
            out[f"{prefix}/zs_logits/{t}"] = (ZS_SCALE * f_hat @ text.T).astype(dtype)
        out[f"{prefix}/aug_params"] = np.zeros((len(x), v, 5), np.int32)
        for tap, shape in s.extra_taps.items():
            out[f"{prefix}/{tap}"] = rng.standard_normal((len(x), v) + tuple(shape)).astype(dtype)
    return out


def _dataset_spec(s: SyntheticSpec, splits: dict[str, np.ndarray]) -> DatasetSpec:
    items = {k: tuple((f"{k}/{i:05d}.png", int(y)) for i, y in enumerate(v)) for k, v in splits.items()}
    return DatasetSpec(
        s.name, Path("."), _classnames(s), {t: ("a photo of a {}.",) for t in s.templates}, items, "synthetic"
    )


def _classnames(s: SyntheticSpec) -> tuple[str, ...]:
    return tuple(f"class {i}" for i in range(s.num_classes))


def _fingerprint_parts(s: SyntheticSpec) -> dict:
    spec = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in asdict(s).items()}
    spec["extra_taps"] = {k: list(v) for k, v in spec["extra_taps"].items()}
    spec["templates"] = list(s.templates)
    if not s.preproj:  # stores made before the option keep their fingerprint
        del spec["preproj"]
    return {
        "dataset": {"name": s.name, "classnames": list(_classnames(s))},
        "backbone": _backbone(s),
        "precision": s.precision,
        "format": s.format,
        "synthetic": spec,
        "few_shot": {"shots": sorted(s.shots), "seeds": sorted(s.seeds)},
        "aug_seed": 0,
        "extraction_version": EXTRACTION_VERSION,
    }


def _backbone(s: SyntheticSpec) -> dict:
    return {
        "arch": "synthetic",
        "pretrained": "none",
        "kind": "rn",
        "embed_dim": s.dim,
        "random_init": True,
        "preprocess_cfg": {},
        "quick_gelu": False,
        "dense_tap": "rn/layer4",
    }


def _manifest(s: SyntheticSpec, parts: dict, key: str) -> dict:
    train = "train_full" if s.full_train else "train_pool"
    return {
        "schema": SCHEMA,
        "fingerprint": key,
        "fingerprint_parts": parts,
        "format": s.format,
        "precision": s.precision,
        "created": "synthetic",
        "versions": {},
        "dataset": {
            "name": s.name,
            "classnames": list(_classnames(s)),
            "templates": {t: ["a photo of a {}."] for t in s.templates},
            "notes": ["synthetic (fsl_cache.testing)"],
            "split_sizes": dict(zip(("train", "val", "test"), (n * s.num_classes for n in s.per_class))),
        },
        "backbone": {**_backbone(s), "notes": [], "compute_dtype": "float32"},
        "zs_scale": ZS_SCALE,
        "aug_seed": 0,
        "policies": {},
        "few_shot": parts["few_shot"],
        "views": {f"{train}/{p}": v for p, v in {"center": 1, **s.views}.items()}
        | {f"{p}/center": 1 for p in ("val_full" if s.full_val else "val_pool", "test")},
        "skipped": {},
        "arrays": {},
    }


def _write(writer: StoreWriter, name: str, array: np.ndarray) -> ArraySpec:
    dtype = "str" if array.dtype == object else array.dtype.name
    spec = ArraySpec(name, tuple(array.shape), dtype, tuple(max(1, n) for n in array.shape))
    writer.write_whole(spec, array)
    return spec


def zero_shot_chance(num_classes: int) -> float:
    """Zero-shot accuracy (percent) of a ``zero_shot=0`` synthetic store: every logit ties, class 0 wins."""
    return 100.0 / num_classes


__all__: Sequence[str] = ("SyntheticSpec", "make_synthetic_store", "zero_shot_chance")


class ArrayStore:
    """In-memory stand-in for a :class:`FeatureStore`: the reads a ``FitTask`` makes (has, arrays, read, manifest)."""

    def __init__(self, data: dict[str, np.ndarray], manifest: dict) -> None:
        self.data, self.manifest, self.root = data, manifest, Path("synthetic")
        self.arrays = {k: {"shape": list(v.shape), "dtype": str(v.dtype)} for k, v in data.items()}

    def has(self, name: str) -> bool:
        return name in self.data

    def read(self, name: str, rows=None) -> np.ndarray:
        return self.data[name] if rows is None else self.data[name][rows]


def fit_method(name: str, task, options: Mapping, *, seed: int = 1):
    """Fit registered method ``name`` on ``task`` with ``options`` resolved as ``fsl-cache fit`` does."""
    method = get_method(name).create(options)
    method = type(method)(method.resolve(task.info))
    return method.fit(task, generator=torch.Generator().manual_seed(seed))


def pooled_accuracy(head, test) -> float:
    """Top-1 (%) of ``head`` on ``test = (pooled features [N, D], labels [N])``."""
    head.eval()
    with torch.no_grad():
        return 100.0 * (head({"pooled": test[0]}).argmax(-1) == test[1]).float().mean().item()
