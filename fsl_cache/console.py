"""Two consoles: stdout for results and tables a user may pipe, stderr for progress and notices."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.text import Text

err_console = Console(stderr=True)
PIPE_WIDTH = 200
"""Table width when stdout is a pipe or a file (and ``COLUMNS`` is unset): a row stays on one line for grep."""
out_console = Console(width=None if sys.stdout.isatty() or "COLUMNS" in os.environ else PIPE_WIDTH)
"""Results: tables and listings (``cache ls``, ``methods``, ``datasets``...), so ``| grep`` sees them."""
PLAIN_EVERY_S = 30.0
"""Seconds between plain progress lines when stderr is not a terminal (a log file, CI, ``nohup``)."""
_TRAINING_PROGRESS: ContextVar[bool] = ContextVar("training_progress", default=False)


class RateColumn(ProgressColumn):
    """Items per second with a unit, e.g. ``412.3 img/s``."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task) -> Text:
        speed = task.finished_speed or task.speed
        return Text(
            f"{speed:,.1f} {self.unit}/s" if speed else f"- {self.unit}/s", style="progress.data.speed"
        )


@contextmanager
def progress_bar(
    total: int, description: str, *, unit: str = "img", enabled: bool = True
) -> Iterator[Callable[[int], None]]:
    """Progress on stderr; yields ``advance(n)``: a rich bar on a terminal, else a plain line every
    :data:`PLAIN_EVERY_S` seconds (and at the end), so a log shows that a long job is alive."""
    if enabled and not err_console.is_terminal:
        yield PlainProgress(total, description, unit=unit).advance
        return
    progress = Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        RateColumn(unit),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
        disable=not enabled,
        transient=False,
    )
    with progress:
        task = progress.add_task(description, total=total)
        yield lambda n: progress.advance(task, n)


class PlainProgress:
    """Progress as plain stderr lines with rate and ETA, at most one per ``every`` seconds."""

    def __init__(self, total: int, description: str, *, unit: str, every: float = PLAIN_EVERY_S) -> None:
        self.total, self.description, self.unit, self.every = total, description, unit, every
        self.done, self.start = 0, time.monotonic()
        self.shown = self.start

    def advance(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if now - self.shown >= self.every or self.done >= self.total:
            self.shown = now
            rate = self.done / max(now - self.start, 1e-9)
            eta = (self.total - self.done) / rate if rate > 0 else float("inf")
            err_console.print(
                f"{self.description}: {self.done:,}/{self.total:,} {self.unit} "
                f"({100 * self.done / max(self.total, 1):.0f}%), {rate:,.1f} {self.unit}/s, "
                f"elapsed {duration(now - self.start)}, ETA {duration(eta)}",
                highlight=False,
                soft_wrap=True,
            )


def duration(seconds: float) -> str:
    """``42 s``, ``3 min 05 s``, ``1 h 02 min``."""
    if seconds != seconds or seconds == float("inf"):
        return "?"
    s = round(seconds)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    return f"{s // 3600} h {s % 3600 // 60:02d} min"


def human_bytes(n: float) -> str:
    """``512 B``, ``1.5 KiB``, ``3.2 GiB``."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


@contextmanager
def training_progress(enabled: bool) -> Iterator[None]:
    """Turn training's step counts, estimates and progress on or off for the code run inside."""
    token = _TRAINING_PROGRESS.set(enabled)
    try:
        yield
    finally:
        _TRAINING_PROGRESS.reset(token)


def training_notice(message: str) -> None:
    """A line about training (step count, estimate) on stderr, when :func:`training_progress` is on."""
    if _TRAINING_PROGRESS.get():
        err_console.print(message, highlight=False, soft_wrap=True)


def training_steps(total: int, description: str) -> contextlib.AbstractContextManager[Callable[[int], None]]:
    """A progress bar over ``total`` optimiser steps, when :func:`training_progress` is on."""
    return progress_bar(total, description, unit="step", enabled=_TRAINING_PROGRESS.get())
