"""Trained heads outside stage two: rebuilt from a run or an export, applied to image files."""

from .bundle import HeadBundle, export_bundle, find_run, load_bundle
from .heads import rebuild_head
from .predictor import Prediction, Predictor

__all__ = [
    "HeadBundle",
    "Prediction",
    "Predictor",
    "export_bundle",
    "find_run",
    "load_bundle",
    "rebuild_head",
]
