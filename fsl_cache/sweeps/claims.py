"""Claim files: at most one process computes a run, across workers, sweeps and nodes sharing a runs folder.

A claim is ``<runs>/.claims/<run fingerprint>.claim``, created with ``O_CREAT | O_EXCL`` (atomic on
local and NFSv3+ file systems) and holding the owner's host, pid, process start time and a token.
While the run goes on, a thread of the owner touches the file every ``stale_after / 4`` seconds
(its heartbeat: the file's mtime). A claim is stale when its heartbeat is older than ``stale_after``
seconds, on any host, or, on the owner's own host, when its pid is dead or now belongs to another
process (another start time: containers reuse pids). A stale claim is taken over by renaming it
aside first: of several processes that find it stale, exactly one rename succeeds.

The mtime is compared with the local clock, so hosts sharing a runs folder need clocks that agree
to well within ``stale_after``; on a slow shared file system (attribute caching, delayed writes)
raise it (``grid --claim-stale-after``).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from pathlib import Path

from ..processes import process_start

CLAIMS = ".claims"
STALE_AFTER = 120.0
"""Seconds without a heartbeat after which a claim is taken over (four heartbeats missed)."""
HEARTBEATS = 4
"""Heartbeats per ``stale_after``: a claim is stale only after several in a row were missed."""


class Claim:
    """A held claim, kept fresh by a heartbeat thread; :meth:`release` it when the run's record is
    written (or the run failed)."""

    def __init__(self, path: Path, token: str, *, stale_after: float = STALE_AFTER) -> None:
        self.path = path
        self.token = token
        self._stop = threading.Event()
        self._beat = threading.Thread(
            target=self._heartbeat, args=(stale_after / HEARTBEATS,), name="fsl-cache-claim", daemon=True
        )
        self._beat.start()

    def _heartbeat(self, interval: float) -> None:
        while not self._stop.wait(interval):
            if not self._owned():
                return  # taken over (we were presumed dead): never refresh another owner's claim
            try:
                os.utime(self.path)
            except OSError:
                return

    def _owned(self) -> bool:
        try:
            return json.loads(self.path.read_text()).get("token") == self.token
        except (OSError, json.JSONDecodeError):
            return False

    def release(self) -> None:
        self._stop.set()
        if self._owned():
            self.path.unlink(missing_ok=True)
        # else: already taken over as stale, or removed: nothing of ours to release


def claim_path(runs_dir: Path, key: str) -> Path:
    return Path(runs_dir) / CLAIMS / f"{key}.claim"


def try_claim(runs_dir: Path, key: str, *, stale_after: float = STALE_AFTER) -> Claim | None:
    """Claim run ``key``; ``None`` when a live owner holds it."""
    path = claim_path(runs_dir, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):  # create; or remove a stale claim and create again
        token = _create(path)
        if token is not None:
            return Claim(path, token, stale_after=stale_after)
        stale_token = stale_owner(path, stale_after=stale_after)
        if stale_token is None:
            return None
        _set_aside(path, stale_token)
    return None


def _create(path: Path) -> str | None:
    """Write the owner to a private file, then link it in place: the link is the exclusive create, and a
    claim is never seen empty (a process stopped mid-claim leaves either nothing or a whole claim)."""
    token = uuid.uuid4().hex
    owner = {
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "pid_started": process_start(os.getpid()),
        "started": time.time(),
        "token": token,
    }
    private = path.with_name(f"{path.name}.new-{token}")
    try:
        private.write_text(json.dumps(owner))
        os.link(private, path)
    except FileExistsError:
        return None
    finally:
        private.unlink(missing_ok=True)
    return token


def stale_owner(path: Path, *, stale_after: float = STALE_AFTER) -> str | None:
    """The token of the claim at ``path`` if nobody alive owns it (``""`` if it vanished), else ``None``."""
    try:
        owner = json.loads(path.read_text())
        heartbeat_age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return ""
    except (OSError, json.JSONDecodeError):
        # being written right now (created, not yet filled), or garbage: judge by age alone
        try:
            return "" if time.time() - path.stat().st_mtime > 60.0 else None
        except FileNotFoundError:
            return ""
    alive = heartbeat_age <= stale_after
    if alive and owner.get("host") == socket.gethostname():
        pid = int(owner.get("pid", -1))
        started = process_start(pid)
        alive = started is not None and owner.get("pid_started") in (None, started)
    return None if alive else str(owner.get("token", ""))


def _set_aside(path: Path, stale_token: str) -> None:
    """Rename the stale claim to a unique name (one contender wins), then delete it.

    If what was renamed is not the claim judged stale (another contender already replaced it with a
    live one), it is linked back in place.
    """
    aside = path.with_name(f"{path.name}.stale-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(path, aside)
    except FileNotFoundError:
        return
    try:
        token = str(json.loads(aside.read_text()).get("token", ""))
    except (OSError, json.JSONDecodeError):
        token = stale_token
    if token != stale_token:
        try:
            os.link(aside, path)
        except OSError:
            pass
    aside.unlink(missing_ok=True)
