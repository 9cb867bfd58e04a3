"""Protocols: which images train, which select, which test (METHODS §1.5).

``coop`` (default): the CoOp/Dassl (shots, seed) draw stored with the features, few-shot val
(min(k, 4) per class) for every choice, test read once at the very end. ``paper``: each method's
official quirks (full val split, lpclip's own sampling, test-set selection), flagged in the record.
``base2novel``: the ``coop`` draw restricted to the base classes (CoCoOp / CAPT setting); the
finished method is tested on base classes and, through :meth:`Method.novel_head`, on novel ones.
``domain_shift``: the ``coop`` rules on the source dataset, then the finished head is tested on each
target's test split too, through the source's classes (:func:`shift_classes`); ``paper`` with targets
keeps the paper's quirks on the source (e.g. LDC's β searched on ImageNet test).

The validation regime (``--validation``, METHODS §2.10) is the other half of a protocol: ``none`` (no val
is read; each method runs its declared validation-free setting, :attr:`Method.validation_free`),
``kshot`` (the few-shot val) or ``full`` (the dataset's whole val split, refused where there is none).
Without ``--validation`` a protocol uses its own regime (:func:`default_validation`): ``paper`` the
official one of each method (full val where its code searches it, test-set selection included),
every other protocol the K-shot val. A regime given explicitly is exactly that regime: no test read.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ..errors import StoreError, UsageError
from ..store.reads import read_rows
from .refs import SplitRef
from .sampling import VAL_SHOTS_CAP, sample_few_shot

PROTOCOLS = ("coop", "paper", "base2novel", "domain_shift")
VALIDATIONS = ("none", "kshot", "full")
TARGET_PROTOCOLS = ("domain_shift", "paper")
"""Protocols that evaluate domain-shift targets (``paper`` only when targets are given)."""


class MissingDraw(UsageError):
    """The store holds neither the (shots, seed) draw nor the full pools it could be re-drawn from."""


@dataclass
class Splits:
    """Train and selection splits of one run, plus the caveats met while choosing them."""

    train: SplitRef
    val: SplitRef | None
    """``None`` under ``--validation none``: nothing of val is read."""
    notes: list[str] = field(default_factory=list)
    validation: str = "kshot"
    """The regime the splits implement (``kshot`` where a ``paper`` full-val selection fell back)."""


def check_protocol(protocol: str) -> str:
    if protocol not in PROTOCOLS:
        raise UsageError(f"Unknown protocol '{protocol}'. Available: {', '.join(PROTOCOLS)}")
    return protocol


def check_validation(validation: str | None) -> str | None:
    if validation is not None and validation not in VALIDATIONS:
        raise UsageError(f"Unknown validation regime '{validation}'. Available: {', '.join(VALIDATIONS)}")
    return validation


def default_validation(protocol: str, method_cls) -> str:
    """The regime of ``protocol`` without ``--validation``: under ``paper`` the method's official one (the
    full val split where its code searches it, ``paper_full_val``), under the other protocols the K-shot val."""
    return "full" if protocol == "paper" and method_cls.paper_full_val else "kshot"


def check_full_val(store) -> None:
    """Refuse ``--validation full`` where the dataset has no val split, or the store lacks the whole of it."""
    dataset = store.manifest["dataset"]
    if dataset.get("split_sizes", {}).get("val", 1) == 0:
        raise UsageError(
            f"Dataset {dataset['name']} has no val split, so --validation full has nothing to select on "
            "(it would be the test set); use --validation kshot or none"
        )
    if not store.has("images/val_full/labels"):
        backbone = store.manifest["backbone"]
        raise UsageError(
            f"--validation full selects on the whole val split, which store {store.root.name} lacks; add it with "
            f"fsl-cache extract --dataset {dataset['name']} --model {backbone['arch']} "
            f"--pretrained {backbone['pretrained']} --full-val"
        )


def pool_for(store, split: str, *, prefer_full: bool = False) -> str | None:
    """The store pool holding ``split`` images (``train_pool``/``train_full``, ``val_pool``/``val_full``, ``test``)."""
    if split == "test":
        return "test" if store.has("images/test/labels") else None
    order = (f"{split}_full", f"{split}_pool") if prefer_full else (f"{split}_pool", f"{split}_full")
    return next((p for p in order if store.has(f"images/{p}/labels")), None)


def split_ref(
    store, name: str, pool: str, split_index: np.ndarray, notes: list[str] | None = None
) -> SplitRef:
    """Rows of ``pool`` holding the split indices ``split_index`` (in that order), minus skipped images."""
    pool_index = read_rows(store, f"images/{pool}/split_index", None).astype(np.int64)
    split_index = np.asarray(split_index, dtype=np.int64)
    skipped = set(store.manifest.get("skipped", {}).get(pool, []))
    if skipped:
        kept = np.array([i not in skipped for i in split_index], dtype=bool)
        if not kept.all() and notes is not None:
            notes.append(
                f"{int((~kept).sum())} unreadable {name} image(s) skipped at extraction are left out"
            )
        split_index = split_index[kept]
    rows = np.searchsorted(pool_index, split_index)
    rows = np.minimum(rows, len(pool_index) - 1)
    if len(split_index) and not np.array_equal(pool_index[rows], split_index):
        raise StoreError(
            f"Store pool {pool} lacks some {name} images of this split; the store is incomplete or foreign"
        )
    labels = read_rows(store, f"images/{pool}/labels", rows).astype(np.int64)
    return SplitRef(name, pool, rows, torch.from_numpy(labels), split_index)


def whole_pool(store, name: str, pool: str, notes: list[str] | None = None) -> SplitRef:
    index = read_rows(store, f"images/{pool}/split_index", None)
    return split_ref(store, name, pool, index, notes)


def test_split(store) -> SplitRef:
    """The whole test pool. Called by the engine for the final evaluation (and the paper oracle) only."""
    if pool_for(store, "test") is None:
        raise StoreError(f"Store {store.root.name} has no test pool")
    return whole_pool(store, "test", "test")


# ---------------------------------------------------------------------------- few-shot draws


def few_shot_indices(store, *, shots: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train and val split indices of the CoOp (shots, seed) draw: stored, or re-drawn from full pools."""
    prefix = f"splits/k{shots}_s{seed}"
    if store.has(f"{prefix}/train"):
        val = read_rows(store, f"{prefix}/val", None) if store.has(f"{prefix}/val") else np.zeros(0, np.int32)
        return read_rows(store, f"{prefix}/train", None), val
    train_pool, val_pool = (
        pool_for(store, "train", prefer_full=True),
        pool_for(store, "val", prefer_full=True),
    )
    if train_pool == "train_full" and val_pool in ("val_full", None):
        # [CODE] Dassl sampling is a function of the split label lists, which full pools hold whole
        train_labels = read_rows(store, "images/train_full/labels", None).tolist()
        val_labels = read_rows(store, "images/val_full/labels", None).tolist() if val_pool else []
        subset = sample_few_shot(train_labels, val_labels, shots=shots, seed=seed)
        return np.asarray(subset.train), np.asarray(subset.val)
    fs = store.manifest.get("few_shot", {})
    raise MissingDraw(
        f"The store holds few-shot splits for shots {_join(fs.get('shots'))} and seeds {_join(fs.get('seeds'))}, "
        f"not shots={shots} seed={seed}. Extract a store that covers them (fsl-cache extract ... --shots "
        f"{_join(sorted(set(fs.get('shots', [])) | {shots}))} "
        f"--seeds {_join(sorted(set(fs.get('seeds', [])) | {seed}))}) "
        "or one with --full-train --full-val"
    )


def _join(values) -> str:
    return ",".join(str(v) for v in values or []) or "none"


def lpclip_indices(
    train_labels: np.ndarray, val_labels: np.ndarray, *, shots: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """CoOp lpclip's own draw: ``np.random.seed(seed)``, ``np.random.choice`` per class, train then val.

    [CODE] lpclip/linear_probe.py: classes from ``np.unique(train_label)``; val shots {1:1, 2:2, 4:4, 8:4, 16:4}.
    """
    rng = np.random.RandomState(seed)  # the legacy global stream np.random.seed(seed) starts
    classes = np.unique(train_labels)
    train = [rng.choice(np.where(train_labels == c)[0], size=shots, replace=False) for c in classes]
    val_k = min(shots, VAL_SHOTS_CAP)
    val = [rng.choice(np.where(val_labels == c)[0], size=val_k, replace=False) for c in classes]
    return np.concatenate(train), np.concatenate(val)


def check_shots(store, split: SplitRef, *, shots: int) -> None:
    """Refuse a draw where some class has fewer than ``shots`` train images."""
    counts = Counter(split.labels.tolist())
    names = store.classnames
    short = [(c, counts.get(c, 0)) for c in range(len(names)) if counts.get(c, 0) < shots]
    if short:
        c, have = short[0]
        more = f" (and {len(short) - 1} more classes)" if len(short) > 1 else ""
        raise UsageError(
            f"--shots {shots} is more than class '{names[c]}' has: {have} train image(s){more}. "
            "Use fewer shots."
        )


# ---------------------------------------------------------------------------- protocol


def build_splits(
    store, method_cls, *, shots: int, seed: int, protocol: str, validation: str = "kshot"
) -> Splits:
    """Train and selection splits of one run under ``protocol`` for ``method_cls``'s paper quirks, selecting
    under ``validation`` (``none``: no val split at all)."""
    notes: list[str] = []
    drawn = None
    if protocol == "paper" and getattr(method_cls, "paper_sampling", "coop") == "lpclip":
        drawn = _lpclip_splits(store, shots=shots, seed=seed, notes=notes)
    if drawn is None:
        train_idx, val_idx = few_shot_indices(store, shots=shots, seed=seed)
        train = split_ref(store, "train", pool_for(store, "train"), train_idx, notes)
        check_shots(store, train, shots=shots)
        val, validation = _selection_split(store, val_idx, validation=validation, notes=notes)
    else:
        train, val = drawn.train, drawn.val
        if validation != "kshot":  # lpclip draws its own K-shot val; the other regimes replace it
            val, validation = _selection_split(store, None, validation=validation, notes=notes)
    if protocol == "base2novel":  # [CODE] CoOp subsample_classes: after few-shot sampling
        base, _ = base_novel_classes(len(store.classnames))
        train = subset_classes(train, base)
        val = subset_classes(val, base) if val is not None else None
    return Splits(train, val, notes, validation)


def _selection_split(
    store, val_idx: np.ndarray | None, *, validation: str, notes: list[str]
) -> tuple[SplitRef | None, str]:
    """The selection split of ``validation`` and the regime it implements."""
    if validation == "none":
        return None, "none"
    if validation == "full":
        if store.has("images/val_full/labels"):
            return whole_pool(store, "val", "val_full", notes), "full"
        # only a default (paper) regime gets here: an explicit --validation full is refused up front
        notes.append(
            "paper protocol selects on the full val split, but the store holds only the few-shot val "
            "(extract again with --full-val to add it); used the few-shot val"
        )
    if val_idx is None or len(val_idx) == 0:
        raise UsageError(
            f"Store {store.root.name} has no validation images for this split; methods select on val"
        )
    pool = pool_for(store, "val")
    if pool is None:
        raise StoreError(f"Store {store.root.name} has no val pool")
    return split_ref(store, "val", pool, val_idx, notes), "kshot"


def _lpclip_splits(store, *, shots: int, seed: int, notes: list[str]) -> Splits | None:
    if not (store.has("images/train_full/labels") and store.has("images/val_full/labels")):
        notes.append(
            "paper protocol samples like lpclip from the full train and val splits; the store holds "
            "only few-shot pools (extract with --full-train --full-val), so the CoOp split was used"
        )
        return None
    train_labels = read_rows(store, "images/train_full/labels", None)
    val_labels = read_rows(store, "images/val_full/labels", None)
    train_idx, val_idx = lpclip_indices(train_labels, val_labels, shots=shots, seed=seed)
    notes.append(f"paper protocol: lpclip sampling (np.random.seed({seed}))")
    train = split_ref(store, "train", "train_full", train_idx, notes)
    return Splits(train, split_ref(store, "val", "val_full", val_idx, notes), notes)


# ---------------------------------------------------------------------------- base-to-novel


def base_novel_classes(num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """Base and novel class indices (METHODS §1.5): sorted labels, base = first ``ceil(C/2)``, novel = the rest.

    [CODE] CoOp ``OxfordPets.subsample_classes``: ``m = math.ceil(n / 2)`` over ``sorted(labels)``.
    """
    if num_classes < 2:
        raise UsageError(f"--protocol base2novel needs at least 2 classes, the store has {num_classes}")
    m = -(-num_classes // 2)
    labels = np.arange(num_classes)
    return labels[:m], labels[m:]


def subset_classes(split: SplitRef, classes: np.ndarray) -> SplitRef:
    """The images of ``split`` whose label is in ``classes``, relabelled ``classes[i] → i`` (in split order)."""
    classes = np.asarray(classes, dtype=np.int64)
    relabel = np.full(
        int(max(classes.max(), int(split.labels.max()) if len(split) else 0)) + 1, -1, dtype=np.int64
    )
    relabel[classes] = np.arange(len(classes))
    labels = split.labels.numpy()
    keep = np.isin(labels, classes)
    return SplitRef(
        split.name,
        split.pool,
        split.rows[keep],
        torch.from_numpy(relabel[labels[keep]]),
        split.split_index[keep],
    )


def harmonic_mean(base: float, novel: float) -> float:
    """``2·b·n / (b + n)`` (0 when both are 0), the base-to-novel headline."""
    return 2.0 * base * novel / (base + novel) if base + novel > 0 else 0.0


# ---------------------------------------------------------------------------- domain shift


def shift_classes(source: Sequence[str], target: Sequence[str], *, target_name: str) -> np.ndarray:
    """The source class each target class is scored as (``[C_target]`` source indices), matched by name.

    [CODE] CoOp imagenet_a.py / imagenet_r.py label the 200 wnid folders present with ImageNet's
    classnames.txt, so their names are ImageNet's: the source head's logits of those 200 classes,
    in target label order, classify them. -V2 and -Sketch map one to one.
    """
    index: dict[str, list[int]] = {}
    for i, name in enumerate(source):
        index.setdefault(name, []).append(i)
    classes = []
    for name in target:
        found = index.get(name, [])
        if len(found) != 1:
            how = "is not among" if not found else "names several of"
            raise UsageError(f"Target {target_name}: class '{name}' {how} the source dataset's classes")
        classes.append(found[0])
    return np.asarray(classes, dtype=np.int64)
