"""Stage two runs: locating the store, fitting per seed, run records that are reused by fingerprint."""

from .fitting import fit_runs
from .record import RunResult, default_runs_dir, load_head_tensors

__all__ = ["RunResult", "default_runs_dir", "fit_runs", "load_head_tensors"]
