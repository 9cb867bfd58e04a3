"""``--engine ray``: the grid's pending trials as Ray Tune trials over a cluster (optional extra).

Every Tune trial calls the same :func:`~fsl_cache.sweeps.trial.run_trial` as the local engine, on
the same cached tensors (the store folder must be reachable from every node: a shared file system
or an fsspec URL), and writes the same run records under the same claims. Each Ray worker process
keeps its stores open across the trials it runs. Not exercised by the test suite (Ray is heavy).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

from ..errors import UsageError
from .spec import Trial
from .trial import Outcome, StoreCache, SweepContext, run_trial

_STORES: dict[SweepContext, StoreCache] = {}


def require_ray():
    try:
        import ray
        from ray import tune
    except ImportError as err:
        raise UsageError("--engine ray needs Ray Tune: pip install 'fsl-cache[ray]'") from err
    return ray, tune


def _trainable(config: dict) -> dict:
    """One Tune trial: ``config["trial"]`` under ``config["context"]``; the metric is val accuracy."""
    context: SweepContext = config["context"]
    stores = _STORES.setdefault(context, StoreCache(context))
    outcome = run_trial(config["trial"], stores)
    return {
        "val_acc": outcome.val_acc if outcome.val_acc is not None else float("nan"),
        "test_acc": outcome.test_acc,
        "status": outcome.status,
        "error": outcome.error,
        "run_dir": str(outcome.run_dir) if outcome.run_dir else "",
    }


def run_ray(
    trials: Sequence[Trial],
    context: SweepContext,
    *,
    workers: int | None = None,
    on_outcome: Callable[[Outcome], None] | None = None,
    address: str | None = None,
) -> list[Outcome]:
    """Run ``trials`` as one Tune grid (``workers`` concurrent trials; ``address`` joins a running cluster)."""
    ray, tune = require_ray()
    if not ray.is_initialized():
        ray.init(address=address, ignore_reinit_error=True, log_to_driver=False)
    tuner = tune.Tuner(
        _trainable,
        param_space={"trial": tune.grid_search(list(trials)), "context": context},
        tune_config=tune.TuneConfig(max_concurrent_trials=workers, reuse_actors=True),
    )
    outcomes = []
    for result in tuner.fit():
        m = result.metrics or {}
        trial = result.config["trial"]
        status = m.get("status", "failed") if result.error is None else "failed"
        outcome = Outcome(
            trial,
            status,
            Path(m["run_dir"]) if m.get("run_dir") else None,
            m.get("val_acc"),
            m.get("test_acc"),
            error=m.get("error") or (str(result.error) if result.error else ""),
        )
        if on_outcome is not None:
            on_outcome(outcome)
        outcomes.append(outcome)
    return outcomes
