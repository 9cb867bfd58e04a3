"""What a sweep runs: a :class:`GridSpec` (methods × datasets × shots × seeds × option values) and its trials.

``-o key=v1,v2`` gives a list of values for one option; ``-o method.key=v`` scopes it to one method.
An unscoped option applies to every method of the grid whose config has that field, so
``zero_shot,tip_adapter_f -o epochs=5,10`` sweeps the epochs of Tip-Adapter-F only.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..defaults import DEFAULT_MODEL, DEFAULT_PRETRAINED, DEFAULT_SEEDS, DEFAULT_SHOTS
from ..errors import UsageError
from ..methods import check_option_names, get_method

OptionGrid = Mapping[str, Sequence[Any]]
"""``{"epochs": [5, 10], "tip_adapter_f.lr": [1e-3]}``: option name (optionally ``method.``-scoped) → values."""


@dataclass(frozen=True)
class Trial:
    """One run of the grid: a method with fixed option values on one (dataset, shots, seed)."""

    method: str
    dataset: str
    shots: int
    seed: int
    options: tuple[tuple[str, Any], ...] = ()
    """Option values as sorted ``(key, value)`` pairs (hashable; ``dict(trial.options)`` for fit)."""

    @property
    def label(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options)
        return f"{self.method}{f'[{opts}]' if opts else ''} {self.dataset} k={self.shots} s={self.seed}"


@dataclass(frozen=True)
class GridSpec:
    """A sweep as the ``grid`` command or a recipe describes it (every field keyword-only in the CLI)."""

    methods: tuple[str, ...]
    datasets: tuple[str, ...]
    shots: tuple[int, ...] = DEFAULT_SHOTS
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    options: Mapping[str, tuple[Any, ...]] = field(default_factory=dict)
    """Option grids, see :data:`OptionGrid`."""
    protocol: str = "coop"
    validation: str | None = None
    """``none``, ``kshot`` or ``full``; ``None``: the protocol's own regime."""
    targets: tuple[str, ...] = ()
    """Domain-shift targets every run is also tested on (``domain_shift`` default: ImageNet's shifts)."""
    model: str = DEFAULT_MODEL
    """Backbone architecture of the stores (every dataset uses the same backbone)."""
    pretrained: str = DEFAULT_PRETRAINED
    name: str = ""
    """Recipe name (for messages only)."""
    root: str | None = None
    """Root of the built-in datasets, from which ``grid`` extends the stores (``--root`` overrides it)."""
    extract_for: tuple[str, ...] = ()
    """Methods the stores must serve, i.e. the ``--for`` of the ``extract`` commands a recipe documents."""

    def __post_init__(self) -> None:
        for what, values in (
            ("methods", self.methods),
            ("datasets", self.datasets),
            ("shots", self.shots),
            ("seeds", self.seeds),
        ):
            if not values:
                raise UsageError(f"A grid needs at least one value for {what}")
        for what, values in (("shots", self.shots), ("seeds", self.seeds)):
            bad = [v for v in values if isinstance(v, bool) or not isinstance(v, int) or v < 1]
            if bad:
                raise UsageError(f"Grid {what} must be positive integers, got {bad[0]!r}")

    @property
    def size(self) -> int:
        return len(expand(self))


def method_options(spec: GridSpec, method: str) -> list[dict[str, Any]]:
    """Every combination of the option values that apply to ``method`` (one empty dict if none do)."""
    chosen = {
        name: tuple(tuple(v) if isinstance(v, list) else v for v in values)
        for name, values in get_method(method).scoped(spec.options).items()
    }
    keys = sorted(chosen)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(chosen[k] for k in keys))]


def check_options(spec: GridSpec) -> None:
    """Refuse an option no method of the grid takes (a typo would otherwise sweep nothing)."""
    check_option_names(spec.methods, spec.options)


def expand(spec: GridSpec) -> list[Trial]:
    """The cross product, method-major then dataset, shots, seed (the order runs are started in)."""
    check_options(spec)
    trials = []
    for method in spec.methods:
        for opts in method_options(spec, method):
            frozen = tuple(sorted(opts.items()))
            for dataset, shots, seed in itertools.product(spec.datasets, spec.shots, spec.seeds):
                trials.append(Trial(method, dataset, shots, seed, frozen))
    return trials


# ---------------------------------------------------------------------------- parsing CLI values


def split_values(text: str) -> list[str]:
    """``"1e-3,[12,10],x"`` → ``["1e-3", "12,10", "x"]``: commas inside brackets belong to one value."""
    values, depth, current = [], 0, []
    for ch in text:
        if ch in "[(":
            depth += 1
            if depth == 1:
                continue
        elif ch in "])":
            depth -= 1
            if depth == 0:
                continue
        if ch == "," and depth == 0:
            values.append("".join(current).strip())
            current = []
        else:
            current.append(ch)
    values.append("".join(current).strip())
    if depth != 0:
        raise UsageError(f"Unbalanced brackets in option values '{text}'")
    return [v for v in values if v]


def parse_option_grid(items: Sequence[str]) -> dict[str, tuple[str, ...]]:
    """``("epochs=5,10", "tip_adapter_f.lr=1e-3")`` → ``{"epochs": ("5", "10"), ...}`` (strings, typed by the
    method)."""
    grid: dict[str, tuple[str, ...]] = {}
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"expected key=v1,v2 for -o, got '{item}'")
        parsed = split_values(values)
        if not parsed:
            raise UsageError(f"-o {key.strip()} has no values")
        grid[key.strip()] = tuple(parsed)
    return grid
