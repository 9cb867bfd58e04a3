"""The local engine: trials without a record run in worker processes, each holding its stores open.

The main process resolves every trial first (run fingerprints need only store manifests), so a grid
that is already finished starts nothing, and a missing store fails before any work. Pending trials
go to ``workers`` spawned processes ordered by store; each worker reads a store once and claims
each run before fitting it (:mod:`.claims`), so two workers, or two sweeps on one runs folder,
never compute the same run. Interrupted, the finished records stay; the same command resumes.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

import torch

from ..errors import UsageError
from .spec import Trial
from .trial import Outcome, StoreCache, SweepContext, existing, prepare, run_group

_WORKER_STORES: StoreCache | None = None


def split_done(trials: Sequence[Trial], stores: StoreCache) -> tuple[list[Outcome], list[Trial]]:
    """(outcomes of trials whose record exists, trials still to run); missing stores fail at once, all listed."""
    done, pending, missing = [], [], {}
    for trial in trials:
        try:
            prepared = prepare(trial, stores)
        except UsageError as err:
            if "No feature store" not in str(err):
                raise
            missing.setdefault(trial.dataset, str(err))
            continue
        outcome = existing(prepared)
        done.append(outcome) if outcome is not None else pending.append(trial)
    if missing:
        raise UsageError(" | ".join(missing.values()))
    return done, pending


def run_local(
    trials: Sequence[Trial],
    context: SweepContext,
    *,
    workers: int = 1,
    on_outcome: Callable[[Outcome], None] | None = None,
    on_start: Callable[[int, int], None] | None = None,
) -> list[Outcome]:
    """Run ``trials`` (skipping finished ones) on ``workers`` processes; ``on_start(pending, reused)`` first."""
    if workers < 1:
        raise UsageError(f"--workers must be >= 1, got {workers}")
    stores = StoreCache(context)
    try:
        outcomes, pending = split_done(trials, stores)
        if on_start is not None:
            on_start(len(pending), len(outcomes))
        # groups no larger than needed to keep every worker busy
        groups = group_trials(pending, size=min(context.group_size, -(-len(pending) // workers)))
        if workers == 1 or len(groups) <= 1:
            for group in groups:
                outcomes += _report(run_group(group, stores), on_outcome)
            return outcomes
    finally:
        stores.close()
    outcomes += _in_processes(groups, context, workers=min(workers, len(groups)), on_outcome=on_outcome)
    return outcomes


def group_trials(trials: Sequence[Trial], *, size: int) -> list[list[Trial]]:
    """Trials that differ only in options, in groups of at most ``size`` that train in one pass.

    Ordered by store, so a worker's consecutive groups share the store it has open.
    """
    by_task: dict[tuple, list[Trial]] = {}
    for trial in trials:
        by_task.setdefault((trial.dataset, trial.method, trial.shots, trial.seed), []).append(trial)
    ordered = sorted(by_task.items(), key=lambda item: item[0][:2])
    return [same[i : i + max(size, 1)] for _, same in ordered for i in range(0, len(same), max(size, 1))]


def _report(outcomes: list[Outcome], on_outcome: Callable[[Outcome], None] | None) -> list[Outcome]:
    if on_outcome is not None:
        for outcome in outcomes:
            on_outcome(outcome)
    return outcomes


def _in_processes(
    groups: list[list[Trial]],
    context: SweepContext,
    *,
    workers: int,
    on_outcome: Callable[[Outcome], None] | None,
) -> list[Outcome]:
    # spawn, not fork: a forked torch process can deadlock on the parent's OpenMP state
    threads = max(1, (os.cpu_count() or 1) // workers)
    pool = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),
        initializer=_init_worker,
        initargs=(context, threads),
    )
    outcomes = []
    try:
        futures = {pool.submit(_work, group) for group in groups}
        while futures:
            finished, futures = wait(futures, return_when=FIRST_COMPLETED)
            for future in finished:
                outcomes += _report(future.result(), on_outcome)
    except BaseException:
        pool.shutdown(
            wait=False, cancel_futures=True
        )  # claims of killed workers go stale; records stay whole
        raise
    pool.shutdown(wait=True)
    return outcomes


def _init_worker(context: SweepContext, threads: int) -> None:
    global _WORKER_STORES
    torch.set_num_threads(threads)
    _WORKER_STORES = StoreCache(context)


def _work(group: list[Trial]) -> list[Outcome]:
    assert _WORKER_STORES is not None, "worker not initialised"
    return run_group(group, _WORKER_STORES)
