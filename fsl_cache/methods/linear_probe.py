"""Linear probe (CoOp ``lpclip``, METHODS §2.2): L2 logistic regression on raw embeddings, C searched on val."""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from ..training import FitTask, Head
from .base import FitResult, Method, ValidationFree
from .options import ConfigError, MethodConfig, check_range
from .registry import register_method

# [CODE] CoOp lpclip/linear_probe.py: search_list and num_step
C_GRID = (1e6, 1e4, 1e2, 1.0, 1e-2, 1e-4, 1e-6)


@dataclass(frozen=True)
class LinearProbeConfig(MethodConfig):
    c_grid: tuple[float, ...] = C_GRID
    """Initial inverse-regularisation values, scored on val; the first maximum seeds the search."""
    search_steps: int = 8
    """Steps of lpclip's log-space binary search around the best grid value; the last step's model is kept."""
    max_iter: int = 1000
    """lbfgs iterations per fit."""

    def __post_init__(self) -> None:
        if not self.c_grid or any(c <= 0 for c in self.c_grid):
            raise ConfigError(f"option c_grid needs positive values, got {self.c_grid}")
        check_range("search_steps", self.search_steps, low=0)
        check_range("max_iter", self.max_iter, low=1)


class LinearHead(Head):
    """``f Aᵀ + b`` on the raw (un-normalised) embedding."""

    inputs = ("pooled",)

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(weight.shape[1], weight.shape[0])
        with torch.no_grad():
            self.linear.weight.copy_(weight)
            self.linear.bias.copy_(bias)

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.linear(x["pooled"])


def fit_logreg(x: np.ndarray, y: np.ndarray, *, c: float, max_iter: int):
    """sklearn ``LogisticRegression(lbfgs, l2, C=c)`` ([CODE] lpclip)."""
    # sklearn takes ~1 s to import: only a linear-probe fit pays it, not every listing of the methods
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # lpclip runs the same capped lbfgs silently
        return LogisticRegression(solver="lbfgs", max_iter=max_iter, C=c).fit(x, y)


def val_accuracy(clf, x: np.ndarray, y: np.ndarray) -> float:
    return float(np.mean(clf.predict(x) == y)) if len(y) else 0.0


def search_c(
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray],
    *,
    grid: tuple[float, ...],
    steps: int,
    max_iter: int,
) -> tuple[object, dict]:
    """lpclip's search: the grid, then ``steps`` halvings in log10 space; returns the last step's model.

    [CODE] lpclip binary_search: fit both ends, keep the better (ties keep the left end), the next
    interval runs from the log-midpoint to the kept end.
    """
    fit = lambda c: fit_logreg(*train, c=c, max_iter=max_iter)  # noqa: E731
    scores = [val_accuracy(fit(c), *val) for c in grid]
    peak = grid[int(np.argmax(scores))]
    left, right = 0.1 * peak, 10.0 * peak
    clf, c_final, trace = (fit(peak), peak, []) if steps == 0 else (None, None, [])
    for _ in range(steps):
        clf_left, clf_right = fit(left), fit(right)
        acc_left, acc_right = val_accuracy(clf_left, *val), val_accuracy(clf_right, *val)
        trace.append({"left": left, "right": right, "val_left": 100 * acc_left, "val_right": 100 * acc_right})
        mid = 0.5 * (math.log10(left) + math.log10(right))
        if acc_left < acc_right:
            clf, c_final, left, right = clf_right, right, 10**mid, right
        else:
            clf, c_final, left, right = clf_left, left, left, 10**mid
    selection = {"c": c_final, "grid": list(grid), "grid_val_acc": [100 * s for s in scores], "search": trace}
    return clf, selection


def head_from_sklearn(clf, *, num_classes: int, dim: int) -> LinearHead:
    """Full ``[C, D]`` weights from a fitted model (binary models and classes absent from train included)."""
    coef, intercept = np.asarray(clf.coef_), np.asarray(clf.intercept_)
    if len(clf.classes_) == 2 and coef.shape[0] == 1:  # sklearn keeps one row for two classes
        coef, intercept = np.concatenate([np.zeros_like(coef), coef]), np.concatenate([[0.0], intercept])
    weight = torch.zeros(num_classes, dim, dtype=torch.float64)
    bias = torch.full((num_classes,), -1e4, dtype=torch.float64)  # never predict a class it never saw
    index = torch.as_tensor(np.asarray(clf.classes_, dtype=np.int64))
    weight[index] = torch.from_numpy(coef.astype(np.float64))
    bias[index] = torch.from_numpy(intercept.astype(np.float64))
    return LinearHead(weight.float(), bias.float())


@register_method
class LinearProbe(Method):
    name = "linear_probe"
    description = (
        "Linear probe: sklearn lbfgs logistic regression on raw embeddings, "
        "C grid + binary search on val (§2.2)."
    )
    Config = LinearProbeConfig
    deviations = (
        "[PROPOSED] coop protocol: the shared CoOp/Dassl splits (seeds 1-3) instead of lpclip's own "
        "np.random sampling of 10 seeds, so every method sees identical samples.",
        "[CODE] the test number is that of the last search step, as lpclip reports; lpclip also scores "
        "test at every step (only printed), which fsl-cache does not do.",
    )
    validation_free = ValidationFree(
        "none: CoOp lpclip searches C on val, and its code has no fixed C", options=None
    )
    paper_protocol = (
        "lpclip's own sampling: np.random.seed(seed), np.random.choice per class from the full "
        "train split (val shots 1,2,4,4,4), when the store holds train_full and val_full."
    )
    paper_sampling = "lpclip"
    trains = False

    quick = {"search_steps": 1}

    @classmethod
    def rebuild_head(cls, bundle, state, backbone) -> LinearHead:
        return LinearHead(state["linear.weight"], state["linear.bias"])

    def fit(self, task: FitTask, *, generator: torch.Generator) -> FitResult:
        train = (task.center(task.train).double().numpy(), task.train.labels.numpy())
        val = (task.center(task.val).double().numpy(), task.val.labels.numpy())
        cfg = self.config
        clf, selection = search_c(train, val, grid=cfg.c_grid, steps=cfg.search_steps, max_iter=cfg.max_iter)
        head = head_from_sklearn(clf, num_classes=task.info.num_classes, dim=train[0].shape[1])
        return FitResult(head, selection=selection)
