"""The Python face of every command: ``fsl-cache X`` is a thin wrapper over ``fsl_cache.api.X``.

Each function imports the stages it runs when called: ``predict`` then loads only the backbone and
the head (not extraction, sweeps, reports or plotting), which is most of its start-up time.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .console import training_progress
from .defaults import (
    DEFAULT_MODEL,
    DEFAULT_PRETRAINED,
    DEFAULT_PROTOCOL,
    DEFAULT_SEEDS,
    DEFAULT_SHOTS,
    DEFAULT_VIT_BLOCKS,
)
from .errors import UsageError

if TYPE_CHECKING:
    from .extraction import ExtractResult, PreparedExtraction
    from .extraction.sizing import StoreSize
    from .store import StoreEntry, VerifyProblem
    from .store_extension import Extension


def extract(
    dataset: str,
    *,
    root: str | Path | None = None,
    model: str = DEFAULT_MODEL,
    pretrained: str = DEFAULT_PRETRAINED,
    for_methods: Sequence[str] | None = None,
    views: int | dict[str, int] | None = None,
    precision: str = "fp16",
    dense_precision: str = "same",
    format: str = "zarr",
    batch_size: int = 64,
    workers: int = 2,
    device: str = "cpu",
    cache_dir: str | Path | None = None,
    shots: Sequence[int] = DEFAULT_SHOTS,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    full_train: bool = False,
    full_val: bool = False,
    vit_blocks: Sequence[int] = DEFAULT_VIT_BLOCKS,
    skip_bad: bool = False,
    descriptions: str | Path | None = None,
    options: dict | None = None,
    on_plan: Callable[[PreparedExtraction], None] | None = None,
    progress: bool = True,
) -> ExtractResult:
    """Run the frozen backbone once over ``dataset`` and store what ``for_methods`` need (and, given a CuPL-format
    ``descriptions`` file, its per-class sentence embeddings, for APE). ``options`` are the ``-o`` method
    options the store will be fitted with, where they change what is stored (capt ``visual_depth``)."""
    from .extraction import ExtractOptions
    from .extraction import extract as _extract
    from .methods.needs import DEFAULT_FOR

    settings = ExtractOptions(
        for_methods=tuple(for_methods or DEFAULT_FOR),
        method_options=dict(options or {}),
        views=views,
        precision=precision,
        dense_precision=dense_precision,
        format=format,
        batch_size=batch_size,
        workers=workers,
        device=device,
        shots=tuple(shots),
        seeds=tuple(seeds),
        full_train=full_train,
        full_val=full_val,
        vit_blocks=tuple(vit_blocks),
        skip_bad=skip_bad,
        descriptions=descriptions,
    )
    return _extract(
        dataset,
        root=root,
        model=model,
        pretrained=pretrained,
        cache_dir=cache_dir,
        options=settings,
        on_plan=on_plan,
        progress=progress,
    )


def plan(
    datasets: Sequence[str],
    *,
    root: str | Path | None = None,
    splits_dir: str | Path | None = None,
    model: str = DEFAULT_MODEL,
    for_methods: Sequence[str] | None = None,
    views: int | dict[str, int] | None = None,
    precision: str = "fp16",
    dense_precision: str = "same",
    shots: Sequence[int] = DEFAULT_SHOTS,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    full_train: bool = False,
    full_val: bool = False,
    vit_blocks: Sequence[int] = DEFAULT_VIT_BLOCKS,
    options: dict | None = None,
) -> list[StoreSize]:
    """What ``extract`` with these settings would store per dataset (``all``: the 11 CoOp datasets),
    counted from split files (``splits_dir`` or the CoOp layout under ``root``) without an image."""
    from .datasets.catalog import DATA_ENV
    from .extraction import ExtractOptions
    from .extraction.sizing import size_stores
    from .methods.needs import DEFAULT_FOR

    settings = ExtractOptions(
        for_methods=tuple(for_methods or DEFAULT_FOR),
        method_options=dict(options or {}),
        views=views,
        precision=precision,
        dense_precision=dense_precision,
        shots=tuple(shots),
        seeds=tuple(seeds),
        full_train=full_train,
        full_val=full_val,
        vit_blocks=tuple(vit_blocks),
    )
    root = root if root is not None else os.environ.get(DATA_ENV)
    return size_stores(datasets, model=model, options=settings, root=root, splits_dir=splits_dir)


def _cache_dir(cache_dir: str | Path | None) -> Path:
    from .store.catalog import default_cache_dir
    from .store.location import as_location

    return as_location(cache_dir) if cache_dir is not None else default_cache_dir()


def cache_ls(*, cache_dir: str | Path | None = None) -> list[StoreEntry]:
    """The stores under ``cache_dir``, finished or not."""
    from .store import list_stores

    return list_stores(_cache_dir(cache_dir))


def cache_info(key: str, *, cache_dir: str | Path | None = None) -> dict:
    """The manifest of the store whose fingerprint starts with ``key``."""
    from .store import find_store
    from .store.store import FeatureStore

    entry = find_store(_cache_dir(cache_dir), key)
    store = FeatureStore.open(entry.path)
    try:
        return {"path": str(entry.path), **store.manifest}
    finally:
        store.close()


def cache_verify(key: str, *, cache_dir: str | Path | None = None, on_array=None) -> list[VerifyProblem]:
    """Re-check every block of the store against its digests; an empty list means intact."""
    from .store import find_store, verify_store

    return verify_store(find_store(_cache_dir(cache_dir), key).path, on_array=on_array)


def cache_rm(key: str, *, cache_dir: str | Path | None = None) -> Path:
    from .store import find_store, remove_store

    entry = find_store(_cache_dir(cache_dir), key)
    remove_store(entry)
    return entry.path


def fit(
    method: str,
    *,
    dataset: str,
    shots: int,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    protocol: str = DEFAULT_PROTOCOL,
    validation: str | None = None,
    targets: Sequence[str] = (),
    model: str = DEFAULT_MODEL,
    pretrained: str = DEFAULT_PRETRAINED,
    store: str | None = None,
    options: dict | None = None,
    root: str | Path | None = None,
    extract: bool = True,
    yes: bool = False,
    confirm: Callable[[str], bool] | None = None,
    cache_dir: str | Path | None = None,
    runs_dir: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
    device: str = "cpu",
    memory_budget: int | None = None,
    on_run: Callable | None = None,
) -> list:
    """Stage two: fit ``method`` on the cached features of ``dataset`` once per seed.

    The store is the one ``extract`` made for ``dataset`` with ``model``/``pretrained`` (or the one
    ``store``, a key prefix or folder, names). What the method reads and the store lacks is extracted
    first (from ``root`` for built-in datasets; a store is created if there is none), as ``extract``
    would; heavy feature maps over the threshold only with ``yes`` or a true ``confirm(question)``;
    ``extract=False`` refuses instead. ``options`` are the method's ``-o key=value`` settings.
    ``protocol="domain_shift"`` (or ``paper`` with ``targets``) also tests each head on the ``targets``.
    ``validation``: ``none``, ``kshot`` or ``full`` (``None``: the protocol's own regime, see
    :mod:`fsl_cache.splits.protocol`). A run whose fingerprint already has a record under ``runs_dir`` is
    returned without recomputing (``force=True`` redoes it). Returns one :class:`fsl_cache.runs.RunResult` per seed.
    """

    from .render import show_fit_progress
    from .runs import fit_runs
    from .runs.request import FitRequest
    from .store_extension import complete_stores

    def report(result) -> None:
        if progress:
            show_fit_progress(result)
        if on_run is not None:
            on_run(result)

    request = FitRequest(
        method,
        dataset,
        shots,
        seeds=seeds,
        options=dict(options or {}),
        protocol=protocol,
        validation=validation,
        targets=tuple(targets),
        model=model,
        pretrained=pretrained,
        store=store,
        cache_dir=_cache_dir(cache_dir) if cache_dir is not None else None,
        runs_dir=Path(runs_dir) if runs_dir is not None else None,
        force=force,
        device=device,
        memory_budget=memory_budget,
    ).checked()  # bad options fail before anything is extracted
    complete_stores(
        request.cache,
        datasets=[dataset],
        targets=request.targets,
        model=model,
        pretrained=pretrained,
        store=store,
        methods=[request.method],
        extension=_extension(root, extract=extract, yes=yes, confirm=confirm, progress=progress),
        options=request.options,
    )
    with training_progress(progress):  # step counts, estimates and progress of each run's training
        return fit_runs(request, on_run=report)


def _extension(root, *, extract: bool, yes: bool, confirm, progress: bool) -> Extension:
    from .render import show_extract_plan, show_extract_result
    from .store_extension import Extension

    return Extension(
        enabled=extract,
        root=root,
        yes=yes,
        confirm=confirm,
        on_plan=show_extract_plan if progress else None,
        on_done=show_extract_result if progress else None,
        progress=progress,
    )


def methods() -> list:
    """Every registered method (:class:`fsl_cache.methods.MethodInfo`), sorted by name."""
    from .methods import get_method, list_methods

    return [get_method(name) for name in list_methods()]


def grid(
    methods: Sequence[str] | None = None,
    *,
    datasets: Sequence[str] | None = None,
    shots: Sequence[int] = DEFAULT_SHOTS,
    seeds: Sequence[int] = DEFAULT_SEEDS,
    options: dict[str, Sequence] | None = None,
    recipe: str | Path | None = None,
    protocol: str = DEFAULT_PROTOCOL,
    validation: str | None = None,
    targets: Sequence[str] = (),
    model: str = DEFAULT_MODEL,
    pretrained: str = DEFAULT_PRETRAINED,
    store: str | None = None,
    root: str | Path | None = None,
    extract: bool = True,
    yes: bool = False,
    confirm: Callable[[str], bool] | None = None,
    workers: int = 1,
    group_size: int = 8,
    engine: str = "local",
    sampler: str = "grid",
    n_trials: int | None = None,
    study_storage: str | Path | None = None,
    cache_dir: str | Path | None = None,
    runs_dir: str | Path | None = None,
    device: str = "cpu",
    claim_stale_after: float | None = None,
    on_start: Callable[[int, int], None] | None = None,
    on_outcome: Callable | None = None,
):
    """Run every (method, options, dataset, shots, seed) of a grid, or of ``recipe`` (a pipelines/*.yaml).

    Runs whose record exists are skipped, so an interrupted grid resumes where it stopped; workers
    claim each run before fitting it, so no run is computed twice. ``options`` maps an option (or
    ``method.option``) to the list of values to sweep. Runs that differ only in options train together
    in groups of up to ``group_size`` (splits held once, streamed batches read once for the group;
    results equal to separate runs). ``engine``: ``local`` (``workers`` processes),
    ``optuna`` (studies in the journal file ``study_storage``, ``sampler`` grid or tpe, selection on
    val) or ``ray``. A run's claim whose owner stopped refreshing it for ``claim_stale_after`` seconds
    (default :data:`fsl_cache.sweeps.claims.STALE_AFTER`) is taken over, from any host. Before any
    worker starts, each store is extended once with what the grid's methods lack (as :func:`fit` does;
    ``root`` defaults to the recipe's). Returns a :class:`fsl_cache.sweeps.SweepResult`.
    """
    from .methods import get_method
    from .runs import default_runs_dir
    from .runs.request import shift_targets
    from .splits import check_protocol, check_validation
    from .store_extension import complete_stores
    from .sweeps import GridSpec, SweepContext, load_recipe, run_sweep
    from .sweeps.claims import STALE_AFTER
    from .sweeps.optuna_engine import OptunaSettings
    from .sweeps.spec import check_options

    if recipe is not None:
        spec = load_recipe(recipe)
    elif methods and datasets:
        spec = GridSpec(
            methods=tuple(methods),
            datasets=tuple(datasets),
            shots=tuple(shots),
            seeds=tuple(seeds),
            options={k: tuple(v) for k, v in (options or {}).items()},
            protocol=protocol,
            validation=validation,
            targets=tuple(targets),
            model=model,
            pretrained=pretrained,
        )
    else:
        raise UsageError("grid needs METHOD[,METHOD] and --dataset, or --recipe pipelines/NAME.yaml")
    runs = Path(runs_dir) if runs_dir is not None else default_runs_dir()
    check_protocol(spec.protocol)
    check_validation(spec.validation)
    check_options(spec)  # before any store is completed for options that turn out misspelt
    if engine == "optuna" and spec.validation == "none":
        raise UsageError("--engine optuna picks option values on val, which --validation none withholds")
    targets = shift_targets(spec.protocol, spec.targets)
    extension = _extension(root or spec.root, extract=extract, yes=yes, confirm=confirm, progress=True)
    # what a method reads can hang on its options (capt's visual_depth): one extraction serves every
    # combination the grid runs
    complete_stores(
        _cache_dir(cache_dir),
        datasets=spec.datasets,
        targets=targets,
        model=spec.model,
        pretrained=spec.pretrained,
        store=store,
        methods=[get_method(m).name for m in spec.methods],
        extension=extension,
        options=_option_sets(spec),
    )
    context = SweepContext(
        cache_dir=_cache_dir(cache_dir),
        runs_dir=runs,
        protocol=spec.protocol,
        validation=spec.validation,
        targets=targets,
        model=spec.model,
        pretrained=spec.pretrained,
        store=store,
        device=device,
        group_size=group_size,
        stale_after=STALE_AFTER if claim_stale_after is None else claim_stale_after,
    )
    settings = None
    if engine == "optuna":
        settings = OptunaSettings(
            storage=Path(study_storage) if study_storage else runs / "optuna.journal",
            sampler=sampler,
            n_trials=n_trials,
        )
    return run_sweep(
        spec,
        context,
        engine=engine,
        workers=workers,
        on_start=on_start,
        on_outcome=on_outcome,
        optuna=settings,
    )


def _option_sets(spec) -> list[dict]:
    """The distinct option combinations the grid's methods run with (an empty one if none)."""
    from .sweeps.spec import method_options

    combos = {tuple(sorted(o.items())) for m in spec.methods for o in method_options(spec, m)}
    return [dict(c) for c in sorted(combos, key=repr)] or [{}]


def report(
    *,
    runs_dir: str | Path | None = None,
    methods: Sequence[str] = (),
    datasets: Sequence[str] = (),
    shots: Sequence[int] = (),
    protocols: Sequence[str] = (),
    backbones: Sequence[str] = (),
    validations: Sequence[str] = (),
    plot_dir: str | Path | None = None,
):
    """The report table (mean ± std over seeds per method × dataset × shots, plus the dataset average)
    over the run records under ``runs_dir``, filtered; with ``plot_dir``, its PNG figures too.

    Returns ``(table, rows, plots)``: a :class:`fsl_cache.reports.ReportTable`, the records used, the PNGs written.
    """
    from .reports import Filters, build_table, load_rows
    from .reports.plots import write_plots
    from .runs import default_runs_dir

    root = Path(runs_dir) if runs_dir is not None else default_runs_dir()
    filters = Filters(
        tuple(methods), tuple(datasets), tuple(shots), tuple(protocols), tuple(backbones), tuple(validations)
    )
    rows = load_rows(root, filters)
    if not rows:
        raise UsageError(
            f"No finished runs under {root}"
            + (" match the filters" if filters != Filters() else "")
            + "; run fsl-cache fit or fsl-cache grid first"
        )
    table = build_table(rows)
    plots = []
    if plot_dir is not None:
        plots = write_plots(table, rows, plot_dir)
    return table, rows, plots


def predict(
    run: str | Path,
    images: Sequence[str | Path],
    *,
    top_k: int = 5,
    runs_dir: str | Path | None = None,
    device: str = "cpu",
) -> list:
    """Top-k classes for image files from a run (folder or fingerprint prefix) or an exported folder.

    Loads the backbone recorded with the store, refuses it if its weights or preprocessing differ,
    encodes the center view as stage one did, applies the trained head. Returns
    :class:`fsl_cache.inference.Prediction` per image.
    """
    from .inference import Predictor, find_run

    return Predictor.load(find_run(run, runs_dir=runs_dir), device=device).predict(list(images), top_k=top_k)


def export(run: str | Path, out_dir: str | Path, *, runs_dir: str | Path | None = None) -> Path:
    """Write a run's head, config, class names, templates, text weights and backbone spec to ``out_dir``,
    loadable by ``predict`` (and :class:`fsl_cache.inference.Predictor`) without the feature cache."""
    from .inference import export_bundle, find_run

    return export_bundle(find_run(run, runs_dir=runs_dir), out_dir)
