"""Stage two end to end: store → splits → method.fit → val/test evaluation → run record.

Order matters for the protocol: the test split is built and read only in :func:`final_evaluation`,
after the method has returned its head (``--protocol coop``). Under ``--protocol paper`` a method
whose official code selects on test receives it earlier, as ``task.oracle``, and the record says so.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import UsageError
from ..evaluation.confusion import confusion_analytics, zero_shot_predictions
from ..evaluation.metrics import score
from ..evaluation.predict import evaluate, predict
from ..evaluation.protocol import (
    base_novel_classes,
    build_splits,
    check_protocol,
    harmonic_mean,
    subset_classes,
    test_split,
)
from ..methods import FitResult, FitTask, MethodInfo, TaskInfo, get_method
from ..methods.base import fit_together
from ..store.store import FeatureStore
from ..training.data import DEFAULT_MEMORY_BUDGET
from .locate import check_needs, locate_store
from .record import (
    HEAD,
    RECORD_SCHEMA,
    RunResult,
    default_runs_dir,
    load_record,
    now,
    run_dir,
    run_fingerprint,
    versions,
    write_run,
)

COOP_NOTE = (
    "CoOp/Dassl split from the store; few-shot val (min(k,4)/class) for every choice; "
    "test read once, at the end"
)
B2N_NOTE = (
    "base-to-novel (METHODS §1.5): the CoOp split restricted to the base classes (first ceil(C/2) sorted labels) "
    "for training and val; test on base and on novel classes (relabelled from 0); test_acc is their harmonic mean"
)


@dataclass(frozen=True)
class RunPlan:
    """Everything fixed for the runs of one ``fit`` call (all seeds)."""

    info: MethodInfo
    options: dict[str, Any]
    shots: int
    protocol: str
    runs_dir: Path
    force: bool
    device: torch.device
    memory_budget: int
    caveats: tuple[str, ...] = ()


def fit_runs(
    method: str,
    *,
    dataset: str,
    shots: int,
    seeds: Sequence[int] = (1, 2, 3),
    protocol: str = "coop",
    model: str = "RN50",
    pretrained: str = "openai",
    store: str | None = None,
    options: Mapping[str, Any] | None = None,
    cache_dir: str | Path | None = None,
    runs_dir: str | Path | None = None,
    force: bool = False,
    device: str = "cpu",
    memory_budget: int | None = None,
    on_run: Callable[[RunResult], None] | None = None,
) -> list[RunResult]:
    """Fit ``method`` on the store of ``dataset`` + backbone for each seed; reuse finished runs."""
    from ..extraction import default_cache_dir

    info = get_method(method)
    options = dict(options or {})
    instance = info.create(options)  # bad options fail before any store is opened
    check_protocol(protocol)
    check_base2novel(info, protocol)
    seeds = [seeds] if isinstance(seeds, (int, np.integer)) else seeds
    shots, seeds = _positive(shots, "--shots"), [_positive(s, "--seed") for s in seeds]
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    entry = locate_store(
        cache, dataset=dataset, model=model, pretrained=pretrained, store=store, method=method
    )
    fs = FeatureStore.open(entry.path)
    try:
        caveats = check_needs(
            fs,
            info,
            dataset=fs.manifest["dataset"]["name"],
            cache_dir=Path(cache_dir) if cache_dir is not None else None,
        )
        plan = RunPlan(
            info,
            options,
            shots,
            protocol,
            Path(runs_dir) if runs_dir else default_runs_dir(),
            force,
            torch.device(device),
            memory_budget or DEFAULT_MEMORY_BUDGET,
            tuple(caveats),
        )
        results = []
        for seed in seeds:
            results.append(fit_one(fs, instance, plan, seed=seed))
            if on_run is not None:
                on_run(results[-1])
        return results
    finally:
        fs.close()


def check_base2novel(info: MethodInfo, protocol: str) -> None:
    """Refuse ``--protocol base2novel`` for a method that cannot classify classes it did not train on."""
    if protocol == "base2novel" and not info.cls.base2novel:
        from ..methods import list_methods

        able = [n for n in list_methods() if get_method(n).cls.base2novel]
        raise UsageError(
            f"Method {info.name} cannot run --protocol base2novel: its head has no way to score classes "
            f"it never trained on. Methods that can: {', '.join(able)}"
        )


def _positive(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise UsageError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def task_info(fs: FeatureStore, *, shots: int, seed: int, protocol: str) -> TaskInfo:
    m = fs.manifest
    return TaskInfo(
        dataset=m["dataset"]["name"],
        classnames=tuple(m["dataset"]["classnames"]),
        shots=shots,
        seed=seed,
        protocol=protocol,
        embed_dim=int(m["backbone"]["embed_dim"]),
        backbone=m["backbone"],
        zs_scale=float(m.get("zs_scale", 100.0)),
        store_fingerprint=m["fingerprint"],
    )


def fit_one(fs: FeatureStore, instance, plan: RunPlan, *, seed: int) -> RunResult:
    """One (method, shots, seed, protocol) run: reused if its record exists, else fitted and recorded."""
    return fit_group(fs, [(instance, plan)], seed=seed)[0]


def fit_group(fs: FeatureStore, runs: Sequence[tuple[Any, RunPlan]], *, seed: int) -> list[RunResult]:
    """Runs of one method that differ only in options, on one (shots, seed, protocol): one task, one pass.

    Finished runs are reused; the others are fitted together (:func:`~fsl_cache.methods.base.fit_together`:
    lockstep training that reads each cached batch once) and each gets its own record.
    """
    first = runs[0][1]
    if any(
        (p.info.name, p.shots, p.protocol, p.device, p.memory_budget)
        != (first.info.name, first.shots, first.protocol, first.device, first.memory_budget)
        for _, p in runs
    ):
        raise ValueError("fit_group runs must share method, shots, protocol, device and memory budget")
    started = time.perf_counter()
    info = task_info(fs, shots=first.shots, seed=seed, protocol=first.protocol)
    base = base_novel_classes(info.num_classes)[0] if first.protocol == "base2novel" else None
    if base is not None:  # the method sees the base classes only (METHODS §1.5)
        info = replace(info, classnames=tuple(info.classnames[i] for i in base))
    results: list[RunResult | None] = []
    pending = []
    for instance, plan in runs:
        method = plan.info.cls(instance.resolve(info))
        key = run_fingerprint(
            store_fingerprint=fs.fingerprint,
            method=plan.info.name,
            config=method.config.to_json(),
            shots=plan.shots,
            seed=seed,
            protocol=plan.protocol,
        )
        path = run_dir(
            plan.runs_dir,
            dataset=info.dataset,
            store_dir=fs.root.name,
            method=plan.info.name,
            shots=plan.shots,
            seed=seed,
            protocol=plan.protocol,
            key=key,
        )
        existing = None if plan.force else load_record(path, key=key)
        results.append(None if existing is None else RunResult.from_record(existing, path, reused=True))
        if existing is None:
            pending.append((len(results) - 1, method, plan, key, path))
    if not pending:
        return results
    splits = build_splits(fs, first.info.cls, shots=first.shots, seed=seed, protocol=first.protocol)
    oracle = test_split(fs) if first.protocol == "paper" and first.info.cls.paper_test_oracle else None
    task = FitTask(
        fs,
        info,
        train=splits.train,
        val=splits.val,
        oracle=oracle,
        device=first.device,
        memory_budget=first.memory_budget,
        classes=base,
    )
    splits_s = time.perf_counter() - started
    fitted_all = fit_together([method for _, method, *_ in pending], task, seed=seed)
    fit_s = time.perf_counter() - started - splits_s
    for (index, method, plan, key, path), fitted in zip(pending, fitted_all):
        evaluated = time.perf_counter()
        metrics, test = final_evaluation(fitted, task, method=method)
        timings = {
            "splits_s": splits_s,
            "fit_s": fit_s,
            "eval_s": time.perf_counter() - evaluated,
            "fitted_together": len(pending),
        }
        timings["total_s"] = splits_s + fit_s + timings["eval_s"]
        record = build_record(
            fs, plan, method, task, fitted, metrics, test, key=key, timings=timings, notes=splits.notes
        )
        write_run(path, record, fitted.head.saved_state())
        results[index] = RunResult.from_record(record, path, reused=False)
    return results


def final_evaluation(fitted: FitResult, task: FitTask, method=None) -> tuple[dict, Any]:
    """Score the finished head on val, then on test (the only test read of a ``coop`` run).

    Every run also gets confusion analytics (top confused pairs, zero-shot pairs resolved) and, under
    ``base2novel``, the novel-class evaluation through ``method.novel_head``.
    """
    head, c, device = fitted.head.to(task.device), task.info.num_classes, task.device
    val = evaluate(
        head, task.views(task.val, taps=head.inputs), task.val.labels, num_classes=c, device=device
    )
    test_ref = task.oracle if task.oracle is not None else test_split(task.store)
    whole_test = test_ref
    if task.classes is not None:
        test_ref = subset_classes(test_ref, task.classes)
    logits = predict(head, task.views(test_ref, taps=head.inputs), device=device)
    test = {name: score(out, test_ref.labels, num_classes=c) for name, out in logits.items()}
    headline = next(iter(test))
    test_acc, reported_as = test[headline].top1, "final head on test"
    if task.info.protocol == "paper" and fitted.paper_test_acc is not None:
        test_acc, reported_as = fitted.paper_test_acc, "as the official code reports it (paper protocol)"
    metrics = {
        "headline": headline,
        "val_acc": val[headline].top1,
        "test_acc": test_acc,
        "test_acc_is": reported_as,
        "val": {name: m.to_json() for name, m in val.items()},
        "test": {name: m.to_json() for name, m in test.items()},
        "analytics": run_analytics(task, test_ref, logits[headline]),
    }
    if task.classes is not None:
        metrics |= novel_evaluation(method, fitted, task, whole_test, base_acc=test[headline].top1)
    return metrics, test_ref


def run_analytics(task: FitTask, split, logits) -> dict:
    """Confusion analytics of the headline logits on ``split`` against zero-shot's cached predictions."""
    zs = zero_shot_predictions(task.store, split, classes=task.classes)
    return confusion_analytics(
        logits.argmax(dim=-1),
        split.labels,
        num_classes=task.info.num_classes,
        classnames=task.info.classnames,
        zs_pred=zs,
    )


def novel_evaluation(method, fitted: FitResult, task: FitTask, whole_test, *, base_acc: float) -> dict:
    """[base2novel] Test the method on the novel classes (relabelled from 0); headline = HM of base and novel."""
    _, novel = base_novel_classes(len(task.store.manifest["dataset"]["classnames"]))
    novel_task = task.restricted(novel)
    head = method.novel_head(fitted, novel_task).to(task.device)
    ref = subset_classes(whole_test, novel)
    logits = predict(head, novel_task.views(ref, taps=head.inputs), device=task.device)
    scores = {name: score(out, ref.labels, num_classes=len(novel)) for name, out in logits.items()}
    headline = next(iter(scores))
    novel_acc = scores[headline].top1
    return {
        "base_acc": base_acc,
        "novel_acc": novel_acc,
        "hm": harmonic_mean(base_acc, novel_acc),
        "test_acc": harmonic_mean(base_acc, novel_acc),
        "test_acc_is": "harmonic mean of base and novel test accuracy (base2novel)",
        "classes": {"base": task.classes.tolist(), "novel": novel.tolist()},
        "test_novel": {name: m.to_json() for name, m in scores.items()},
        "analytics_novel": run_analytics(novel_task, ref, logits[headline]),
    }


def build_record(
    fs,
    plan: RunPlan,
    method,
    task: FitTask,
    fitted: FitResult,
    metrics: dict,
    test,
    *,
    key: str,
    timings: dict,
    notes: list[str],
) -> dict:
    m, head = fs.manifest, fitted.head
    state = head.saved_state()
    warnings = list(plan.caveats) + list(notes) + task.warnings
    if m["backbone"].get("random_init"):
        warnings.insert(0, "the backbone has RANDOM weights: numbers measure the pipeline, not CLIP")
    return jsonable(
        {
            "schema": RECORD_SCHEMA,
            "run_fingerprint": key,
            "created": now(),
            "method": plan.info.name,
            "description": plan.info.description,
            "config": method.config.to_json(),
            "options": plan.options,
            "dataset": task.info.dataset,
            "shots": plan.shots,
            "seed": task.info.seed,
            "protocol": plan.protocol,
            "protocol_notes": {"paper": plan.info.paper_protocol, "base2novel": B2N_NOTE}.get(
                plan.protocol, COOP_NOTE
            ),
            "store": {
                "fingerprint": fs.fingerprint,
                "path": str(fs.root.resolve()),
                "arch": m["backbone"]["arch"],
                "pretrained": m["backbone"]["pretrained"],
                "random_init": m["backbone"].get("random_init"),
                "precision": m.get("precision"),
                "format": m.get("format"),
            },
            "splits": {
                "train": _split_json(task.train),
                "val": _split_json(task.val),
                "test": {"pool": test.pool, "n": len(test)},
            },
            "selection": fitted.selection,
            "history": fitted.history,
            "metrics": metrics,
            "timings": {k: round(v, 4) for k, v in timings.items()},
            "device": str(task.device),
            "versions": versions(),
            "deviations": list(plan.info.deviations),
            "warnings": warnings,
            "head": {
                "file": HEAD,
                "class": type(head).__qualname__,
                "inputs": list(head.inputs),
                "tensors": {k: list(v.shape) for k, v in state.items()},
            },
        }
    )


def _split_json(split) -> dict:
    return {"pool": split.pool, "n": len(split), "split_index": split.split_index.tolist()}


def jsonable(obj: Any) -> Any:
    """Plain JSON types for a record (numpy and torch scalars, tuples, paths)."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.generic,)):
        return obj.item()
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj
