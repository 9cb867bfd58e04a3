"""``grid``: expand a :class:`GridSpec` and hand it to an engine (local processes, Optuna, Ray)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import UsageError
from .local import run_local, split_done
from .optuna_engine import OptunaSettings, optimize_in_processes, require_optuna
from .ray_engine import require_ray, run_ray
from .spec import GridSpec, expand
from .trial import Outcome, StoreCache, SweepContext

ENGINES = ("local", "optuna", "ray")


@dataclass
class SweepResult:
    """Every trial's outcome, plus the best options per study for ``--engine optuna``."""

    outcomes: list[Outcome]
    studies: list = field(default_factory=list)

    def count(self, status: str) -> int:
        return sum(o.status == status for o in self.outcomes)


def run_sweep(
    spec: GridSpec,
    context: SweepContext,
    *,
    engine: str = "local",
    workers: int = 1,
    on_start: Callable[[int, int], None] | None = None,
    on_outcome: Callable[[Outcome], None] | None = None,
    optuna=None,
) -> SweepResult:
    """Run ``spec`` with ``engine``; ``optuna`` is an :class:`~.optuna_engine.OptunaSettings` for that engine."""
    if engine not in ENGINES:
        raise UsageError(f"Unknown engine '{engine}'. Available: {', '.join(ENGINES)}")
    trials = expand(spec)
    if engine == "local":
        return SweepResult(
            run_local(trials, context, workers=workers, on_outcome=on_outcome, on_start=on_start)
        )
    if engine == "ray":
        require_ray()
        stores = StoreCache(context)
        try:
            done, pending = split_done(trials, stores)
        finally:
            stores.close()
        if on_start is not None:
            on_start(len(pending), len(done))
        return SweepResult(done + run_ray(pending, context, workers=workers, on_outcome=on_outcome))
    require_optuna()
    settings = optuna or OptunaSettings(storage=Path(context.runs_dir) / "optuna.journal")
    outcomes: list[Outcome] = []

    def collect(outcome: Outcome) -> None:
        outcomes.append(outcome)
        if on_outcome is not None:
            on_outcome(outcome)

    if on_start is not None:
        on_start(len(trials), 0)
    studies = optimize_in_processes(spec, context, settings, workers=workers, on_outcome=collect)
    return SweepResult(outcomes, studies)
