"""Errors a user can cause, and the helpers that make their messages useful.

Every error raised for bad input derives from :class:`FslError`; the CLI prints its message as one
line and exits with its ``exit_code`` (2 for usage mistakes, 1 otherwise), never a traceback.
"""

from __future__ import annotations

import difflib
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path


class FslError(Exception):
    """An error caused by the user's input or environment, reported without a traceback."""

    exit_code = 1


class UsageError(FslError):
    """A wrong name, option or value on the command line."""

    exit_code = 2


class DatasetError(FslError):
    """A dataset that cannot be read: missing root, wrong layout, unreadable file."""


class BackboneError(FslError):
    """A backbone that cannot be built or whose weights cannot be loaded."""


class StoreError(FslError):
    """A feature store that is missing, foreign, incomplete or corrupted."""


class NoStoreError(UsageError):
    """No finished store holds the dataset with the backbone asked for (``fit`` and ``grid`` can create it)."""


class DiskFullError(StoreError):
    """Not enough free space for what an extraction would write."""


def did_you_mean(name: str, choices: Iterable[str], *, what: str) -> UsageError:
    """A :class:`UsageError` for an unknown ``name`` that suggests the closest valid choice.

    >>> str(did_you_mean("eurosta", ["eurosat", "dtd"], what="dataset"))
    "Unknown dataset 'eurosta'. Did you mean eurosat? Available: dtd, eurosat"
    """
    choices = sorted(set(choices))
    close = difflib.get_close_matches(name, choices, n=1, cutoff=0.5)
    hint = f" Did you mean {close[0]}?" if close else ""
    return UsageError(f"Unknown {what} '{name}'.{hint} Available: {', '.join(choices)}")


def check_writable_folder(path: Path, *, what: str) -> None:
    """Raise :class:`StoreError` naming ``what`` (e.g. ``--cache-dir``) unless ``path`` is or can become a
    folder this process can write in. Runs before any disk-space arithmetic, whose "0 B free" on a
    read-only or non-folder path would point the user at the wrong problem."""
    path = Path(path)
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise StoreError(f"{what} {path}: {probe} is a file, not a folder. Pick a folder for {what}.")
    try:  # permissions bits do not tell (root, read-only mounts): try to create a folder there
        os.rmdir(tempfile.mkdtemp(prefix=".fsl-write-test-", dir=probe))
    except OSError as err:
        raise StoreError(
            f"{what} {path} is not writable: cannot create anything in {probe} ({err.strerror or err}). "
            f"Pick a folder you can write to for {what}."
        ) from None
