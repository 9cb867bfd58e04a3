"""Rich rendering for people: results, tables and listings on stdout (pipeable), notices on stderr;
machines get ``--json`` on stdout instead."""

from __future__ import annotations

from rich.panel import Panel
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from .console import PlainProgress, err_console, human_bytes, out_console
from .store.location import is_remote


def show_backbone_notice(arch: str, pretrained: str, random_init: bool, notes=()) -> None:
    if random_init:
        err_console.print(
            Panel(
                f"[bold]{arch}[/] has RANDOM weights (--pretrained none). Features carry no semantics: "
                "results measure the pipeline, not CLIP.",
                title="not pretrained",
                border_style="yellow",
            )
        )
    else:
        err_console.print(f"backbone: [bold]{arch}[/] pretrained [bold]{pretrained}[/]")
    for note in notes:
        err_console.print(f"[yellow]note:[/] {note}")


def show_extract_plan(prepared) -> None:
    bb = prepared.backbone
    show_backbone_notice(bb.arch, bb.pretrained, bb.random_init, bb.notes)
    err_console.print(f"dataset: [bold]{prepared.spec.name}[/] ({prepared.spec.num_classes} classes)")
    err_console.print(f"store:   {prepared.store_dir}")
    rows = prepared.summary_rows()
    if not rows:
        err_console.print("[green]nothing to do:[/] the store already holds everything asked for")
        return
    table = Table(title="to write", title_justify="left", show_edge=False)
    for col in ("pool/policy", "views", "arrays", "on disk"):
        table.add_column(col, justify="right" if col in ("views", "on disk") else "left")
    for group, views, taps, size in rows:
        table.add_row(group, views, taps, human_bytes(size))
    table.add_row(
        "[bold]total[/]",
        "",
        f"{len(prepared.plan.new_arrays)} arrays, {human_bytes(prepared.plan.new_bytes)} of data",
        f"[bold]{human_bytes(prepared.disk_bytes)}[/]",
    )
    err_console.print(table)
    if is_remote(prepared.store_dir):
        err_console.print("free space: not checked (the store is on object storage)")


def plan_total(sizes) -> dict:
    """The sum of ``fsl-cache plan``'s rows over the datasets it could count (estimated ones included)."""
    counted = [s for s in sizes if not s.missing]
    return {
        "dataset": "total",
        "datasets": len(counted),
        "missing": [s.dataset for s in sizes if s.missing],
        "estimated": [s.dataset for s in sizes if s.estimated],
        "images": sum(sum(s.pools.values()) for s in counted),
        "encoded": sum(s.encoded for s in counted),
        "arrays": sum(s.arrays for s in counted),
        "raw_bytes": sum(s.raw_bytes for s in counted),
        "expected_bytes": sum(s.expected_bytes for s in counted),
    }


def show_plan(sizes, *, title: str) -> None:
    table = Table(title=title, title_justify="left", show_edge=False)
    for col in ("dataset", "classes", "test", "train", "val", "encoded", "arrays", "raw", "expected"):
        table.add_column(col, justify="left" if col == "dataset" else "right")
    for s in sizes:
        if s.missing:
            table.add_row(s.dataset, f"[yellow]{s.source.split(';')[0]}[/]", *[""] * 7)
            continue
        pools = {name.split("_")[0]: n for name, n in s.pools.items()}
        table.add_row(
            s.dataset + (" *" if s.estimated else ""),
            str(s.classes),
            *(f"{pools[p]:,}" if p in pools else "-" for p in ("test", "train", "val")),
            f"{s.encoded:,}",
            str(s.arrays),
            human_bytes(s.raw_bytes),
            human_bytes(s.expected_bytes),
        )
    total = plan_total(sizes)
    table.add_row(
        "[bold]total[/]",
        "",
        "",
        "",
        "",
        f"{total['encoded']:,}",
        str(total["arrays"]),
        f"[bold]{human_bytes(total['raw_bytes'])}[/]",
        f"[bold]{human_bytes(total['expected_bytes'])}[/]",
    )
    out_console.print(table)
    if any(s.estimated for s in sizes):
        out_console.print(
            "* no split file or images here: estimated from the published split sizes, images spread evenly "
            "over the classes"
        )


def show_extract_result(result) -> None:
    rate = f"{result.images_per_s:,.1f} img/s" if result.images else "no new images"
    err_console.print(
        f"[green]done:[/] {result.images:,} views encoded in {result.seconds:.1f} s ({rate}) on {result.device}; "
        f"store key [bold]{result.fingerprint[:16]}[/]"
    )
    for pool, paths in result.skipped_paths.items():
        err_console.print(
            f"[yellow]skipped[/] {len(paths)} unreadable image(s) in {pool} (listed in the manifest): "
            + ", ".join(paths[:5])
            + (", ..." if len(paths) > 5 else ""),
            highlight=False,
        )


def show_store_list(entries) -> None:
    if not entries:
        err_console.print("no stores")
        return
    table = Table(show_edge=False)
    for col in ("key", "dataset", "backbone", "precision", "format", "size", "state"):
        table.add_column(col)
    for e in entries:
        state = "[green]finished[/]" if e.finished else "[yellow]incomplete[/]"
        table.add_row(e.key[:16], e.dataset, e.backbone, e.precision, e.format, human_bytes(e.bytes), state)
    out_console.print(table)


def show_store_info(info: dict) -> None:
    bb = info["backbone"]
    out_console.print(f"[bold]{info['path']}[/]")
    out_console.print(
        f"fingerprint {info['fingerprint']}  format {info['format']}  precision {info['precision']}"
    )
    out_console.print(
        f"dataset {info['dataset']['name']} ({len(info['dataset']['classnames'])} classes)  "
        f"backbone {bb['arch']}/{bb['pretrained']}{' [yellow](random init)[/]' if bb['random_init'] else ''}"
    )
    out_console.print(f"versions {info.get('versions', {})}")
    table = Table(show_edge=False)
    for col in ("array", "shape", "dtype", "codec", "bytes", "stored"):
        table.add_column(col, justify="right" if col in ("bytes", "stored") else "left")
    for name, a in sorted(info["arrays"].items()):
        stored = human_bytes(a["stored_bytes"]) if a.get("stored_bytes") else "-"
        table.add_row(
            name,
            "×".join(map(str, a["shape"])),
            f"{a['stored_dtype']} → {a['dtype']}" if "stored_dtype" in a else a["dtype"],  # int8 dense maps
            a.get("codec", ""),
            human_bytes(a["bytes"]),
            stored,
        )
    out_console.print(table)
    for pool, skipped in info.get("skipped", {}).items():
        paths = info.get("skipped_paths", {}).get(pool, [])
        out_console.print(
            f"[yellow]skipped in {pool}:[/] {len(skipped)} image(s) {' '.join(paths)}", highlight=False
        )


def show_datasets(infos) -> None:
    table = Table(show_edge=False)
    table.add_column("name")
    table.add_column("classes", justify="right")
    table.add_column("expected layout under --root")
    for info in infos:
        table.add_row(info.name, str(getattr(info, "num_classes", "") or ""), getattr(info, "layout", ""))
    out_console.print(table)


def show_models(infos) -> None:
    table = Table(show_edge=False)
    table.add_column("architecture")
    table.add_column("pretrained tags")
    for info in infos:
        table.add_row(info.name, ", ".join(info.tags))
    out_console.print(table)


def show_fit_progress(result) -> None:
    """One line per finished (or reused) run while ``fit`` goes through the seeds."""
    state = "[dim]reused[/]" if result.reused else f"{result.seconds:.1f} s"
    err_console.print(
        f"{result.method} k={result.shots} seed={result.seed} ({result.protocol}, val {result.validation}): "
        f"val {_acc(result.val_acc)}  test {result.test_acc:.2f}  {state}",
        highlight=False,
    )


def _acc(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def show_fit_results(results) -> None:
    """The runs of one ``fit`` call as a table, with the mean over seeds and any caveats."""
    if not results:
        return
    heads = [h for h in results[0].heads if h != "main"]
    table = Table(show_edge=False, title=f"{results[0].method} on {results[0].dataset}", title_justify="left")
    columns = ("shots", "seed", "protocol", "validation", "val acc", "test acc", "test mean/class", *heads)
    for col in (*columns, "time", "run"):
        table.add_column(
            col,
            justify="left" if col in ("protocol", "validation", "run") else "right",
            overflow="fold" if col == "run" else "ellipsis",
        )
    for r in results:
        extra = [f"{r.heads[h]['test']:.2f}" for h in heads]
        time_s = "reused" if r.reused else f"{r.seconds:.1f} s"
        table.add_row(
            str(r.shots),
            str(r.seed),
            r.protocol,
            r.validation,
            _acc(r.val_acc),
            f"{r.test_acc:.2f}",
            f"{r.test_mean_per_class:.2f}",
            *extra,
            time_s,
            str(r.run_dir),
        )
    if len(results) > 1:
        mean = lambda xs: sum(xs) / len(xs)  # noqa: E731
        table.add_row(
            "",
            "[bold]mean[/]",
            "",
            "",
            _acc(None if results[0].val_acc is None else mean([r.val_acc for r in results])),
            f"[bold]{mean([r.test_acc for r in results]):.2f}[/]",
            f"{mean([r.test_mean_per_class for r in results]):.2f}",
            *[""] * len(heads),
            "",
            "",
        )
    out_console.print(table)
    for warning in dict.fromkeys(w for r in results for w in r.warnings):
        err_console.print(f"[yellow]note:[/] {warning}", highlight=False)


def show_methods(infos) -> None:
    """``fsl-cache methods``: name, what it is and its setting under ``--validation none``, what it reads from
    the store, its options and defaults."""
    table = Table(show_edge=False, show_lines=True)
    for col in ("method", "description", "needs"):
        table.add_column(col, overflow="fold")
    table.add_column("options (defaults)", no_wrap=True)  # one per line, never cut inside a value
    for info in infos:
        needs = info.needs()
        reads = [f"center: {', '.join(needs.eval_taps)}"]
        reads += [f"{v.policy} ×{v.views}: {', '.join(v.taps)}" for v in needs.train_views]
        options = "\n".join(f"{o.name}={o.default}" for o in info.options()) or "-"
        table.add_row(
            f"[bold]{info.name}[/]" + (" [dim](trains)[/]" if info.trains else ""),
            f"{info.description}\n[dim]--validation none:[/] {_validation_free(info.validation_free)}",
            "\n".join(reads),
            options,
        )
    out_console.print(table)


def _validation_free(setting) -> str:
    if not setting.exists:
        return f"[red]refused[/]: {setting.setting}"
    options = " ".join(f"{k}={v}" for k, v in setting.options.items())
    return setting.setting + (f" [dim]({options})[/]" if options else "")


class GridProgress:
    """One overall progress bar with ETA over a grid's pending runs, plus a line per failed run."""

    def __init__(self, *, enabled: bool = True) -> None:
        self.progress = Progress(
            TextColumn("[bold]grid"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("runs"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            console=err_console,
            disable=not (enabled and err_console.is_terminal),
        )
        self.task = None
        self.enabled = enabled
        self.plain: PlainProgress | None = None
        """Off a terminal (a log, CI): plain lines with rate and ETA instead of the bar."""

    def __enter__(self) -> GridProgress:
        return self

    def __exit__(self, *exc) -> None:
        self.progress.stop()

    def start(self, pending: int, reused: int) -> None:
        """Shows the bar: only now, as stores being extended before the grid show their own."""
        if self.enabled:
            err_console.print(f"grid: {pending} run(s) to compute, {reused} already recorded (skipped)")
        self.progress.start()
        self.task = self.progress.add_task("grid", total=pending)
        if self.enabled and not err_console.is_terminal:
            self.plain = PlainProgress(pending, "grid", unit="run")

    def advance(self, outcome) -> None:
        if self.task is not None and outcome.status != "reused":
            self.progress.advance(self.task)
            if self.plain is not None:
                self.plain.advance(1)
        if outcome.status == "failed":
            first = outcome.error.splitlines()[0] if outcome.error else ""
            err_console.print(f"[red]failed:[/] {outcome.trial.label}: {first}", highlight=False)
        elif outcome.status == "busy":
            err_console.print(
                f"[yellow]busy:[/] {outcome.trial.label} is being computed by another process",
                highlight=False,
            )


def show_grid_summary(result) -> None:
    counts = {s: result.count(s) for s in ("done", "reused", "busy", "failed")}
    err_console.print(
        f"[green]grid done:[/] {counts['done']} computed, {counts['reused']} reused, "
        f"{counts['busy']} held by other processes, {counts['failed']} failed",
        highlight=False,
    )
    for study in getattr(result, "studies", []):
        best = ", ".join(f"{k}={v}" for k, v in study.best_options.items()) or "defaults"
        val = f"{study.best_val_acc:.2f}" if study.best_val_acc is not None else "-"
        err_console.print(
            f"  best {study.method} on {study.dataset} k={study.shots}: {best} (val {val}, "
            f"{study.trials} trials)",
            highlight=False,
        )


def show_predictions(predictions) -> None:
    """``predict``'s results for people: one block per image, classes with probability bars (stdout)."""
    for p in predictions:
        out_console.print(f"[bold]{p.image}[/]", highlight=False)
        for name, prob in p.top:
            bar = "█" * max(1, round(prob * 30))
            out_console.print(f"  {prob * 100:6.2f}%  {bar:<30}  {name}", highlight=False)
