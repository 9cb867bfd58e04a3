"""The ``fsl-cache`` command line: parse, call :mod:`fsl_cache.api`, render with rich.

Heavy imports (torch, open_clip) happen inside the commands so that ``--help`` answers at once.
Results, tables and listings go to stdout (``--json`` gives JSON lines); progress, notices and errors go to stderr.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
import sys
import warnings
from pathlib import Path

import click
from rich.markup import escape  # messages quote paths and "[path, label, classname]": never markup

from .console import err_console
from .defaults import DEFAULT_MODEL, DEFAULT_PRETRAINED, DEFAULT_SEEDS, DEFAULT_SHOTS


def _joined(values) -> str:
    return ",".join(map(str, values))


CACHE_DIR_OPTION = click.option(
    "--cache-dir",
    type=str,  # a folder or a URL (s3://bucket/prefix), which click.Path would mangle
    default=None,
    help="Root of the feature stores: a folder or a URL such as s3://bucket/prefix "
    "[default: $FSL_CACHE_DIR or ./cache].",
)

RUNS_DIR_OPTION = click.option(
    "--runs-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where run records are [default: $FSL_RUNS_DIR or ./runs].",
)


def _int_list(ctx, param, value: str | None):
    if value is None:
        return None
    try:
        return tuple(int(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"expected comma-separated integers, got '{value}'") from None


def _name_list(ctx, param, value: str | None):
    return None if value is None else tuple(v.strip() for v in value.split(",") if v.strip())


def _views(ctx, param, value: str | None):
    """``--views 10`` (every policy) or ``--views ldc=5,tip=11`` (those policies)."""
    if value is None:
        return None
    try:
        if "=" not in value:
            return int(value)
        pairs = [item.split("=") for item in value.split(",") if item.strip()]
        return {policy.strip(): int(n) for policy, n in pairs}
    except ValueError:
        raise click.BadParameter(f"expected N or POLICY=N[,POLICY=N], got '{value}'") from None


def _key_values(ctx, param, value: tuple[str, ...]) -> dict:
    options = {}
    for item in value:
        key, sep, val = item.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"expected key=value, got '{item}'")
        options[key.strip()] = val.strip()
    return options


STORED_OPTIONS = click.option(
    "-o",
    "--option",
    "options",
    multiple=True,
    callback=_key_values,
    help="Method option key=value (or method.key=value) the store will be fitted with, where it changes "
    "what is stored: capt visual_depth=9 adds the ViT input tokens. Repeatable.",
)
VIEWS_OPTION = click.option(
    "--views",
    callback=_views,
    default=None,
    help="Augmented views per train image: N for every policy, or POLICY=N[,...] (ldc=5) for some "
    "(default: what the methods need).",
)
DENSE_PRECISION_OPTION = click.option(
    "--dense-precision",
    type=click.Choice(["same", "int8"]),
    default="same",
    show_default=True,
    help="Dense maps (RN layers, ViT blocks) in --precision, or lossy int8 with per-channel scales "
    "(about half the bytes; recorded in the store key and every run record).",
)


KEPT = {
    "extract": "finished shards are kept",
    "fit": "finished runs are kept",
    "grid": "finished runs are kept and claims released",
}
"""What an interrupted command leaves behind, for the line that says how to resume it."""


ROOT_OPTION = click.option(
    "--root",
    type=click.Path(path_type=Path),
    default=None,
    help="Dataset root to extract missing arrays from [default: $FSL_DATA].",
)
TARGETS_OPTION = click.option(
    "--targets",
    callback=lambda ctx, param, value: _name_list(ctx, param, value) or (),
    help="Domain-shift targets tested with the same head [default under domain_shift: "
    "imagenet_v2,imagenet_sketch,imagenet_a,imagenet_r].",
)
VALIDATION_OPTION = click.option(
    "--validation",
    type=click.Choice(["none", "kshot", "full"]),
    default=None,
    help="Validation regime: none (no val read; each method's validation-free setting, see fsl-cache methods), "
    "kshot (the few-shot val, min(k,4)/class), full (the whole val split; the store needs --full-val) "
    "[default: kshot; under --protocol paper each method's official regime].",
)
NO_EXTRACT_OPTION = click.option(
    "--no-extract",
    is_flag=True,
    help="Refuse a store that lacks what the method reads, instead of extracting it first.",
)
YES_OPTION = click.option(
    "--yes", "-y", is_flag=True, help="Extract heavy feature maps (RN layers, ViT blocks) without asking."
)


def _confirm():
    """Ask on the terminal; without one (a pipe, CI) heavy extractions need --yes."""
    return (lambda question: click.confirm(question, err=True)) if sys.stdin.isatty() else None


class FslGroup(click.Group):
    """Turns user errors into one line on stderr with the right exit code, not a traceback.

    SIGTERM (a scheduler's preemption) stops a command like Ctrl-C does, exiting 143 instead of 130.
    """

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["argv"] = list(args)  # for the resume command: sys.argv is not ours when called from Python
        return super().parse_args(ctx, args)

    def invoke(self, ctx: click.Context):
        from .errors import FslError
        from .interrupts import Terminated, sigterm_as_interrupt

        try:
            with sigterm_as_interrupt():
                return super().invoke(ctx)
        except FslError as err:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            err_console.print(f"[bold red]error:[/] {escape(str(err))}", highlight=False, soft_wrap=True)
            sys.exit(err.exit_code)
        except KeyboardInterrupt as err:
            what = "terminated" if isinstance(err, Terminated) else "interrupted"
            kept = KEPT.get(ctx.invoked_subcommand or "", "finished work is kept")
            command = shlex.join(["fsl-cache", *ctx.meta.get("argv", [])])
            err_console.print(
                f"[yellow]{what}:[/] {kept}; re-run the same command to resume: {escape(command)}",
                highlight=False,
                soft_wrap=True,
            )
            # zarr reads the stop abandoned are garbage-collected at exit; asyncio would log each one,
            # and Python warn of each coroutine never awaited, after the line above, which must stay
            # the last thing a preempted job's log says
            logging.getLogger("asyncio").setLevel(logging.CRITICAL)
            warnings.filterwarnings("ignore", "coroutine .* was never awaited", RuntimeWarning)
            sys.exit(143 if isinstance(err, Terminated) else 130)
        except (click.ClickException, click.exceptions.Exit, click.exceptions.Abort, SystemExit):
            raise
        except OSError as err:
            if ctx.obj and ctx.obj.get("debug"):
                raise
            hint = " (disk full: free space or use another --cache-dir)" if err.errno == 28 else ""
            err_console.print(
                f"[bold red]error:[/] {escape(str(err))}{hint}", highlight=False, soft_wrap=True
            )
            sys.exit(1)


@click.group(cls=FslGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show full tracebacks.")
@click.version_option(package_name="fsl-cache")
@click.pass_context
def main(ctx: click.Context, debug: bool) -> None:
    """Few-shot adaptation of CLIP on a feature cache: extract once, fit many heads."""
    ctx.obj = {"debug": debug}


@main.command()
@click.option(
    "--dataset", required=True, help="Built-in name (eurosat, dtd, ...), imagefolder:DIR or csv:FILE."
)
@click.option(
    "--root", type=click.Path(path_type=Path), default=None, help="Dataset root [default: $FSL_DATA]."
)
@click.option(
    "--model",
    default=DEFAULT_MODEL,
    show_default=True,
    help="open_clip architecture, hf-hub:ORG/REPO or local-dir:DIR.",
)
@click.option(
    "--pretrained",
    default=DEFAULT_PRETRAINED,
    show_default=True,
    help="Pretrained tag, weights file, or 'none' (random).",
)
@click.option(
    "--for",
    "for_methods",
    callback=_name_list,
    help="Extract only what these methods need (comma-separated).",
)
@STORED_OPTIONS
@VIEWS_OPTION
@click.option("--precision", type=click.Choice(["fp16", "fp32"]), default="fp16", show_default=True)
@DENSE_PRECISION_OPTION
@click.option("--format", "fmt", type=click.Choice(["zarr", "hdf5"]), default="zarr", show_default=True)
@click.option("--batch-size", type=int, default=64, show_default=True)
@click.option("--workers", type=int, default=2, show_default=True, help="Image decoding processes.")
@click.option("--device", default="cpu", show_default=True)
@click.option(
    "--shots",
    callback=_int_list,
    default=_joined(DEFAULT_SHOTS),
    show_default=True,
    help="Few-shot sizes the train pool covers.",
)
@click.option(
    "--seeds",
    callback=_int_list,
    default=_joined(DEFAULT_SEEDS),
    show_default=True,
    help="Sampling seeds the train pool covers.",
)
@click.option(
    "--full-train", is_flag=True, help="Extract the whole train split instead of the few-shot union."
)
@click.option("--full-val", is_flag=True, help="Extract the whole val split (needed by --protocol paper).")
@click.option(
    "--vit-blocks",
    callback=_int_list,
    default="6,8,10,12",
    show_default=True,
    help="ViT blocks of the multi-level taps.",
)
@click.option("--skip-bad", is_flag=True, help="Skip unreadable images and record them in the manifest.")
@click.option(
    "--descriptions",
    type=click.Path(path_type=Path),
    default=None,
    help='Class descriptions in CuPL JSON ({"class": ["sentence", ...]}) for APE; part of the store key.',
)
@CACHE_DIR_OPTION
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object on stdout.")
def extract(
    dataset,
    root,
    model,
    pretrained,
    for_methods,
    options,
    views,
    precision,
    dense_precision,
    fmt,
    batch_size,
    workers,
    device,
    shots,
    seeds,
    full_train,
    full_val,
    vit_blocks,
    skip_bad,
    descriptions,
    cache_dir,
    as_json,
) -> None:
    """Stage one: run the frozen backbone once and store features for later fits."""
    from . import api
    from .render import show_extract_plan, show_extract_result

    result = api.extract(
        dataset,
        root=root,
        model=model,
        pretrained=pretrained,
        for_methods=for_methods,
        views=views,
        precision=precision,
        dense_precision=dense_precision,
        format=fmt,
        batch_size=batch_size,
        workers=workers,
        device=device,
        cache_dir=cache_dir,
        shots=shots,
        seeds=seeds,
        full_train=full_train,
        full_val=full_val,
        vit_blocks=vit_blocks,
        skip_bad=skip_bad,
        descriptions=descriptions,
        options=options,
        on_plan=show_extract_plan,
    )
    show_extract_result(result)
    if as_json:
        click.echo(json.dumps(result.to_json()))


@main.command()
@click.option(
    "--dataset",
    "datasets",
    required=True,
    callback=_name_list,
    help="Comma-separated: built-in names, 'all' (the 11 CoOp datasets), imagefolder:DIR or csv:FILE.",
)
@click.option(
    "--root", type=click.Path(path_type=Path), default=None, help="Dataset root [default: $FSL_DATA]."
)
@click.option(
    "--splits",
    "splits_dir",
    type=click.Path(path_type=Path),
    default=None,
    help="A folder of CoOp split_zhou_*.json files to count from (no images needed).",
)
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="open_clip architecture.")
@click.option(
    "--pretrained",
    default=DEFAULT_PRETRAINED,
    show_default=True,
    help="Accepted for symmetry with extract: sizes depend on the architecture alone.",
)
@click.option("--for", "for_methods", callback=_name_list, help="Methods the stores serve (comma-separated).")
@STORED_OPTIONS
@VIEWS_OPTION
@click.option("--precision", type=click.Choice(["fp16", "fp32"]), default="fp16", show_default=True)
@DENSE_PRECISION_OPTION
@click.option("--shots", callback=_int_list, default=_joined(DEFAULT_SHOTS), show_default=True)
@click.option("--seeds", callback=_int_list, default=_joined(DEFAULT_SEEDS), show_default=True)
@click.option("--full-train", is_flag=True, help="Size the whole train split instead of the few-shot union.")
@click.option("--full-val", is_flag=True, help="Size the whole val split.")
@click.option("--vit-blocks", callback=_int_list, default="6,8,10,12", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per dataset, then the total.")
def plan(
    datasets,
    root,
    splits_dir,
    model,
    pretrained,
    for_methods,
    options,
    views,
    precision,
    dense_precision,
    shots,
    seeds,
    full_train,
    full_val,
    vit_blocks,
    as_json,
) -> None:
    """Size the stores extract would write: arrays, images and bytes per dataset, without reading images."""
    from . import api
    from .methods.needs import DEFAULT_FOR
    from .render import plan_total, show_plan

    sizes = api.plan(
        datasets,
        root=root,
        splits_dir=splits_dir,
        model=model,
        for_methods=for_methods,
        views=views,
        precision=precision,
        dense_precision=dense_precision,
        shots=shots,
        seeds=seeds,
        full_train=full_train,
        full_val=full_val,
        vit_blocks=vit_blocks,
        options=options,
    )
    if as_json:
        for size in sizes:
            click.echo(json.dumps(size.to_json()))
        click.echo(json.dumps(plan_total(sizes)))
    else:
        show_plan(sizes, title=f"{model}/{pretrained}, for {','.join(for_methods or DEFAULT_FOR)}")


@main.group()
def cache() -> None:
    """List, inspect, verify and remove feature stores."""


@cache.command("ls")
@CACHE_DIR_OPTION
@click.option("--json", "as_json", is_flag=True)
def cache_ls(cache_dir, as_json) -> None:
    """List the stores under the cache folder."""
    from . import api
    from .render import show_store_list

    entries = api.cache_ls(cache_dir=cache_dir)
    if as_json:
        for e in entries:
            click.echo(
                json.dumps(
                    {
                        "key": e.key,
                        "path": str(e.path),
                        "dataset": e.dataset,
                        "backbone": e.backbone,
                        "precision": e.precision,
                        "format": e.format,
                        "finished": e.finished,
                        "bytes": e.bytes,
                    }
                )
            )
    else:
        show_store_list(entries)


@cache.command("info")
@click.argument("key")
@CACHE_DIR_OPTION
@click.option("--json", "as_json", is_flag=True)
def cache_info(key, cache_dir, as_json) -> None:
    """Arrays, shapes, sizes and fingerprint parts of one store (KEY: fingerprint prefix)."""
    from . import api
    from .render import show_store_info

    info = api.cache_info(key, cache_dir=cache_dir)
    if as_json:
        click.echo(json.dumps(info))
    else:
        show_store_info(info)


@cache.command("verify")
@click.argument("key")
@CACHE_DIR_OPTION
@click.option("--json", "as_json", is_flag=True)
def cache_verify(key, cache_dir, as_json) -> None:
    """Re-read every block and check it against the digests written at extraction."""
    from . import api

    problems = api.cache_verify(key, cache_dir=cache_dir)
    if as_json:
        click.echo(json.dumps({"key": key, "ok": not problems, "problems": [str(p) for p in problems]}))
    for problem in problems:
        err_console.print(f"[red]corrupt:[/] {escape(str(problem))}", highlight=False)
    if problems:
        err_console.print(f"[bold red]{len(problems)} problem(s)[/]: remove the store and extract again")
        sys.exit(1)
    err_console.print("[green]ok:[/] every block matches its digest")


@cache.command("rm")
@click.argument("key")
@CACHE_DIR_OPTION
@click.option("--yes", "-y", is_flag=True, help="Do not ask for confirmation.")
def cache_rm(key, cache_dir, yes) -> None:
    """Remove one store."""
    from . import api
    from .store import find_store
    from .store.catalog import default_cache_dir

    entry = find_store(cache_dir or default_cache_dir(), key)
    if not yes and not click.confirm(f"Remove {entry.path}?", err=True):
        sys.exit(1)
    api.cache_rm(key, cache_dir=cache_dir)
    err_console.print(f"removed {entry.path}")


@main.command()
@click.option("--json", "as_json", is_flag=True)
def datasets(as_json) -> None:
    """The built-in datasets and the directory layout each expects."""
    from .datasets import list_datasets
    from .render import show_datasets

    infos = list_datasets()
    if as_json:
        for info in infos:
            click.echo(json.dumps(info.__dict__, default=str))
    else:
        show_datasets(infos)


@main.command()
@click.option("--json", "as_json", is_flag=True)
def models(as_json) -> None:
    """Backbone architectures and their pretrained tags (open_clip) plus the tiny test models."""
    from .backbones import list_models
    from .render import show_models

    infos = list_models()
    if as_json:
        for info in infos:
            click.echo(json.dumps(info.__dict__, default=str))
    else:
        show_models(infos)


DEMO_METHODS = (
    "zero_shot",
    "linear_probe",
    "tip_adapter",
    "tip_adapter_f",
    "clip_adapter",
    "coop",
    "ldc",
    "safe",
    "safe_a",
    "capt_c",
)
"""The demo's grid (pipelines/demo.yaml describes the same one)."""
DEMO_SHOTS = (1, 2, 4, 8)
DEMO_SEEDS = (1, 2, 3)
DEMO_OPTIONS: dict[str, tuple] = {
    "tip_adapter_f.epochs": (20,),
    "clip_adapter.epochs": (50,),
    "coop.epochs": (50,),
    "ldc.epochs": (50,),
    "ldc.lr": (1e-3,),
    "capt_c.epochs": (20,),
    "safe.iterations": (400,),
    "safe.lrs": ((1e-3, 1e-4),),
    "safe.wds": ((0.0,),),
    "safe_a.iterations": (400,),
    "safe_a.lrs": ((1e-3, 1e-4),),
    "safe_a.wds": ((0.0,),),
}
"""Shorter schedules than the papers' (made for ImageNet-scale CLIPs) so the demo takes minutes on a CPU;
SAFE's learning rates and LDC's are raised to suit the tiny model. tests/test_learning_e2e.py fits
the same options."""


@main.command()
@click.option(
    "--out", type=click.Path(file_okay=False, path_type=Path), default=Path("demo_data"), show_default=True
)
@CACHE_DIR_OPTION
@RUNS_DIR_OPTION
@click.option(
    "--plot",
    "plot_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where to write the report's PNG figures [default: OUT/plots].",
)
@click.option("--json", "as_json", is_flag=True)
def demo(out, cache_dir, runs_dir, plot_dir, as_json) -> None:
    """Offline demo: generate a shifted shapes dataset, extract it with the tiny CLIP trained on the
    shapes world (--pretrained shapes), fit every method at 1-8 shots, report and plot."""
    from . import api
    from .datasets.shapes import make_shapes_dataset
    from .render import GridProgress, show_extract_plan, show_extract_result, show_grid_summary
    from .reports import format_report

    root = make_shapes_dataset(out / "shapes")
    err_console.print(f"demo dataset: {root}")
    dataset = f"imagefolder:{root}"
    result = api.extract(
        dataset,
        model="fsl-tiny-rn",
        pretrained="shapes",
        cache_dir=cache_dir,
        for_methods=DEMO_METHODS,
        shots=DEMO_SHOTS,
        batch_size=64,
        workers=min(2, os.cpu_count() or 1),
        on_plan=show_extract_plan,
    )
    show_extract_result(result)
    with GridProgress() as bar:
        sweep = api.grid(
            DEMO_METHODS,
            datasets=[dataset],
            shots=DEMO_SHOTS,
            seeds=DEMO_SEEDS,
            options=DEMO_OPTIONS,
            model="fsl-tiny-rn",
            pretrained="shapes",
            cache_dir=cache_dir,
            runs_dir=runs_dir,
            workers=min(2, os.cpu_count() or 1),
            on_start=bar.start,
            on_outcome=bar.advance,
        )
    show_grid_summary(sweep)
    table, _, plots = api.report(
        runs_dir=runs_dir,
        datasets=[dataset],
        backbones=["fsl-tiny-rn"],
        plot_dir=plot_dir or out / "plots",
    )
    if as_json:
        click.echo(json.dumps(result.to_json()))
        click.echo(format_report(table, "json"), nl=False)
    else:
        click.echo(format_report(table, "table"), nl=False)
    accuracy = [p for p in plots if p.name == "accuracy_vs_shots.png"]
    if accuracy:
        err_console.print(f"accuracy vs shots: {accuracy[0]}")
    if plots:
        err_console.print(f"figures: {', '.join(str(p) for p in plots)}")


def _seed_list(ctx, param, value: tuple[str, ...]):
    """``--seed 1 --seed 2`` or ``--seed 1,2,3``; default 1,2,3."""
    seeds = [v for item in value for v in item.split(",") if v.strip()] or [str(s) for s in DEFAULT_SEEDS]
    try:
        return tuple(int(v) for v in seeds)
    except ValueError:
        raise click.BadParameter(f"expected integers, got {', '.join(value)}") from None


@main.command()
@click.argument("method")
@click.option(
    "--dataset", required=True, help="Dataset the store was extracted from (name, imagefolder:DIR, csv:FILE)."
)
@click.option("--shots", type=int, required=True, help="Images per class (a few-shot split the store holds).")
@click.option(
    "--seed",
    "seeds",
    multiple=True,
    callback=_seed_list,
    help="Sampling seed; repeat or comma-separate [default: 1,2,3].",
)
@click.option(
    "--protocol",
    type=click.Choice(["coop", "paper", "base2novel", "domain_shift"]),
    default="coop",
    show_default=True,
    help="coop: few-shot val for every choice, test once; paper: each paper's own quirks; "
    "base2novel: train on base classes, report base, novel and their harmonic mean; "
    "domain_shift: coop on the source, then test the same head on each --targets dataset.",
)
@VALIDATION_OPTION
@TARGETS_OPTION
@click.option("--model", default=DEFAULT_MODEL, show_default=True, help="Backbone architecture of the store.")
@click.option(
    "--pretrained", default=DEFAULT_PRETRAINED, show_default=True, help="Backbone weights of the store."
)
@click.option(
    "--store", default=None, help="Store key (fingerprint prefix) or folder, instead of --model/--pretrained."
)
@click.option(
    "-o",
    "--option",
    "options",
    multiple=True,
    callback=_key_values,
    help="Method option key=value (repeatable).",
)
@ROOT_OPTION
@NO_EXTRACT_OPTION
@YES_OPTION
@CACHE_DIR_OPTION
@click.option(
    "--runs-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where run records go [default: $FSL_RUNS_DIR or ./runs].",
)
@click.option("--device", default="cpu", show_default=True)
@click.option("--force", is_flag=True, help="Recompute runs whose record already exists.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON line per run on stdout.")
def fit(
    method,
    dataset,
    shots,
    seeds,
    protocol,
    validation,
    targets,
    model,
    pretrained,
    store,
    options,
    root,
    no_extract,
    yes,
    cache_dir,
    runs_dir,
    device,
    force,
    as_json,
) -> None:
    """Stage two: fit METHOD on cached features, once per seed (`fsl-cache methods` lists them).

    What METHOD reads and the store lacks is extracted first, as `fsl-cache extract --for METHOD` would."""
    from . import api
    from .render import show_fit_results

    results = api.fit(
        method,
        dataset=dataset,
        shots=shots,
        seeds=seeds,
        protocol=protocol,
        validation=validation,
        targets=targets,
        model=model,
        pretrained=pretrained,
        store=store,
        options=options,
        root=root,
        extract=not no_extract,
        yes=yes,
        confirm=_confirm(),
        cache_dir=cache_dir,
        runs_dir=runs_dir,
        force=force,
        device=device,
        progress=not as_json,
    )
    if as_json:
        for result in results:
            click.echo(json.dumps(result.to_json()))
    else:
        show_fit_results(results)


@main.command("methods")
@click.option("--json", "as_json", is_flag=True)
def methods_(as_json) -> None:
    """The registered methods: what each reads from the store, its -o options and their defaults."""
    from . import api
    from .render import show_methods

    infos = api.methods()
    if not as_json:
        show_methods(infos)
        return
    for info in infos:
        needs = info.needs()
        click.echo(
            json.dumps(
                {
                    "name": info.name,
                    "description": info.description,
                    "trains": info.trains,
                    "needs": {
                        "eval_taps": list(needs.eval_taps),
                        "train_views": [
                            {"policy": v.policy, "views": v.views, "taps": list(v.taps)}
                            for v in needs.train_views
                        ],
                    },
                    "options": [o.__dict__ for o in info.options()],
                    "deviations": list(info.deviations),
                    "paper_protocol": info.paper_protocol,
                    "validation_free": {
                        "setting": info.validation_free.setting,
                        "options": info.validation_free.options,
                    },
                }
            )
        )


def _grid_options(ctx, param, value: tuple[str, ...]) -> dict:
    from .sweeps import parse_option_grid

    try:
        return parse_option_grid(value)
    except Exception as err:  # UsageError → click's usage message
        raise click.BadParameter(str(err)) from err


@main.command()
@click.argument("methods", required=False, callback=_name_list)
@click.option("--dataset", "datasets", callback=_name_list, help="Datasets, comma-separated (as for fit).")
@click.option("--shots", callback=_int_list, default=_joined(DEFAULT_SHOTS), show_default=True)
@click.option("--seeds", callback=_int_list, default=_joined(DEFAULT_SEEDS), show_default=True)
@click.option(
    "-o",
    "--option",
    "options",
    multiple=True,
    callback=_grid_options,
    help="Option values to sweep: key=v1,v2 or method.key=v1,v2 (repeatable; [a,b] groups a tuple value).",
)
@click.option(
    "--recipe",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="A pipelines/*.yaml recipe instead of METHODS/--dataset/--shots/--seeds/-o.",
)
@click.option(
    "--protocol", type=click.Choice(["coop", "paper", "domain_shift"]), default="coop", show_default=True
)
@VALIDATION_OPTION
@TARGETS_OPTION
@click.option(
    "--model", default=DEFAULT_MODEL, show_default=True, help="Backbone architecture of the stores."
)
@click.option(
    "--pretrained", default=DEFAULT_PRETRAINED, show_default=True, help="Backbone weights of the stores."
)
@click.option("--store", default=None, help="Store key or folder (single-dataset grids).")
@ROOT_OPTION
@NO_EXTRACT_OPTION
@YES_OPTION
@click.option(
    "--workers", type=int, default=1, show_default=True, help="Worker processes (or concurrent trials)."
)
@click.option(
    "--group-size",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Runs differing only in -o values that train together: splits held once, streamed batches read "
    "once (local engine).",
)
@click.option("--engine", type=click.Choice(["local", "optuna", "ray"]), default="local", show_default=True)
@click.option(
    "--sampler",
    type=click.Choice(["grid", "tpe"]),
    default="grid",
    show_default=True,
    help="Optuna sampler (--engine optuna).",
)
@click.option(
    "--trials", "n_trials", type=int, default=None, help="Optuna trials per study for --sampler tpe."
)
@click.option(
    "--study-storage",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Optuna journal file [default: RUNS_DIR/optuna.journal]; share it to join from other nodes.",
)
@click.option(
    "--claim-stale-after",
    type=click.FloatRange(min=1.0),
    default=120.0,
    show_default=True,
    help="Seconds without a heartbeat (one every quarter of it) after which another process's claim on a "
    "run is taken over, from any host; raise it on slow shared file systems.",
)
@CACHE_DIR_OPTION
@RUNS_DIR_OPTION
@click.option("--device", default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON line per run on stdout.")
def grid(
    methods,
    datasets,
    shots,
    seeds,
    options,
    recipe,
    protocol,
    validation,
    targets,
    model,
    pretrained,
    store,
    root,
    no_extract,
    yes,
    workers,
    group_size,
    engine,
    sampler,
    n_trials,
    study_storage,
    claim_stale_after,
    cache_dir,
    runs_dir,
    device,
    as_json,
) -> None:
    """Run METHOD[,METHOD] × datasets × shots × seeds × option values; finished runs are skipped (resumable)."""
    from . import api
    from .render import GridProgress, show_grid_summary

    with GridProgress(enabled=True) as bar:
        result = api.grid(
            methods,
            datasets=datasets,
            shots=shots,
            seeds=seeds,
            options=options,
            recipe=recipe,
            protocol=protocol,
            validation=validation,
            targets=targets,
            model=model,
            pretrained=pretrained,
            store=store,
            root=root,
            extract=not no_extract,
            yes=yes,
            confirm=_confirm(),
            workers=workers,
            group_size=group_size,
            engine=engine,
            sampler=sampler,
            n_trials=n_trials,
            study_storage=study_storage,
            cache_dir=cache_dir,
            runs_dir=runs_dir,
            device=device,
            claim_stale_after=claim_stale_after,
            on_start=bar.start,
            on_outcome=bar.advance,
        )
    show_grid_summary(result)
    if as_json:
        for outcome in result.outcomes:
            click.echo(json.dumps(outcome.to_json()))
        for study in result.studies:
            click.echo(json.dumps({"study": study.to_json()}))
    if result.count("failed"):
        sys.exit(1)


@main.command()
@click.option(
    "--method", "methods", callback=_name_list, help="Methods (or variants such as tip_adapter_f[epochs=5])."
)
@click.option("--dataset", "datasets", callback=_name_list, help="Datasets, comma-separated.")
@click.option("--shots", callback=_int_list, default=None, help="Shot counts, comma-separated.")
@click.option("--protocol", "protocols", callback=_name_list, help="coop, paper, base2novel, domain_shift.")
@click.option("--model", "backbones", callback=_name_list, help="Backbones: arch or arch/pretrained.")
@click.option(
    "--validation", "validations", callback=_name_list, help="Validation regimes: none, kshot, full."
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["table", "markdown", "csv", "latex", "json"]),
    default="table",
    show_default=True,
)
@click.option(
    "--plot",
    "plot_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Also write PNG figures here (accuracy vs shots, confusion heatmaps, confused pairs).",
)
@RUNS_DIR_OPTION
def report(methods, datasets, shots, protocols, backbones, validations, fmt, plot_dir, runs_dir) -> None:
    """The papers' table from run records: mean ± std over seeds per method × dataset × shots, and the average."""
    from . import api
    from .reports import format_report

    table, rows, plots = api.report(
        runs_dir=runs_dir,
        methods=methods or (),
        datasets=datasets or (),
        shots=shots or (),
        protocols=protocols or (),
        backbones=backbones or (),
        validations=validations or (),
        plot_dir=plot_dir,
    )
    click.echo(format_report(table, fmt), nl=False)
    err_console.print(f"{len(rows)} run(s)" + (f"; {len(plots)} figure(s) in {plot_dir}" if plots else ""))


@main.command()
@click.argument("run")
@click.argument("images", nargs=-1, required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--top-k", type=int, default=5, show_default=True)
@RUNS_DIR_OPTION
@click.option("--device", default="cpu", show_default=True)
@click.option("--json", "as_json", is_flag=True, help="One JSON line per image on stdout.")
def predict(run, images, top_k, runs_dir, device, as_json) -> None:
    """Classify IMAGES with the head of RUN (a run folder, a run key prefix, or an exported folder)."""
    from . import api
    from .render import show_predictions

    predictions = api.predict(run, images, top_k=top_k, runs_dir=runs_dir, device=device)
    if as_json:
        for p in predictions:
            click.echo(json.dumps(p.to_json()))
    else:
        show_predictions(predictions)


@main.command()
@click.argument("run")
@click.argument("out_dir", type=click.Path(file_okay=False, path_type=Path))
@RUNS_DIR_OPTION
def export(run, out_dir, runs_dir) -> None:
    """Write RUN's head, config, class names, templates and backbone spec to OUT_DIR (usable without the cache)."""
    from . import api

    out = api.export(run, out_dir, runs_dir=runs_dir)
    err_console.print(f"[green]exported:[/] {out} (fsl-cache predict {out} IMAGE...)")
    click.echo(str(out))


if __name__ == "__main__":
    main()
