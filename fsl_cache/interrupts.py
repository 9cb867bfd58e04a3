"""Stopping cleanly: SIGTERM handled like Ctrl-C, and helper processes that die with their parent.

Schedulers preempt with SIGTERM (SLURM, Kubernetes, ``timeout``) and send SIGKILL after a grace
period of tens of seconds. Python's default for SIGTERM is to die on the spot, skipping every
``finally``; raised as :class:`Terminated` instead, it unwinds through the same cleanup as Ctrl-C
(claims released, lock closed, decoding workers stopped) at the next bytecode of the main thread.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager

PR_SET_PDEATHSIG = 1
"""prctl(2) option: the signal the kernel sends this process when its parent thread exits (Linux)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where Ctrl-C raises :class:`KeyboardInterrupt` so the same cleanup runs."""


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` in the main thread (once: repeats are
    ignored so that they cannot cut the cleanup short; a scheduler's SIGKILL still ends it)."""
    if threading.current_thread() is not threading.main_thread():
        yield  # only the main thread may set signal handlers
        return

    def terminate(signum, frame) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def die_with_parent(parent: int) -> None:
    """Have the kernel SIGKILL this process when ``parent`` (the process that started it) dies.

    Linux only (``PR_SET_PDEATHSIG``); elsewhere torch's worker watchdog still notices within
    seconds. Called first thing in a child: if the parent is already gone, the child exits now.
    """
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent:  # died before prctl took effect: no signal will come
        os._exit(1)
