"""Errors a user can cause, and the helpers that make their messages useful.

Every error raised for bad input derives from :class:`FslError`; the CLI prints its message as one
line and exits with its ``exit_code`` (2 for usage mistakes, 1 otherwise), never a traceback.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


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
