"""Sweeps: grids of stage-two runs (local worker processes, Optuna, Ray Tune) and their recipes."""

from .claims import Claim, try_claim
from .recipe import load_recipe
from .spec import GridSpec, Trial, expand, parse_option_grid
from .sweep import ENGINES, SweepResult, run_sweep
from .trial import Outcome, SweepContext, run_trial

__all__ = [
    "ENGINES",
    "Claim",
    "GridSpec",
    "Outcome",
    "SweepContext",
    "SweepResult",
    "Trial",
    "expand",
    "load_recipe",
    "parse_option_grid",
    "run_sweep",
    "run_trial",
    "try_claim",
]
