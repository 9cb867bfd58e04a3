"""The local engine: trials without a record run in worker processes, each holding its stores open.

The main process resolves every trial first (run fingerprints need only store manifests), so a grid
that is already finished starts nothing, and a missing store fails before any work. Pending trials
go to ``workers`` spawned processes ordered by store; each worker reads a store once and claims
each run before fitting it (:mod:`.claims`), so two workers, or two sweeps on one runs folder,
never compute the same run. A run another one builds on (:attr:`Method.builds_on`: SAFE before the
SAFE-A runs with its stage-1 settings) goes first, and those runs start only once it is finished, so
they reuse it instead of training it again. Interrupted, the finished records stay; the same command
resumes.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

import torch

from ..errors import UsageError
from ..interrupts import Terminated, die_with_parent
from ..runs.earlier import builds_on
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
        groups, after = order_for_reuse(groups, stores)
        if workers == 1 or len(groups) <= 1:
            for group in groups:
                outcomes += _report(run_group(group, stores), on_outcome)
            return outcomes
    finally:
        stores.close()
    outcomes += _in_processes(
        groups, after, context, workers=min(workers, len(groups)), on_outcome=on_outcome
    )
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


def order_for_reuse(
    groups: list[list[Trial]], stores: StoreCache
) -> tuple[list[list[Trial]], list[set[int]]]:
    """``groups`` reordered so that every group comes after the groups holding runs it builds on, and for
    each group the positions of those (it waits for them). Otherwise the order stays as it was."""
    prepared = [[prepare(t, stores) for t in group] for group in groups]
    holder = {p.run.key: g for g, group in enumerate(prepared) for p in group}
    needs = []
    for g, group in enumerate(prepared):
        earlier = (builds_on(p.run, p.store, targets=p.targets) for p in group)
        needs.append({holder[r.key] for r in earlier if r is not None and r.key in holder} - {g})
    depth: dict[int, int] = {}

    def depth_of(g: int) -> int:
        if g not in depth:
            depth[g] = 1 + max((depth_of(n) for n in needs[g]), default=-1)
        return depth[g]

    order = sorted(range(len(groups)), key=depth_of)
    position = {g: i for i, g in enumerate(order)}
    return [groups[g] for g in order], [{position[n] for n in needs[g]} for g in order]


def _report(outcomes: list[Outcome], on_outcome: Callable[[Outcome], None] | None) -> list[Outcome]:
    if on_outcome is not None:
        for outcome in outcomes:
            on_outcome(outcome)
    return outcomes


def _in_processes(
    groups: list[list[Trial]],
    after: list[set[int]],
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
        initargs=(context, threads, os.getpid()),
    )
    outcomes = []
    waiting, done = set(range(len(groups))), set()
    try:
        futures: dict = {}
        while waiting or futures:
            ready = sorted(g for g in waiting if after[g] <= done)
            futures |= {pool.submit(_work, groups[g]): g for g in ready}
            waiting -= set(ready)
            finished, _ = wait(futures, return_when=FIRST_COMPLETED)
            for future in finished:
                done.add(futures.pop(future))
                outcomes += _report(future.result(), on_outcome)
    except BaseException:  # Ctrl-C, SIGTERM, a failing callback
        _stop_workers(pool)
        raise
    pool.shutdown(wait=True)
    return outcomes


STOP_GRACE = 10.0
"""Seconds the workers get to release their claims when the grid stops, before they are killed."""


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """Stop the runs in progress too: SIGTERM unwinds each worker's run (its claims are released),
    and nothing waits for its group to finish. A worker still alive after :data:`STOP_GRACE` is killed."""
    processes = list(pool._processes.values())  # the executor has no public handle on its workers
    for process in processes:
        if process.is_alive():
            process.terminate()
    deadline = time.monotonic() + STOP_GRACE
    for process in processes:
        process.join(max(0.0, deadline - time.monotonic()))
        if process.is_alive():
            process.kill()
    # With every worker gone, this returns at once; it joins the executor's manager thread, which
    # would otherwise race the interpreter's exit hook ("Exception ignored in ... threading").
    pool.shutdown(wait=True, cancel_futures=True)


_RUNNING = False
"""Whether this worker is running a group (a stop signal then unwinds it; idle, the worker just exits)."""


def _init_worker(context: SweepContext, threads: int, parent: int) -> None:
    global _WORKER_STORES
    die_with_parent(parent)  # a killed grid leaves no worker computing for nobody; its claims go stale
    signal.signal(signal.SIGTERM, _stop_worker)
    signal.signal(signal.SIGINT, _stop_worker)
    torch.set_num_threads(threads)
    _WORKER_STORES = StoreCache(context)


def _stop_worker(signum, frame) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # once: Ctrl-C reaches a worker directly and via the grid
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if not _RUNNING:
        os._exit(0)  # waiting for work: nothing to release, and raising here would print a traceback
    raise Terminated if signum == signal.SIGTERM else KeyboardInterrupt


def _work(group: list[Trial]) -> list[Outcome]:
    global _RUNNING
    assert _WORKER_STORES is not None, "worker not initialised"
    _RUNNING = True
    try:
        return run_group(group, _WORKER_STORES)
    except KeyboardInterrupt:  # Terminated too: the group has unwound and released its claims
        # Exit now: the grid is stopping, yet the executor would hand this worker the group it queued
        # ahead, and a normal interpreter exit takes seconds with torch loaded.
        os._exit(0)
    finally:
        _RUNNING = False
