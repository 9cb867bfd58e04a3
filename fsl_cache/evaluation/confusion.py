"""Confusion analytics for any run: top confused class pairs and how many zero-shot confusions a method resolves.

CAPT's headline measure ([PAPER] CAPT abstract: "resolving 50.72 percent of confusable sample
pairs") is defined here on the test split, for every method, against zero-shot CLIP's predictions
on the same images (the store's cached ``zs_logits``):

- a **confusable sample pair** is a test image that zero-shot assigns to a wrong class ``c``: the
  (true ``y``, predicted ``c``) pair it exhibits;
- the method **resolves** it when it classifies that image correctly;
- ``resolved_share = resolved / confusable`` (percent). ``introduced`` counts the images zero-shot
  got right and the method gets wrong (the price paid).

The cell-level view is reported too: a zero-shot confusion cell ``(y, c)`` (``N_zs[y, c] > 0``,
``y ≠ c``) is *cleared* when the method's count for that cell is 0, *reduced* when it is lower.

:func:`confusion_analytics` is what the engine writes into every run record (``record["metrics"]["analytics"]``,
and ``["analytics_novel"]`` under ``--protocol base2novel``);
:func:`analytics_from_record` is what ``fsl-cache report`` calls on a record (old records without
analytics get the matrix-only part, computed from the stored confusion matrix).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from ..store.reads import read_rows_of_view
from .metrics import confusion_matrix

TOP_PAIRS = 10
"""Confused (true, predicted) pairs listed per run."""


def top_confused_pairs(
    confusion, classnames: Sequence[str] | None = None, *, top: int = TOP_PAIRS
) -> list[dict]:
    """The ``top`` off-diagonal cells of ``confusion[true][pred]`` by count (ties: row-major order).

    Each entry: ``true``, ``pred`` (indices), their names, ``count`` and ``rate`` (percent of the true
    class's images).
    """
    cm = np.asarray(confusion, dtype=np.int64)
    off = cm.copy()
    np.fill_diagonal(off, 0)
    flat = np.argsort(-off, axis=None, kind="stable")[:top]
    rows = cm.sum(axis=1)
    out = []
    for idx in flat:
        y, c = divmod(int(idx), cm.shape[1])
        if off[y, c] <= 0:
            break
        out.append(
            {
                "true": y,
                "pred": c,
                "true_name": _name(classnames, y),
                "pred_name": _name(classnames, c),
                "count": int(off[y, c]),
                "rate": 100.0 * float(off[y, c]) / max(int(rows[y]), 1),
            }
        )
    return out


def resolved_pairs(
    pred: torch.Tensor, zs_pred: torch.Tensor, labels: torch.Tensor, *, num_classes: int
) -> dict:
    """CAPT's measure: the share of zero-shot's confusable (true, predicted) sample pairs the method resolves.

    ``pred``, ``zs_pred``, ``labels``: ``[N]`` class indices of the same images.
    """
    pred, zs_pred, labels = (torch.as_tensor(t).long().flatten() for t in (pred, zs_pred, labels))
    confused = zs_pred != labels
    resolved = confused & (pred == labels)
    introduced = ~confused & (pred != labels)
    zs_cm = confusion_matrix(zs_pred, labels, num_classes).numpy()
    m_cm = confusion_matrix(pred, labels, num_classes).numpy()
    cells = ~np.eye(num_classes, dtype=bool) & (zs_cm > 0)
    n_confused = int(confused.sum())
    return {
        "confusable": n_confused,
        "resolved": int(resolved.sum()),
        "resolved_share": 100.0 * int(resolved.sum()) / n_confused if n_confused else None,
        "introduced": int(introduced.sum()),
        "pairs": int(cells.sum()),
        "pairs_cleared": int((cells & (m_cm == 0)).sum()),
        "pairs_reduced": int((cells & (m_cm < zs_cm)).sum()),
    }


def per_pair_resolution(
    pred, zs_pred, labels, classnames: Sequence[str] | None = None, *, num_classes: int, top: int = TOP_PAIRS
) -> list[dict]:
    """For zero-shot's ``top`` confused pairs: its count, the method's count, and how many of those images it fixes."""
    pred, zs_pred, labels = (torch.as_tensor(t).long().flatten() for t in (pred, zs_pred, labels))
    c = num_classes
    zs_cm = confusion_matrix(zs_pred, labels, c).numpy()
    m_cm = confusion_matrix(pred, labels, c).numpy()
    out = []
    for pair in top_confused_pairs(zs_cm, classnames, top=top):
        in_cell = (labels == pair["true"]) & (zs_pred == pair["pred"])
        y, c = pair["true"], pair["pred"]
        out.append(
            {
                "true": y,
                "pred": c,
                "true_name": pair["true_name"],
                "pred_name": pair["pred_name"],
                "zero_shot_count": pair["count"],
                "method_count": int(m_cm[y, c]),
                "resolved": int((in_cell & (pred == labels)).sum()),
            }
        )
    return out


def confusion_analytics(
    pred: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_classes: int,
    classnames: Sequence[str] | None = None,
    zs_pred: torch.Tensor | None = None,
    top: int = TOP_PAIRS,
) -> dict:
    """Analytics of one head on one split (what every run record carries under ``analytics``).

    ``zs_pred`` (zero-shot's predictions on the same images) adds zero-shot's top pairs, the
    resolved-pairs measure and the per-pair table; without it only the method's own pairs appear.
    """
    cm = confusion_matrix(torch.as_tensor(pred).long(), torch.as_tensor(labels).long(), num_classes).numpy()
    out: dict = {"top_pairs": top_confused_pairs(cm, classnames, top=top)}
    if zs_pred is not None:
        zs_cm = confusion_matrix(
            torch.as_tensor(zs_pred).long(), torch.as_tensor(labels).long(), num_classes
        ).numpy()
        out["zero_shot"] = {
            "top1": 100.0 * float(np.trace(zs_cm)) / max(int(zs_cm.sum()), 1),
            "top_pairs": top_confused_pairs(zs_cm, classnames, top=top),
        }
        out["resolved"] = resolved_pairs(pred, zs_pred, labels, num_classes=num_classes)
        out["per_pair"] = per_pair_resolution(
            pred, zs_pred, labels, classnames, num_classes=num_classes, top=top
        )
    return out


def analytics_from_record(record: dict, *, top: int = TOP_PAIRS) -> dict:
    """Confusion analytics of a run record, for ``fsl-cache report``.

    Returns ``{"confusion": [[...]], "top_pairs": [...], "resolved": {...} | None, "zero_shot": {...} | None,
    "per_pair": [...], "novel": {...} | None}``. Records written before analytics existed get the
    matrix-only part (top pairs from the stored test confusion matrix; ``resolved`` is ``None``).
    """
    metrics = record["metrics"]
    confusion = metrics["test"][metrics["headline"]].get("confusion")
    stored = metrics.get("analytics") or {}
    names = record.get("classnames")
    out = {
        "confusion": confusion,
        "top_pairs": stored.get("top_pairs")
        or (top_confused_pairs(confusion, names, top=top) if confusion else []),
        "resolved": stored.get("resolved"),
        "zero_shot": stored.get("zero_shot"),
        "per_pair": stored.get("per_pair", []),
        "novel": metrics.get("analytics_novel"),
    }
    return out


def zero_shot_predictions(
    store, split, *, template_set: str = "tip", classes: np.ndarray | None = None
) -> torch.Tensor | None:
    """Zero-shot's arg-max on the center view of ``split`` from the store's cached ``zs_logits`` (``None`` if absent).

    ``classes`` restricts (and re-indexes) the columns, for class subsets such as base-to-novel.
    """
    name = f"images/{split.pool}/views/center/zs_logits/{template_set}"
    if not store.has(name):
        return None
    logits = torch.from_numpy(
        np.asarray(read_rows_of_view(store.array(name), split.rows, 0, name=name))
    ).float()
    if classes is not None:
        logits = logits[:, torch.as_tensor(np.asarray(classes), dtype=torch.long)]
    return logits.argmax(dim=-1)


def _name(classnames: Sequence[str] | None, i: int) -> str | None:
    return classnames[i] if classnames is not None and i < len(classnames) else None
