"""The trial function every sweep engine runs: one :class:`Trial` → a run record, claimed, never duplicated.

Local workers, Optuna and Ray all call :func:`run_trial` with a per-process :class:`StoreCache`, so
each process opens (and reads) a store once however many trials it runs on it.
"""

from __future__ import annotations

import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..defaults import DEFAULT_MODEL, DEFAULT_PRETRAINED, DEFAULT_PROTOCOL
from ..errors import FslError
from ..methods import get_method
from ..runs.fitting import fit_group
from ..runs.locate import check_draws, check_needs, locate_store
from ..runs.record import load_record
from ..runs.request import FitRequest, ResolvedRun, resolve_run
from ..runs.shift import Target, open_targets
from ..store.store import FeatureStore
from ..training.data import DEFAULT_MEMORY_BUDGET
from .claims import STALE_AFTER, try_claim
from .spec import Trial


@dataclass(frozen=True)
class SweepContext:
    """Settings shared by every trial of a sweep (picklable: it travels to worker processes)."""

    cache_dir: Path
    runs_dir: Path
    protocol: str = DEFAULT_PROTOCOL
    validation: str | None = None
    """The regime of every trial (``None``: the protocol's own)."""
    targets: tuple[str, ...] = ()
    """Domain-shift targets every trial's head is also tested on."""
    model: str = DEFAULT_MODEL
    pretrained: str = DEFAULT_PRETRAINED
    store: str | None = None
    """Store key or folder for every trial (single-dataset sweeps), instead of model/pretrained."""
    device: str = "cpu"
    memory_budget: int | None = None
    stale_after: float = STALE_AFTER
    group_size: int = 8
    """Trials differing only in options that train together in one pass (each batch read once for all)."""

    def request(self, trial: Trial) -> FitRequest:
        """The fit request of ``trial`` (one seed) under these settings."""
        return FitRequest(
            trial.method,
            trial.dataset,
            trial.shots,
            seeds=(trial.seed,),
            options=dict(trial.options),
            protocol=self.protocol,
            validation=self.validation,
            targets=self.targets,
            model=self.model,
            pretrained=self.pretrained,
            store=self.store,
            cache_dir=self.cache_dir,
            runs_dir=self.runs_dir,
            device=self.device,
            memory_budget=self.memory_budget,
        )


@dataclass(frozen=True)
class Outcome:
    """What became of one trial."""

    trial: Trial
    status: str
    """``done`` (fitted now), ``reused`` (its record existed), ``busy`` (another process holds its claim),
    ``failed``."""
    run_dir: Path | None = None
    val_acc: float | None = None
    test_acc: float | None = None
    seconds: float = 0.0
    error: str = ""

    def to_json(self) -> dict[str, Any]:
        t = self.trial
        return {
            "method": t.method,
            "dataset": t.dataset,
            "shots": t.shots,
            "seed": t.seed,
            "options": dict(t.options),
            "status": self.status,
            "run_dir": str(self.run_dir) if self.run_dir else None,
            "val_acc": self.val_acc,
            "test_acc": self.test_acc,
            "seconds": round(self.seconds, 3),
            "error": self.error or None,
        }


class CachedStore(FeatureStore):
    """A :class:`FeatureStore` that keeps every array it reads whole in memory (up to a byte budget)."""

    def __init__(self, root: Path, manifest: dict, *, budget: int | None = None) -> None:
        super().__init__(root, manifest)
        self.budget = DEFAULT_MEMORY_BUDGET if budget is None else budget
        self._held: dict[str, np.ndarray] = {}
        self._bytes = 0

    def read(self, name: str, rows: np.ndarray | None = None) -> np.ndarray:
        data = self._held.get(name)
        if data is None:
            entry = self.arrays.get(name, {})
            size = int(np.prod(entry.get("shape", [0]), dtype=np.int64)) * _itemsize(
                entry.get("dtype", "float32")
            )
            if self._bytes + size > self.budget:
                return super().read(name, rows)  # too big to hold: stream as usual
            data = self._held[name] = super().read(name)
            self._bytes += size
        return data.copy() if rows is None else data[np.asarray(rows, dtype=np.int64)]


def _itemsize(dtype: str) -> int:
    return 8 if dtype == "str" else np.dtype(dtype).itemsize


@dataclass
class StoreCache:
    """The stores one process has opened, by dataset, with the needs already checked per method."""

    context: SweepContext
    stores: dict[str, CachedStore] = field(default_factory=dict)
    caveats: dict[tuple[str, str, tuple], tuple[str, ...]] = field(default_factory=dict)
    shifts: dict[tuple[str, str], list[Target]] = field(default_factory=dict)

    def get(self, dataset: str, method: str, options: tuple = ()) -> tuple[CachedStore, tuple[str, ...]]:
        """The store of ``dataset``, checked for what ``method`` reads under ``options`` (sorted pairs)."""
        ctx = self.context
        if dataset not in self.stores:
            entry = locate_store(
                ctx.cache_dir,
                dataset=dataset,
                model=ctx.model,
                pretrained=ctx.pretrained,
                store=ctx.store,
                method=method,
            )
            store = CachedStore.open(entry.path)  # validates the manifest
            if ctx.memory_budget is not None:
                store.budget = ctx.memory_budget
            self.stores[dataset] = store
        store = self.stores[dataset]
        if (dataset, method, options) not in self.caveats:
            self.caveats[dataset, method, options] = tuple(
                check_needs(
                    store,
                    get_method(method),
                    dataset=store.manifest["dataset"]["name"],
                    cache_dir=ctx.cache_dir,
                    options=dict(options),
                )
            )
        return store, self.caveats[dataset, method, options]

    def targets(self, request: FitRequest, source: CachedStore) -> list[Target]:
        """The request's domain-shift targets, opened once per (dataset, method)."""
        if not request.targets:
            return []
        key = (request.dataset, request.method)
        if key not in self.shifts:
            self.shifts[key] = open_targets(request, source, opener=CachedStore.open)
        return self.shifts[key]

    def close(self) -> None:
        for store in self.stores.values():
            store.close()
        for target in (t for targets in self.shifts.values() for t in targets):
            target.store.close()
        self.stores.clear()
        self.shifts.clear()


@dataclass(frozen=True)
class Prepared:
    """A trial resolved against its store: the run's fingerprint and folder, and what ``fit_group`` needs."""

    trial: Trial
    store: CachedStore
    run: ResolvedRun
    caveats: tuple[str, ...]
    targets: tuple[Target, ...] = ()


def prepare(trial: Trial, stores: StoreCache) -> Prepared:
    """Resolve ``trial``'s config on its store and compute its run fingerprint (nothing is fitted)."""
    request = stores.context.request(trial).checked()
    store, caveats = stores.get(trial.dataset, trial.method, trial.options)
    check_draws(
        store, trial.method, shots=request.shots, seeds=(trial.seed,), cache_dir=stores.context.cache_dir
    )
    targets = tuple(stores.targets(request, store))
    run = resolve_run(request, store, seed=trial.seed, targets=targets)
    return Prepared(trial, store, run, caveats, targets)


def existing(prepared: Prepared) -> Outcome | None:
    """The trial's outcome if its record is already written."""
    record = load_record(prepared.run.path, key=prepared.run.key)
    if record is None:
        return None
    m = record["metrics"]
    return Outcome(prepared.trial, "reused", prepared.run.path, m["val_acc"], m["test_acc"])


def run_trial(trial: Trial, stores: StoreCache) -> Outcome:
    """Fit ``trial`` unless its record exists or another process has claimed it; never raises."""
    return run_group([trial], stores)[0]


def run_group(trials: Sequence[Trial], stores: StoreCache) -> list[Outcome]:
    """Fit trials that differ only in options (same dataset, method, shots, seed) in one lockstep pass.

    Each trial is reused, skipped as ``busy`` (claimed elsewhere) or claimed and fitted; the claimed
    ones train together (:func:`~fsl_cache.runs.fitting.fit_group`), and each one's ``seconds`` is an
    equal share of the group's time. Never raises: a failure fails the trials it touched.
    """
    started = time.perf_counter()
    outcomes: list[Outcome | None] = [None] * len(trials)
    claimed: list[tuple[int, Prepared, Any]] = []
    try:
        for i, trial in enumerate(trials):
            outcomes[i] = _claim_or_outcome(trial, stores, i, claimed)
        if claimed:
            _fit_claimed(claimed, outcomes, started)
    except Exception as err:  # noqa: BLE001  (one broken trial must not sink a whole sweep)
        elapsed = time.perf_counter() - started
        outcomes = [o if o is not None else _failure(err, elapsed, t) for o, t in zip(outcomes, trials)]
    finally:
        for _, _, claim in claimed:
            claim.release()
    return outcomes


def _claim_or_outcome(trial: Trial, stores: StoreCache, index: int, claimed: list) -> Outcome | None:
    """The trial's outcome if it needs no fit (reused, busy, failed to prepare); else claim it (``None``)."""
    try:
        prepared = prepare(trial, stores)
    except FslError as err:
        return _failure(err, 0.0, trial)
    if (done := existing(prepared)) is not None:
        return done
    claim = try_claim(stores.context.runs_dir, prepared.run.key, stale_after=stores.context.stale_after)
    if claim is None:
        return Outcome(trial, "busy", prepared.run.path)
    claimed.append((index, prepared, claim))
    return existing(prepared)  # finished between our look and our claim: reuse it, fit nothing


def _fit_claimed(claimed: list, outcomes: list, started: float) -> None:
    todo = [(i, p) for i, p, _ in claimed if outcomes[i] is None]
    if not todo:
        return
    first = todo[0][1]
    results = fit_group(first.store, [p.run for _, p in todo], caveats=first.caveats, targets=first.targets)
    share = (time.perf_counter() - started) / len(todo)
    for (i, p), result in zip(todo, results):
        outcomes[i] = Outcome(p.trial, "done", result.run_dir, result.val_acc, result.test_acc, share)


def _failure(err: Exception, seconds: float, trial: Trial) -> Outcome:
    if isinstance(err, FslError):
        error = str(err)
    else:
        error = f"{type(err).__name__}: {err}\n{traceback.format_exc(limit=-3)}"
    return Outcome(trial, "failed", error=error, seconds=seconds)
