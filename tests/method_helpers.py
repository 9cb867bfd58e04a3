"""Shared by the per-method tests of the cached-feature baselines (METHODS §2.10): a synthetic store where
learning must happen (zero-shot well below 100 %) and a fit on it."""

from __future__ import annotations

from fsl_cache import api
from fsl_cache.testing import make_synthetic_store

SYNTH = dict(dataset="synthetic", model="synthetic", pretrained="none")
LEARNING_STORE = dict(
    num_classes=4, zero_shot=0.0, views={"tip": 11, "coop": 21}, per_class=(16, 8, 24), seed=3
)
"""Text weights weakly aligned with the class means: zero-shot is above chance but far from 100 %."""


def learning_store(root):
    make_synthetic_store(root, **LEARNING_STORE)
    return root


def fit_accuracy(method: str, cache, runs, *, shots: int = 4, seed: int = 1, options=None) -> float:
    """Test top-1 (%) of ``method`` fitted on the synthetic store under ``cache``."""
    (run,) = api.fit(
        method,
        shots=shots,
        seeds=[seed],
        options=options or {},
        cache_dir=cache,
        runs_dir=runs,
        progress=False,
        **SYNTH,
    )
    return run.test_acc
