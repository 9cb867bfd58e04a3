"""The report table as text: a terminal table, Markdown, CSV, LaTeX (booktabs) or JSON lines.

Every format shows one block per dataset (the average over datasets first): a row per method with
its validation regime, a column per shot count, ``mean ± std`` over seeds, the best mean of each
column in bold. Base-to-novel tables show three columns per shot count: base, novel and their
harmonic mean (HM, the headline).
Domain-shift runs add a block per (source, shots) whose columns are the source and each target.
"""

from __future__ import annotations

import csv
import io
import json

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..errors import did_you_mean
from .rows import dataset_label
from .table import AVERAGE, Cell, ReportTable

FORMATS = ("table", "markdown", "csv", "latex", "json")


def format_report(table: ReportTable, fmt: str) -> str:
    """``table`` rendered as ``fmt`` (one of :data:`FORMATS`), ending with a newline."""
    renderers = {"table": as_text, "markdown": as_markdown, "csv": as_csv, "latex": as_latex, "json": as_json}
    if fmt not in renderers:
        raise did_you_mean(fmt, renderers, what="report format")
    return renderers[fmt](table)


def block_title(table: ReportTable, block: str) -> str:
    if block == AVERAGE:
        return f"Average over {len(table.datasets)} datasets"
    return dataset_label(block)


def cell_text(cell: Cell | None, *, pm: str = "±") -> str:
    if cell is None:
        return "-"
    text = f"{cell.mean:.2f}"
    if cell.std is not None and len(cell.values) > 1:
        text += f" {pm} {cell.std:.2f}"
    return text + ("*" if cell.partial else "")


def _is_best(table: ReportTable, cell: Cell | None) -> bool:
    best = table.best(cell.dataset, cell.shots) if cell is not None else None
    return cell is not None and len(table.methods) > 1 and best is not None and cell.mean >= best - 1e-9


def _shots_header(table: ReportTable) -> list[str]:
    if table.base2novel:
        return [f"{k}-shot {part}" for k in table.shots for part in ("base", "novel", "HM")]
    return [f"{k}-shot" for k in table.shots]


def _row_texts(table: ReportTable, method: str, block: str, *, pm: str = "±", bold=None) -> list[str]:
    """The row's entries in header order; ``bold(text)`` marks the best mean (HM) of each column."""
    texts = []
    for k in table.shots:
        cell = table.get(method, block, k)
        text = cell_text(cell, pm=pm)
        if bold is not None and _is_best(table, cell):
            text = bold(text)
        if table.base2novel:
            parts = ("-", "-") if cell is None else (f"{cell.base:.2f}", f"{cell.novel:.2f}")
            texts += [*parts, text]
        else:
            texts.append(text)
    return texts


def _views(
    table: ReportTable, *, pm: str = "±", bold
) -> list[tuple[str, list[str], list[tuple[str, list[str]]]]]:
    """(title, headers, [(method, entries)]) of every block: each dataset's, then each domain shift's."""
    regime = table.validation.get
    views = [
        (
            block_title(table, block),
            ["validation", *_shots_header(table)],
            [(m, [regime(m, ""), *_row_texts(table, m, block, pm=pm, bold=bold)]) for m in table.methods],
        )
        for block in table.blocks()
    ]
    for shift in table.shifts:
        rows = []
        for method in shift.methods:
            texts = []
            for column in shift.columns:
                cell, best = shift.cells.get((method, column)), shift.best(column)
                text = cell_text(cell, pm=pm)
                top = cell is not None and len(shift.methods) > 1 and cell.mean >= best - 1e-9
                texts.append(bold(text) if top else text)
            rows.append((method, [regime(method, ""), *texts]))
        source = dataset_label(shift.source)
        headers = ["validation", f"{source} (source)"] + [dataset_label(c) for c in shift.columns[1:]]
        views.append((f"Domain shift from {source}, {shift.shots}-shot", headers, rows))
    return views


def as_text(table: ReportTable) -> str:
    out = io.StringIO()
    views = _views(table, bold=lambda t: f"[bold]{t}[/]")
    columns = max(len(headers) for _, headers, _ in views)
    console = Console(file=out, width=max(100, 24 + 18 * columns), force_terminal=False, color_system=None)
    for title, headers, rows in views:
        t = Table(title=escape(title), title_justify="left", show_edge=False)
        t.add_column("method")
        for head in headers:
            t.add_column(escape(head), justify="left" if head == "validation" else "right")
        for method, texts in rows:
            t.add_row(escape(method), *texts)
        console.print(t)
        console.print()
    for note in table.notes:
        console.print(f"note: {note}", highlight=False)
    return out.getvalue()


def as_markdown(table: ReportTable) -> str:
    lines = []
    for title, headers, rows in _views(table, bold=lambda t: f"**{t}**"):
        lines += [
            f"### {title}",
            "",
            "| method | " + " | ".join(headers) + " |",
            "|---|" + "".join("---|" if h == "validation" else "---:|" for h in headers),
        ]
        lines += [f"| {method} | " + " | ".join(texts) + " |" for method, texts in rows]
        lines.append("")
    lines += [f"_{note}_" for note in table.notes]
    return "\n".join(lines).rstrip() + "\n"


def as_csv(table: ReportTable) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    b2n = table.base2novel
    writer.writerow(
        ["method", "validation", "dataset", "shots"]
        + ["base", "novel"] * b2n
        + ["mean", "std", "n", "seeds", "partial"]
    )
    for cell in _cells(table):
        parts = [f"{cell.base:.4f}", f"{cell.novel:.4f}"] if b2n else []
        writer.writerow(
            [
                cell.method,
                table.validation.get(cell.method, ""),
                f"{cell.source}->{cell.dataset}" if cell.source else cell.dataset,
                cell.shots,
                *parts,
                f"{cell.mean:.4f}",
                "" if cell.std is None else f"{cell.std:.4f}",
                len(cell.values),
                " ".join(map(str, cell.seeds)),
                int(cell.partial),
            ]
        )
    return out.getvalue()


def as_json(table: ReportTable) -> str:
    return "".join(
        json.dumps(cell.to_json() | {"validation": table.validation.get(cell.method)}) + "\n"
        for cell in _cells(table)
    )


def _cells(table: ReportTable) -> list[Cell]:
    cells = [
        c
        for block in table.blocks()
        for m in table.methods
        for k in table.shots
        if (c := table.get(m, block, k)) is not None
    ]
    return cells + [c for shift in table.shifts for c in shift.cells.values()]


def as_latex(table: ReportTable) -> str:
    lines = [
        "% fsl-cache report: mean $\\pm$ std over seeds (test top-1, %); best per column in bold",
        "% needs \\usepackage{booktabs}",
    ]
    for title, headers, rows in _views(table, pm="$\\pm$", bold=lambda t: f"\\textbf{{{t}}}"):
        lines += [
            f"% {title}",
            "\\begin{tabular}{ll" + "c" * (len(headers) - 1) + "}",
            "\\toprule",
            f"\\multicolumn{{{1 + len(headers)}}}{{l}}{{{_tex(title)}}} \\\\",
            "Method & " + " & ".join(_tex(h) for h in headers) + " \\\\",
            "\\midrule",
        ]
        lines += [f"{_tex(method)} & " + " & ".join(texts) + " \\\\" for method, texts in rows]
        lines += ["\\bottomrule", "\\end{tabular}", ""]
    lines += [f"% {note}" for note in table.notes]
    return "\n".join(lines).rstrip() + "\n"


def _tex(text: str) -> str:
    for char in ("&", "%", "$", "#", "_", "{", "}"):
        text = text.replace(char, "\\" + char)
    return text
