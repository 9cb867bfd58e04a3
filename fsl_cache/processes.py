"""Whether a process named by its pid (and start time) is still the one that wrote a claim or a lease."""

from __future__ import annotations

import os
from pathlib import Path


def process_start(pid: int) -> int | None:
    """When process ``pid`` started (clock ticks since boot, from /proc), ``None`` if no such process.

    With the pid it names one process for good: a reused pid has another start time. Where there is
    no /proc, ``0`` for any live pid (the pid alone is compared).
    """
    if pid <= 0:
        return None
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return 0 if not Path("/proc/self").exists() and _alive(pid) else None
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after "pid (comm)", which may hold spaces
    return None if fields[0] == "Z" else int(fields[19])  # a zombie is dead; field 22: starttime


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True
