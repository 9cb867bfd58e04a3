"""``fit`` and ``grid`` finish the stores they read: what the methods lack is extracted as ``extract`` would.

Stage one is additive and resumable, so a store that lacks arrays gets exactly those, extracted with the
settings that made it (its key) through the same plan table, disk check, runner and progress bar as
``extract``; a dataset without a store gets one. Heavy feature maps above
:data:`~fsl_cache.defaults.CONFIRM_EXTRACT_BYTES` are extracted only once accepted (``--yes``, or a yes
at the prompt when stdin is a terminal). Where the images or weights are not there, the fit refuses
with the message it gave before (what is missing and the extract command), plus the reason.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .defaults import CONFIRM_EXTRACT_BYTES
from .errors import FslError, NoStoreError, UsageError
from .extraction import ExtractOptions, ExtractResult, PreparedExtraction
from .extraction import extract as _extract
from .extraction.pipeline import OptionSets, option_sets
from .extraction.plan import human_bytes
from .methods import get_method
from .runs.locate import extract_settings, lacks_error, locate_store, missing_arrays
from .store.store import FeatureStore, read_manifest

HEAVY_TAPS = ("rn/layer", "vit/block", "vit/tokens", "dense")
"""How the per-image feature maps that make a store large are named (after ``views/<policy>/``)."""


@dataclass(frozen=True)
class Extension:
    """Whether and how ``fit``/``grid`` may run stage one for what their stores lack."""

    enabled: bool = True
    """``False`` (``--no-extract``): refuse a store that lacks arrays, naming the extract command."""
    root: str | Path | None = None
    """Root of the built-in datasets (``None``: ``$FSL_DATA``)."""
    yes: bool = False
    """Accept heavy feature maps without asking (``--yes``)."""
    confirm: Callable[[str], bool] | None = None
    """Asks the user (the CLI passes one when stdin is a terminal); ``None``: refuse unless ``yes``."""
    on_plan: Callable[[PreparedExtraction], None] | None = None
    """Shows the plan (the CLI: the table ``extract`` prints)."""
    on_done: Callable[[ExtractResult], None] | None = None
    progress: bool = True


def complete_stores(
    cache_dir: Path,
    *,
    datasets: Sequence[str],
    targets: Sequence[str] = (),
    model: str,
    pretrained: str,
    store: str | None,
    methods: Sequence[str],
    extension: Extension,
    options: OptionSets = None,
) -> None:
    """Complete the stores of ``datasets`` for ``methods`` (run with the ``-o`` ``options``: one set, or each
    of several, as a grid runs them, so that one extraction serves them all), then the test
    views of the domain-shift ``targets`` (extracted with the backbone of the first dataset's store)."""
    if not extension.enabled:
        return
    for dataset in datasets:
        complete_store(
            cache_dir,
            dataset=dataset,
            model=model,
            pretrained=pretrained,
            store=store,
            methods=methods,
            extension=extension,
            options=options,
        )
    if not targets:
        return
    source = locate_store(
        cache_dir, dataset=datasets[0], model=model, pretrained=pretrained, store=store, method=methods[0]
    )
    bb = read_manifest(source.path)["backbone"]
    for target in targets:
        complete_store(
            cache_dir,
            dataset=target,
            model=bb["arch"],
            pretrained=str(bb["pretrained"]),
            store=None,
            methods=methods,
            extension=extension,
            eval_only=True,
        )


def complete_store(
    cache_dir: Path,
    *,
    dataset: str,
    model: str,
    pretrained: str,
    store: str | None,
    methods: Sequence[str],
    extension: Extension,
    eval_only: bool = False,
    options: OptionSets = None,
) -> ExtractResult | None:
    """Add what ``methods`` read to the store of ``dataset`` (creating it if there is none).

    ``eval_only``: only the test views the methods are scored on (a domain-shift target). Returns the
    extraction's result, or ``None`` when the store already held everything.
    """
    try:
        entry = locate_store(
            cache_dir, dataset=dataset, model=model, pretrained=pretrained, store=store, method=methods[0]
        )
    except NoStoreError as refusal:
        settings = {"dataset": dataset, "model": model, "pretrained": pretrained}
        return _extend(
            cache_dir, settings, methods, key=None, refusal=refusal, extension=extension, options=options
        )
    fs = FeatureStore.open(entry.path)
    try:
        name = fs.manifest["dataset"]["name"]
        lacking = {
            m: [
                a
                for o in option_sets(options)
                for a in missing_arrays(fs, get_method(m), dataset=name, eval_only=eval_only, options=o)
            ]
            for m in methods
        }
        wanting = [m for m, missing in lacking.items() if missing]
        if not wanting:
            return None
        missing = [a for m in wanting for a in lacking[m]]
        refusal = lacks_error(fs, ",".join(wanting), list(dict.fromkeys(missing)), cache_dir=cache_dir)
        settings, key = extract_settings(fs.manifest), fs.fingerprint
    finally:
        fs.close()
    # into the store's own cache root: a --store folder may lie outside cache_dir
    return _extend(
        entry.path.parents[1],
        settings,
        wanting,
        key=key,
        refusal=refusal,
        extension=extension,
        options=options,
    )


def _extend(
    cache_dir: Path,
    settings: dict,
    methods: Sequence[str],
    *,
    key: str | None,
    refusal: FslError,
    extension: Extension,
    options: OptionSets = None,
) -> ExtractResult:
    settings = dict(settings)
    dataset, model, pretrained = settings.pop("dataset"), settings.pop("model"), settings.pop("pretrained")
    planned = []

    def before_writing(prepared: PreparedExtraction) -> None:
        planned.append(prepared)
        if key is not None and prepared.key != key:
            raise type(refusal)(
                f"{refusal} (fit cannot add it: the dataset or backbone no longer hashes to this store's key)"
            )
        if extension.on_plan is not None:
            extension.on_plan(prepared)
        _accept_heavy(prepared, extension)

    try:
        result = _extract(
            dataset,
            root=extension.root,
            model=model,
            pretrained=pretrained,
            cache_dir=cache_dir,
            options=ExtractOptions(
                for_methods=tuple(methods), method_options=option_sets(options), **settings
            ),
            on_plan=before_writing,
            progress=extension.progress,
        )
    except FslError as err:
        if planned:  # the plan was made: its own errors (disk, refusal, images) say it best
            raise
        # no images or weights here: the refusal of --no-extract, and why fit could not do it itself
        raise type(refusal)(f"{refusal} (fit cannot add it here: {err})") from err
    if extension.on_done is not None:
        extension.on_done(result)
    return result


def _accept_heavy(prepared: PreparedExtraction, extension: Extension) -> None:
    """Refuse heavy feature maps over the threshold unless ``--yes`` or the user says yes at the prompt."""
    heavy = [a for a in prepared.plan.new_arrays if _is_heavy(a.name)]
    size = sum(a.nbytes for a in heavy)
    if size <= CONFIRM_EXTRACT_BYTES or extension.yes:
        return
    question = f"Extract {human_bytes(size)} of feature maps ({len(heavy)} arrays) into {prepared.store_dir}?"
    if extension.confirm is not None and extension.confirm(question):
        return
    raise UsageError(
        f"Not extracting {human_bytes(size)} of feature maps into {prepared.store_dir}: pass --yes to accept "
        "(or --no-extract to fit only what the store holds)"
    )


def _is_heavy(name: str) -> bool:
    tap = name.split("/views/", 1)[1].split("/", 1)[1] if "/views/" in name else ""
    return tap.startswith(HEAVY_TAPS)
