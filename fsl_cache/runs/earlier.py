"""Finished runs a fit may start from: the run of another method and config on the very same task.

A method that begins with another one (SAFE-A begins with SAFE, :attr:`Method.builds_on`) asks
``task.earlier_run(method, config)``; this finds the run by the fingerprint ``fit`` itself would give
it, so only a run with the same store, resolved config, shots, seed, protocol, targets and code
version qualifies, and then only if it ran on the same device with the same library versions (which
can change its numbers). Anything else, or a forced fit: ``None``, and the method trains that part
itself. ``grid`` uses :func:`builds_on` to run the earlier run first.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace

import torch

from ..methods import MethodConfig
from ..store.store import FeatureStore
from ..training import EarlierRun
from .record import load_head_tensors, load_record, versions
from .request import FitRequest, ResolvedRun, resolve_run


def run_of(
    request: FitRequest,
    fs: FeatureStore,
    method: str,
    config: MethodConfig,
    *,
    seed: int,
    targets: Sequence = (),
) -> ResolvedRun | None:
    """The run of ``method`` with resolved ``config`` beside ``request``'s (``None``: the options resolve
    to another config, so no run has exactly this one)."""
    asked = replace(request, method=method, options=config.to_json(), force=False)
    run = resolve_run(asked, fs, seed=seed, targets=targets)
    return run if run.method.config == config else None


def builds_on(run: ResolvedRun, fs: FeatureStore, *, targets: Sequence = ()) -> ResolvedRun | None:
    """The run that ``run``'s fit starts from once it is finished (``None``: its method builds on none)."""
    config = run.method.earlier_config()
    if config is None:
        return None
    return run_of(run.request, fs, run.info.cls.builds_on, config, seed=run.seed, targets=targets)


def earlier_runs(
    request: FitRequest, fs: FeatureStore, *, seed: int, targets: Sequence = ()
) -> Callable[[str, MethodConfig], EarlierRun | None]:
    """``find(method, config)``: the finished run of ``method`` with resolved ``config`` next to ``request``'s."""

    def find(method: str, config: MethodConfig) -> EarlierRun | None:
        if request.force:  # asked to fit again: every part of it
            return None
        run = run_of(request, fs, method, config, seed=seed, targets=targets)
        record = None if run is None else load_record(run.path, key=run.key)
        if record is None:
            return None
        if record.get("device") != str(torch.device(request.device)) or record.get("versions") != versions():
            return None
        return EarlierRun(run.path, run.key, record, load_head_tensors(run.path))

    return find
