"""``--engine optuna``: option search on val accuracy, shared through an Optuna journal file.

One study per (method, dataset, shots), all in one journal file (``JournalFileBackend``: appends
under a file lock, so processes on one machine or on several nodes sharing a file system join the
same studies without a database server). An Optuna trial picks one value per swept option
(``-o key=v1,v2``), runs :func:`~fsl_cache.sweeps.trial.run_trial` for every seed, and scores the
mean **val** accuracy over seeds (test accuracy is only attached as a user attribute, never used
for selection). The ``grid`` sampler visits every combination once; ``tpe`` samples ``n_trials``.
Run records are written and reused exactly as with the local engine.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from statistics import fmean
from typing import Any

from ..errors import FslError, UsageError
from ..interrupts import die_with_parent, sigterm_as_interrupt
from .spec import GridSpec, Trial, check_options, method_options
from .trial import Outcome, StoreCache, SweepContext, run_trial

SAMPLERS = ("grid", "tpe")


def require_optuna():
    try:
        import optuna
    except ImportError as err:
        raise UsageError("--engine optuna needs Optuna: pip install 'fsl-cache[optuna]'") from err
    return optuna


@dataclass(frozen=True)
class StudyResult:
    """The best option values of one (method, dataset, shots) study."""

    study: str
    method: str
    dataset: str
    shots: int
    best_options: dict[str, Any]
    best_val_acc: float | None
    test_acc: float | None
    """Mean test accuracy over seeds of the best trial (reported, not used to choose)."""
    trials: int

    def to_json(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class OptunaSettings:
    storage: Path
    """The journal file (created if missing)."""
    sampler: str = "grid"
    n_trials: int | None = None
    """Trials per study for ``tpe`` (default: the size of the option grid); ``grid`` runs the whole grid."""
    prefix: str = "fsl-cache"
    seed: int = 0
    """Sampler seed (TPE's draws)."""

    def __post_init__(self) -> None:
        if self.sampler not in SAMPLERS:
            raise UsageError(f"Unknown sampler '{self.sampler}'. Available: {', '.join(SAMPLERS)}")


def study_name(prefix: str, method: str, dataset: str, shots: int, protocol: str) -> str:
    return f"{prefix}/{method}/{dataset}/k{shots}/{protocol}"


def search_space(spec: GridSpec, method: str) -> dict[str, list[Any]]:
    """``{option: [values]}`` swept for ``method`` (categorical; tuples become comma-joined strings)."""
    combos = method_options(spec, method)
    keys = sorted(combos[0]) if combos else []
    return {k: list(dict.fromkeys(_categorical(c[k]) for c in combos)) for k in keys}


def _categorical(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return value


def storage_for(path: Path):
    optuna = require_optuna()
    from optuna.storages.journal import JournalFileBackend

    path.parent.mkdir(parents=True, exist_ok=True)
    return optuna.storages.JournalStorage(JournalFileBackend(str(path)))


def objective_for(
    spec: GridSpec,
    method: str,
    dataset: str,
    shots: int,
    space: dict[str, list[Any]],
    stores: StoreCache,
    on_outcome: Callable[[Outcome], None] | None,
):
    """The Optuna objective: mean val accuracy over the spec's seeds for the sampled option values."""

    def objective(trial) -> float:
        options = {k: trial.suggest_categorical(k, v) for k, v in space.items()}
        frozen = tuple(sorted(options.items()))
        outcomes = [run_trial(Trial(method, dataset, shots, seed, frozen), stores) for seed in spec.seeds]
        for outcome in outcomes:
            if on_outcome is not None:
                on_outcome(outcome)
        failed = [o for o in outcomes if o.status in ("failed", "busy")]
        if failed:
            trial.set_user_attr("error", failed[0].error or "claimed by another process")
            raise FslError(f"{failed[0].trial.label}: {failed[0].error or 'claimed by another process'}")
        trial.set_user_attr("test_acc", fmean(o.test_acc for o in outcomes))
        trial.set_user_attr("run_dirs", [str(o.run_dir) for o in outcomes])
        return fmean(o.val_acc for o in outcomes)

    return objective


def optimize(
    spec: GridSpec,
    context: SweepContext,
    settings: OptunaSettings,
    *,
    on_outcome: Callable[[Outcome], None] | None = None,
) -> list[StudyResult]:
    """Run (or join) every study of ``spec`` in this process; returns each study's best trial."""
    optuna = require_optuna()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    check_options(spec)
    storage = storage_for(settings.storage)
    stores = StoreCache(context)
    results = []
    try:
        for method, dataset, shots in itertools.product(spec.methods, spec.datasets, spec.shots):
            space = search_space(spec, method)
            name = study_name(settings.prefix, method, dataset, shots, context.protocol)
            study = optuna.create_study(
                study_name=name,
                storage=storage,
                direction="maximize",
                sampler=_sampler(optuna, settings, space),
                load_if_exists=True,
            )
            objective = objective_for(spec, method, dataset, shots, space, stores, on_outcome)
            _run_study(optuna, study, objective, settings, space)
            results.append(_summary(optuna, study, method, dataset, shots))
    finally:
        stores.close()
    return results


def _sampler(optuna, settings: OptunaSettings, space: dict[str, list[Any]]):
    if settings.sampler == "grid" and space:
        return optuna.samplers.GridSampler(space, seed=settings.seed)
    return optuna.samplers.TPESampler(seed=settings.seed)


def _grid_size(space: dict[str, list[Any]]) -> int:
    size = 1
    for values in space.values():
        size *= len(values)
    return size


def _run_study(optuna, study, objective, settings: OptunaSettings, space: dict[str, list[Any]]) -> None:
    """Until the study holds its quota of finished trials (counted across every process sharing it)."""
    quota = (
        _grid_size(space)
        if settings.sampler == "grid" or not space
        else (settings.n_trials or _grid_size(space))
    )
    states = (optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL)
    done = len(study.get_trials(deepcopy=False, states=states))
    if done >= quota:
        return
    stop = optuna.study.MaxTrialsCallback(quota, states=states)
    study.optimize(objective, n_trials=quota - done, callbacks=[stop], catch=(FslError,))


def _summary(optuna, study, method: str, dataset: str, shots: int) -> StudyResult:
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    best = max(complete, key=lambda t: (t.value, -t.number)) if complete else None  # first maximum wins ties
    return StudyResult(
        study.study_name,
        method,
        dataset,
        shots,
        dict(best.params) if best else {},
        best.value if best else None,
        best.user_attrs.get("test_acc") if best else None,
        len(study.trials),
    )


def optimize_in_processes(
    spec: GridSpec,
    context: SweepContext,
    settings: OptunaSettings,
    *,
    workers: int,
    on_outcome: Callable[[Outcome], None] | None = None,
) -> list[StudyResult]:
    """``workers`` processes join the same studies through the journal; this process is one of them."""
    if workers <= 1:
        return optimize(spec, context, settings, on_outcome=on_outcome)
    ctx = multiprocessing.get_context("spawn")
    args = (spec, context, settings, os.getpid())
    helpers = [ctx.Process(target=_helper, args=args) for _ in range(workers - 1)]
    for helper in helpers:
        helper.start()
    try:
        results = optimize(spec, context, settings, on_outcome=on_outcome)
    except BaseException:  # Ctrl-C, SIGTERM: the helpers stop their trials too, not after their studies
        for helper in helpers:
            helper.terminate()
        raise
    finally:
        for helper in helpers:
            helper.join()
    return [
        _summary(require_optuna(), _load(settings, r.study), r.method, r.dataset, r.shots) for r in results
    ]


def _helper(spec: GridSpec, context: SweepContext, settings: OptunaSettings, parent: int) -> None:
    die_with_parent(parent)
    try:
        with sigterm_as_interrupt():
            optimize(spec, context, settings)
    except KeyboardInterrupt:  # Terminated too: the trial has unwound and released its claims
        pass


def _load(settings: OptunaSettings, name: str):
    optuna = require_optuna()
    return optuna.load_study(study_name=name, storage=storage_for(settings.storage))
