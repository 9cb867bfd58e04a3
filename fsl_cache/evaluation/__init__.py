"""Scoring heads: accuracy, mean per-class accuracy, confusion matrices, batched prediction."""

from .metrics import Metrics, accuracy, confusion_matrix, correct_count, score
from .scoring import evaluate, predict

__all__ = ["Metrics", "accuracy", "confusion_matrix", "correct_count", "evaluate", "predict", "score"]
