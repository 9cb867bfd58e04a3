"""The writer lock of a store on object storage: a lease object, since there is no ``flock`` there.

``<store>/.lock`` is created with a conditional PUT (``If-None-Match: *``): of several writers exactly
one succeeds. It names its holder and an expiry, which a heartbeat thread pushes forward every
``LEASE_SECONDS / 4`` with a PUT conditional on the lease's own ETag (``If-Match``), so a holder that
was taken over notices instead of overwriting the new holder. A lease is stale once expired (hosts
need clocks that agree to well within ``LEASE_SECONDS``), or at once on the holder's own host when
its process is gone, as a killed local writer's ``flock`` would be released; a stale lease is taken
over by a PUT conditional on the ETag that was judged stale, which one contender alone can win.

Only S3 (and S3-compatible servers) offer these conditional writes; writing to other fsspec
protocols is refused with a clear error, reading from them is not.
"""

from __future__ import annotations

import json
import os
import shlex
import socket
import sys
import threading
import time
import uuid
from typing import Any

from ..errors import StoreError
from ..processes import process_start

LEASE_SECONDS = 120.0
"""How long a lease lasts without a heartbeat: a writer killed on another host blocks the store this long."""


class Lease:
    """A held lease, renewed by a heartbeat thread until :meth:`close`."""

    def __init__(self, root: Any, etag: str, holder: dict) -> None:
        self.root = root
        self._etag = etag
        self._holder = holder
        self.lost = False
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, name="fsl-cache-lease", daemon=True)
        self._beat.start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(LEASE_SECONDS / 4):
            self._holder["expires"] = time.time() + LEASE_SECONDS
            try:
                self._etag = _put(self.root, self._holder, IfMatch=self._etag)
            except FileExistsError:  # 412: taken over as stale; never write over the new holder
                self.lost = True
                return
            except OSError:  # the endpoint is unreachable for now: the next beat tries again
                continue

    def check(self) -> None:
        """Raise if another process took the lease over, before this writer acknowledges more work."""
        if self.lost:
            raise StoreError(
                f"Lost the write lease on {self.root}: another process took it over as stale (this one "
                "missed its heartbeats for longer than the lease). Stop the other writer or re-run later."
            )

    def close(self) -> None:
        self._stop.set()
        self._beat.join()
        if self.lost:
            return
        bucket, key = _bucket_key(self.root)
        try:
            self.root.fs.call_s3("delete_object", Bucket=bucket, Key=key, IfMatch=self._etag)
        except OSError:  # already taken over, or unreachable: the lease then expires by itself
            pass


def acquire_lease(root: Any) -> Lease:
    """Take the write lease of the store at ``root`` (a remote location), or raise naming its holder."""
    if "s3" not in _protocols(root):
        raise StoreError(
            f"Cannot write a store at {root}: writers of a shared store need conditional writes, which "
            "fsl-cache uses on S3 (and S3-compatible servers) only. Extract to s3:// or a local folder."
        )
    command = shlex.join(sys.orig_argv)
    for _ in range(3):
        holder = {
            "pid": os.getpid(),
            "pid_started": process_start(os.getpid()),
            "host": socket.gethostname(),
            "command": command if len(command) <= 200 else command[:199] + "…",
            "since": time.strftime("%Y-%m-%d %H:%M:%S"),
            "expires": time.time() + LEASE_SECONDS,
            "token": uuid.uuid4().hex,
        }
        try:
            return Lease(root, _put(root, holder, IfNoneMatch="*"), holder)
        except FileExistsError:
            pass
        current = _read(root)
        if current is None:  # released in between: create again
            continue
        etag, other = current
        if not _stale(other):
            raise StoreError(
                f"Another process is writing {root}{_describe(other)}; wait for it to finish (or stop "
                "it) and re-run"
            )
        try:
            return Lease(root, _put(root, holder, IfMatch=etag), holder)
        except FileExistsError:  # another contender took it over first: judge the new holder
            continue
    raise StoreError(f"Could not take the write lease on {root}: other writers keep taking it; re-run")


def _protocols(root: Any) -> tuple[str, ...]:
    protocol = root.fs.protocol
    return (protocol,) if isinstance(protocol, str) else tuple(protocol)


def _bucket_key(root: Any) -> tuple[str, str]:
    bucket, _, prefix = root.path.partition("/")
    return bucket, f"{prefix.rstrip('/')}/.lock"


def _put(root: Any, holder: dict, **condition: str) -> str:
    """PUT the lease under ``condition``; its new ETag. A failed condition raises FileExistsError."""
    bucket, key = _bucket_key(root)
    body = json.dumps(holder).encode()
    try:
        return root.fs.call_s3("put_object", Bucket=bucket, Key=key, Body=body, **condition)["ETag"]
    except FileExistsError:
        raise
    except OSError as err:  # s3fs maps a 412 to EINVAL unless the server names the failed condition
        if _code(err) in ("PreconditionFailed", "412", "ConditionalRequestConflict"):
            raise FileExistsError(f"{root}/.lock changed: {err}") from err
        raise


def _code(err: OSError) -> str:
    response = getattr(err.__cause__, "response", None) or {}
    return str(response.get("Error", {}).get("Code", ""))


def _read(root: Any) -> tuple[str, dict] | None:
    """The lease's ETag, then its holder (read in this order, a takeover conditional on the ETag can
    only fail, never replace a newer lease); ``None`` when there is none."""
    path = root / ".lock"
    try:
        etag = path.fs.info(path.path)["ETag"]
        holder = json.loads(path.fs.cat_file(path.path))
    except FileNotFoundError:
        return None
    except ValueError:  # not a lease: judged stale by the takeover's ETag condition alone
        return etag, {}
    return etag, holder if isinstance(holder, dict) else {}


def _stale(holder: dict) -> bool:
    if float(holder.get("expires", 0)) < time.time():
        return True
    if holder.get("host") != socket.gethostname():
        return False
    started = process_start(int(holder.get("pid", -1)))
    return started is None or holder.get("pid_started") not in (None, started)


def _describe(holder: dict) -> str:
    try:
        left = max(0, int(float(holder["expires"]) - time.time()))
        return (
            f": pid {holder['pid']} on {holder['host']}, since {holder['since']}, running "
            f"`{holder['command']}` (its lease runs out in {left} s unless it renews it)"
        )
    except (KeyError, TypeError, ValueError):
        return ""
