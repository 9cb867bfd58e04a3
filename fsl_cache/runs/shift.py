"""Domain shift: the head fitted on the source dataset, tested on each target's test split.

Targets are stores of the same backbone (``imagenet_v2``, ``imagenet_sketch``, ``imagenet_a``,
``imagenet_r`` by default); a target's classes are scored through the source's (ImageNet-A and -R:
their 200-class subsets, as CoOp does), so every target reuses the source run's head and choices.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import StoreError
from ..evaluation.metrics import score
from ..evaluation.scoring import predict
from ..methods import get_method
from ..splits import shift_classes, test_split
from ..store.store import FeatureStore
from ..training.data import open_views
from .locate import check_needs, locate_store
from .request import FitRequest


@dataclass(frozen=True)
class Target:
    """A domain-shift target: its store, and the source class each of its classes is scored as."""

    dataset: str
    """The target as the request names it (``imagenet_a``)."""
    store: FeatureStore
    classes: np.ndarray
    """``[C_target]`` source class indices, in target label order."""


def open_targets(
    request: FitRequest, source: FeatureStore, *, opener: Callable[[Path], FeatureStore] = FeatureStore.open
) -> list[Target]:
    """The request's targets, each opened from the store of the source's backbone and checked."""
    bb = source.manifest["backbone"]
    targets = []
    for dataset in request.targets:
        entry = locate_store(
            request.cache,
            dataset=dataset,
            model=bb["arch"],
            pretrained=str(bb["pretrained"]),
            store=None,
            method=request.method,
        )
        store = opener(entry.path)
        if (
            store.manifest["fingerprint_parts"]["backbone"]
            != source.manifest["fingerprint_parts"]["backbone"]
        ):
            raise StoreError(
                f"Target store {entry.path.name} was extracted with another backbone than the source"
            )
        name = store.manifest["dataset"]["name"]
        check_needs(
            store, get_method(request.method), dataset=name, cache_dir=request.cache_dir, eval_only=True
        )
        classes = shift_classes(source.classnames, store.classnames, target_name=dataset)
        targets.append(Target(dataset, store, classes))
    return targets


def target_evaluation(head, targets: Sequence[Target], *, device, memory_budget: int) -> dict:
    """Every head output on each target's test split, its logits restricted to the target's classes."""
    out = {}
    for target in targets:
        split = test_split(target.store)
        views = open_views(
            target.store, split, policy="center", taps=head.inputs, memory_budget=memory_budget, device=device
        )
        logits = predict(head, views, device=device)  # [N, C_source] per head output
        columns = torch.from_numpy(target.classes)
        scores = {
            name: score(out_[:, columns], split.labels, num_classes=len(columns))
            for name, out_ in logits.items()
        }
        headline = next(iter(scores))
        out[target.dataset] = {
            "test_acc": scores[headline].top1,
            "store": target.store.fingerprint,
            "classes": len(columns),
            # no confusion matrices: up to 1000 x 1000 per head and target
            "test": {name: m.to_json(confusion=False) for name, m in scores.items()},
        }
    return out
