"""Accuracy numbers reported for every split: top-1, mean per-class accuracy, confusion matrix."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Metrics:
    """Scores of one head on one split, in percent."""

    top1: float
    mean_per_class: float
    n: int
    confusion: list[list[int]]
    """``confusion[true][predicted]`` image counts."""

    def to_json(self, *, confusion: bool = True) -> dict:
        out = {"top1": self.top1, "mean_per_class": self.mean_per_class, "n": self.n}
        if confusion:
            out["confusion"] = self.confusion
        return out


def correct_count(logits: torch.Tensor, labels: torch.Tensor) -> int:
    """Images whose arg-max logit is the label (ties go to the lowest class, like ``topk``)."""
    return int((logits.argmax(dim=-1) == labels).sum())


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy in percent ([CODE] Tip-Adapter utils.py::cls_acc)."""
    return 100.0 * correct_count(logits, labels) / max(len(labels), 1)


def confusion_matrix(pred: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    flat = labels.long() * num_classes + pred.long()
    return torch.bincount(flat, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def score(logits: torch.Tensor, labels: torch.Tensor, *, num_classes: int) -> Metrics:
    """Top-1, mean per-class accuracy (over classes present in ``labels``) and the confusion matrix."""
    cm = confusion_matrix(logits.argmax(dim=-1), labels, num_classes)
    per_class = cm.diag().double() / cm.sum(dim=1).clamp(min=1).double()
    present = cm.sum(dim=1) > 0
    mean = 100.0 * float(per_class[present].mean()) if bool(present.any()) else 0.0
    return Metrics(top1=accuracy(logits, labels), mean_per_class=mean, n=len(labels), confusion=cm.tolist())
