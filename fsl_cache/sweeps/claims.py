"""Claim files: at most one process computes a run, across workers, sweeps and nodes sharing a runs folder.

A claim is ``<runs>/.claims/<run fingerprint>.claim``, created with ``O_CREAT | O_EXCL`` (atomic on
local and NFSv3+ file systems) and holding the owner's host, pid and start time. A claim is stale
when its owner is a dead process on this host, or when it is older than ``stale_after`` seconds
(owners elsewhere cannot be asked). A stale claim is taken over by renaming it aside first: of
several processes that find it stale, exactly one rename succeeds.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

CLAIMS = ".claims"
STALE_AFTER = 24 * 3600.0
"""Seconds after which a claim from another host is presumed abandoned (a run takes minutes)."""


@dataclass(frozen=True)
class Claim:
    """A held claim; :meth:`release` it when the run's record is written (or the run failed)."""

    path: Path
    token: str

    def release(self) -> None:
        try:
            if json.loads(self.path.read_text()).get("token") == self.token:
                self.path.unlink()
        except (OSError, json.JSONDecodeError):
            pass  # already taken over as stale, or removed: nothing of ours to release


def claim_path(runs_dir: Path, key: str) -> Path:
    return Path(runs_dir) / CLAIMS / f"{key}.claim"


def try_claim(runs_dir: Path, key: str, *, stale_after: float = STALE_AFTER) -> Claim | None:
    """Claim run ``key``; ``None`` when a live owner holds it."""
    path = claim_path(runs_dir, key)
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):  # create; or remove a stale claim and create again
        claim = _create(path)
        if claim is not None:
            return claim
        stale_token = stale_owner(path, stale_after=stale_after)
        if stale_token is None:
            return None
        _set_aside(path, stale_token)
    return None


def _create(path: Path) -> Claim | None:
    token = uuid.uuid4().hex
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return None
    with os.fdopen(fd, "w") as fh:
        json.dump(
            {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "token": token}, fh
        )
    return Claim(path, token)


def stale_owner(path: Path, *, stale_after: float = STALE_AFTER) -> str | None:
    """The token of the claim at ``path`` if nobody alive owns it (``""`` if it vanished), else ``None``."""
    try:
        owner = json.loads(path.read_text())
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return ""
    except (OSError, json.JSONDecodeError):
        # being written right now (created, not yet filled), or garbage: judge by age alone
        try:
            return "" if time.time() - path.stat().st_mtime > 60.0 else None
        except FileNotFoundError:
            return ""
    if owner.get("host") == socket.gethostname():
        alive = _alive(int(owner.get("pid", -1)))
    else:
        alive = age <= stale_after
    return None if alive else str(owner.get("token", ""))


def _alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


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
