"""Stage two end to end: store → splits → method.fit → val/test evaluation → run record.

Order matters for the protocol: the test split is built and read only in :func:`final_evaluation`,
after the method has returned its head (``--protocol coop``). Under ``--protocol paper`` a method
whose official code selects on test receives it earlier, as ``task.oracle``, and the record says so.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import check_writable_folder
from ..evaluation.confusion import confusion_analytics, zero_shot_predictions
from ..evaluation.metrics import score
from ..evaluation.scoring import evaluate, predict
from ..methods import FitResult, FitTask, get_method
from ..methods.base import fit_together
from ..methods.needs import Needs
from ..splits import base_novel_classes, build_splits, harmonic_mean, subset_classes, test_split
from ..store.store import FeatureStore
from .earlier import earlier_runs
from .locate import check_draws, check_needs, locate_store
from .record import HEAD, RECORD_SCHEMA, RunResult, load_record, now, versions, write_run
from .request import FitRequest, ResolvedRun, resolve_run, task_info
from .shift import Target, open_targets, target_evaluation

COOP_NOTE = (
    "CoOp/Dassl split from the store; few-shot val (min(k,4)/class) for every choice; "
    "test read once, at the end"
)
VALIDATION_NOTES = {
    "none": "--validation none: no val split is read, not even to score the finished head",
    "full": "--validation full: every choice is made on the whole val split",
}
OLD_SCALE_NOTE = "100 (the constant stores used before they read the checkpoint's logit_scale)"
SHIFT_NOTE = (
    "domain shift: the same head is then tested on each target's test split, its logits restricted to the "
    "target's classes (ImageNet-A/-R: their 200-class subsets, as in CoOp)"
)
B2N_NOTE = (
    "base-to-novel (METHODS §1.5): the CoOp split restricted to the base classes (first ceil(C/2) sorted labels) "
    "for training and val; test on base and on novel classes (relabelled from 0); test_acc is their harmonic mean"
)


def fit_runs(request: FitRequest, *, on_run: Callable[[RunResult], None] | None = None) -> list[RunResult]:
    """Fit ``request`` on its store once per seed; finished runs are reused, not recomputed."""
    request = request.checked()
    entry = locate_store(
        request.cache,
        dataset=request.dataset,
        model=request.model,
        pretrained=request.pretrained,
        store=request.store,
        method=request.method,
    )
    fs = FeatureStore.open(entry.path)
    targets: list[Target] = []
    try:
        caveats = check_needs(
            fs,
            get_method(request.method),
            dataset=fs.manifest["dataset"]["name"],
            cache_dir=request.cache_dir,
            options=request.options,
        )
        check_draws(fs, request.method, shots=request.shots, seeds=request.seeds, cache_dir=request.cache_dir)
        check_writable_folder(request.runs, what="the runs folder (--runs-dir)")
        targets = open_targets(request, fs)
        results = []
        for seed in request.seeds:
            run = resolve_run(request, fs, seed=seed, targets=targets)
            results.append(fit_group(fs, [run], caveats=caveats, targets=targets)[0])
            if on_run is not None:
                on_run(results[-1])
        return results
    finally:
        for target in targets:
            target.store.close()
        fs.close()


def fit_group(
    fs: FeatureStore,
    runs: Sequence[ResolvedRun],
    *,
    caveats: Sequence[str] = (),
    targets: Sequence[Target] = (),
) -> list[RunResult]:
    """Runs of one method that differ only in options, on one (shots, seed, protocol): one task, one pass.

    Finished runs are reused; the others are fitted together (:func:`~fsl_cache.methods.base.fit_together`:
    lockstep training that reads each cached batch once) and each gets its own record. ``targets``: the
    domain-shift targets each finished head is also tested on.
    """
    first = runs[0]
    shared = ("method", "shots", "protocol", "validation", "device", "budget")
    if any(
        [getattr(r.request, k) for k in shared] != [getattr(first.request, k) for k in shared]
        or r.seed != first.seed
        for r in runs
    ):
        raise ValueError(
            "fit_group runs must share method, shots, seed, protocol, validation, device and memory budget"
        )
    started = time.perf_counter()
    request, seed = first.request, first.seed
    results: list[RunResult | None] = []
    pending = []
    for run in runs:
        existing = None if run.request.force else load_record(run.path, key=run.key)
        results.append(None if existing is None else RunResult.from_record(existing, run.path, reused=True))
        if existing is None:
            pending.append((len(results) - 1, run))
    if not pending:
        return results
    cls = first.info.cls
    splits = build_splits(
        fs, cls, shots=request.shots, seed=seed, protocol=request.protocol, validation=first.validation
    )
    # an explicit --validation replaces the paper regime's test-set selection too
    paper_regime = request.protocol == "paper" and request.validation is None
    oracle = test_split(fs) if paper_regime and cls.paper_test_oracle else None
    info = task_info(fs, shots=request.shots, seed=seed, protocol=request.protocol)
    base = (
        base_novel_classes(len(fs.manifest["dataset"]["classnames"]))[0]
        if request.protocol == "base2novel"
        else None
    )
    task = FitTask(
        fs,
        info,
        train=splits.train,
        val=splits.val,
        oracle=oracle,
        device=torch.device(request.device),
        memory_budget=request.budget,
        classes=base,
        view_counts=declared_views(cls.needs(fs.manifest["dataset"]["name"], dict(request.options))),
    )
    task.find_run = earlier_runs(request, fs, seed=seed, targets=targets)
    splits_s = time.perf_counter() - started
    fitted_all = fit_together([run.method for _, run in pending], task, seed=seed)
    fit_s = time.perf_counter() - started - splits_s
    for (index, run), fitted in zip(pending, fitted_all):
        evaluated = time.perf_counter()
        metrics, test = final_evaluation(fitted, task, method=run.method, targets=targets)
        timings = {
            "splits_s": splits_s,
            "fit_s": fit_s,
            "eval_s": time.perf_counter() - evaluated,
            "fitted_together": len(pending),
        }
        timings["total_s"] = splits_s + fit_s + timings["eval_s"]
        record = build_record(
            fs,
            run,
            task,
            fitted,
            metrics,
            test,
            timings=timings,
            notes=list(caveats) + splits.notes,
            validation=splits.validation,
        )
        write_run(run.path, record, fitted.head.saved_state())
        results[index] = RunResult.from_record(record, run.path, reused=False)
    return results


def final_evaluation(
    fitted: FitResult, task: FitTask, method=None, targets: Sequence[Target] = ()
) -> tuple[dict, Any]:
    """Score the finished head on val, then on test (the only test read of a ``coop`` run).

    Every run also gets confusion analytics (top confused pairs, zero-shot pairs resolved), under
    ``base2novel`` the novel-class evaluation through ``method.novel_head``, and with domain-shift
    ``targets`` the head's accuracy on each target's test split (``metrics["targets"]``).
    """
    head, c, device = fitted.head.to(task.device), task.info.num_classes, task.device
    val = (  # --validation none: not even scored after the fit
        evaluate(head, task.views(task.val, taps=head.inputs), task.val.labels, num_classes=c, device=device)
        if task.has_val
        else {}
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
        "val_acc": val[headline].top1 if val else None,
        "test_acc": test_acc,
        "test_acc_is": reported_as,
        "val": {name: m.to_json() for name, m in val.items()},
        "test": {name: m.to_json() for name, m in test.items()},
        "analytics": run_analytics(task, test_ref, logits[headline]),
    }
    if task.classes is not None:
        metrics |= novel_evaluation(method, fitted, task, whole_test, base_acc=test[headline].top1)
    if targets:
        metrics["targets"] = target_evaluation(head, targets, device=device, memory_budget=task.memory_budget)
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
    run: ResolvedRun,
    task: FitTask,
    fitted: FitResult,
    metrics: dict,
    test,
    *,
    timings: dict,
    notes: list[str],
    validation: str = "kshot",
) -> dict:
    m, head, info, request = fs.manifest, fitted.head, run.info, run.request
    state = head.saved_state()
    warnings = list(notes) + task.warnings
    if m["backbone"].get("random_init"):
        warnings.insert(0, "the backbone has RANDOM weights: numbers measure the pipeline, not CLIP")
    return jsonable(
        {
            "schema": RECORD_SCHEMA,
            "run_fingerprint": run.key,
            "created": now(),
            "method": info.name,
            "description": info.description,
            "config": run.method.config.to_json(),
            "options": dict(request.options),
            "dataset": task.info.dataset,
            "shots": request.shots,
            "seed": task.info.seed,
            "protocol": request.protocol,
            "validation": validation,
            **({"validation_free": info.cls.validation_free.setting} if validation == "none" else {}),
            "protocol_notes": {"paper": info.paper_protocol, "base2novel": B2N_NOTE}.get(
                request.protocol, COOP_NOTE
            )
            + (f"; {SHIFT_NOTE}" if request.targets else "")
            + (f"; {VALIDATION_NOTES[validation]}" if validation in VALIDATION_NOTES else ""),
            "targets": list(request.targets),
            "store": {
                "fingerprint": fs.fingerprint,
                "path": str(fs.root.resolve()),
                "arch": m["backbone"]["arch"],
                "pretrained": m["backbone"]["pretrained"],
                "random_init": m["backbone"].get("random_init"),
                "precision": m.get("precision"),
                "format": m.get("format"),
                # what the store key holds beyond the backbone: a smaller store says so in every run
                "few_shot": m.get("few_shot"),
                "views": m.get("fingerprint_parts", {}).get("views"),
                "dense_precision": m.get("fingerprint_parts", {}).get("dense_precision", "same"),
            },
            "splits": {
                "train": _split_json(task.train),
                "val": _split_json(task.val) if task.has_val else None,
                "test": {"pool": test.pool, "n": len(test)},
            },
            # every scaled CLIP logit of the run (zero-shot, Tip's and LDC's ZS branch, CoOp) uses it
            "logit_scale": {"value": task.info.zs_scale, "from": m.get("zs_scale_from", OLD_SCALE_NOTE)},
            "selection": fitted.selection,
            "history": fitted.history,
            "metrics": metrics,
            "timings": {k: round(v, 4) for k, v in timings.items()},
            "device": str(task.device),
            "versions": versions(),
            "deviations": list(info.deviations),
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


def declared_views(needs: Needs) -> dict[str, int]:
    """Views per train image a method reads under each policy (the most any of its needs asks for)."""
    counts: dict[str, int] = {}
    for need in needs.train_views:
        counts[need.policy] = max(counts.get(need.policy, 0), need.views)
    return counts
