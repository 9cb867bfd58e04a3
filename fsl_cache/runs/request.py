"""One typed request per fit, shared by the CLI, ``api``, the fit engine and the sweeps.

:class:`FitRequest` holds every default once. :func:`resolve_run` turns a request, its opened store
and a seed into the configured method, the run fingerprint and the run folder: the only place
either is computed, so ``fit`` and ``grid`` always agree on which runs exist.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from ..defaults import DEFAULT_MODEL, DEFAULT_PRETRAINED, DEFAULT_PROTOCOL, DEFAULT_SEEDS, DEFAULT_TARGETS
from ..errors import UsageError
from ..methods import Method, MethodInfo, TaskInfo, get_method, list_methods
from ..splits import base_novel_classes, check_full_val, check_protocol, check_validation, default_validation
from ..splits.protocol import TARGET_PROTOCOLS
from ..store.catalog import default_cache_dir
from ..store.location import as_location
from ..store.store import FeatureStore
from ..training.data import DEFAULT_MEMORY_BUDGET
from .record import default_runs_dir, run_dir, run_fingerprint


@dataclass(frozen=True)
class FitRequest:
    """Fit ``method`` on the store of ``dataset`` + backbone with ``shots`` per class, once per seed."""

    method: str
    dataset: str
    shots: int
    seeds: tuple[int, ...] = DEFAULT_SEEDS
    options: Mapping[str, Any] = field(default_factory=dict)
    """The method's ``-o key=value`` settings (strings or typed values)."""
    protocol: str = DEFAULT_PROTOCOL
    validation: str | None = None
    """``none``, ``kshot`` or ``full`` (:data:`~fsl_cache.splits.VALIDATIONS`); ``None``: the protocol's own
    (:func:`~fsl_cache.splits.default_validation`), which keeps the run keys recorded before regimes existed."""
    targets: tuple[str, ...] = ()
    """Domain-shift target datasets the fitted head is also tested on (``domain_shift`` default: ImageNet's)."""
    model: str = DEFAULT_MODEL
    pretrained: str = DEFAULT_PRETRAINED
    store: str | None = None
    """A store key prefix or folder, instead of looking the store up by dataset and backbone."""
    cache_dir: Path | None = None
    """``None``: ``$FSL_CACHE_DIR`` or ``./cache``."""
    runs_dir: Path | None = None
    """``None``: ``$FSL_RUNS_DIR`` or ``./runs``."""
    force: bool = False
    """Fit again even when the run's record exists."""
    device: str = "cpu"
    memory_budget: int | None = None
    """Bytes of cached tensors held in memory (``None``: ``$FSL_FIT_MEMORY_GB``, default 4 GiB)."""

    @property
    def cache(self) -> Path:
        return as_location(self.cache_dir) if self.cache_dir is not None else default_cache_dir()

    @property
    def runs(self) -> Path:
        return Path(self.runs_dir) if self.runs_dir is not None else default_runs_dir()

    @property
    def budget(self) -> int:
        return self.memory_budget or DEFAULT_MEMORY_BUDGET

    def checked(self) -> FitRequest:
        """This request with shots and seeds as ints, or a usage error naming what is wrong.

        The method's options are parsed too, so bad options fail before any store is opened.
        """
        info = get_method(self.method)
        info.create(self.options)
        check_protocol(self.protocol)
        check_validation(self.validation)
        if self.validation == "none" and not info.cls.validation_free.exists:
            raise UsageError(
                f"Method {info.name} has no validation-free setting ({info.cls.validation_free.setting}); "
                "use --validation kshot or full"
            )
        if self.protocol == "base2novel" and not info.cls.base2novel:
            able = [n for n in list_methods() if get_method(n).cls.base2novel]
            raise UsageError(
                f"Method {info.name} cannot run --protocol base2novel: its head has no way to score classes "
                f"it never trained on. Methods that can: {', '.join(able)}"
            )
        targets = shift_targets(self.protocol, self.targets)
        seeds = [self.seeds] if isinstance(self.seeds, (int, np.integer)) else self.seeds
        return replace(
            self,
            targets=targets,
            options=dict(self.options),
            shots=_positive(self.shots, "--shots"),
            seeds=tuple(_positive(s, "--seed") for s in seeds),
        )


def shift_targets(protocol: str, targets: Sequence[str]) -> tuple[str, ...]:
    """The domain-shift targets of a run: as given, or ImageNet's shifts under ``domain_shift``."""
    targets = tuple(targets) or (DEFAULT_TARGETS if protocol == "domain_shift" else ())
    if targets and protocol not in TARGET_PROTOCOLS:
        raise UsageError(f"--targets needs --protocol domain_shift (or paper), not {protocol}")
    return targets


def _positive(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise UsageError(f"{what} must be a positive integer, got {value!r}")
    return int(value)


def task_info(fs: FeatureStore, *, shots: int, seed: int, protocol: str) -> TaskInfo:
    """What a method may know of its task before it reads any split (base classes only under base2novel)."""
    m = fs.manifest
    info = TaskInfo(
        dataset=m["dataset"]["name"],
        classnames=tuple(m["dataset"]["classnames"]),
        shots=shots,
        seed=seed,
        protocol=protocol,
        embed_dim=int(m["backbone"]["embed_dim"]),
        backbone=m["backbone"],
        zs_scale=float(m.get("zs_scale", 100.0)),
        store_fingerprint=m["fingerprint"],
    )
    if protocol == "base2novel":  # the method sees the base classes only (METHODS §1.5)
        base = base_novel_classes(info.num_classes)[0]
        info = replace(info, classnames=tuple(info.classnames[i] for i in base))
    return info


def run_validation(request: FitRequest, method_cls) -> str:
    """The regime ``request`` asks of ``method_cls``: ``--validation``, or its protocol's default."""
    return request.validation or default_validation(request.protocol, method_cls)


def keyed_validation(request: FitRequest, method_cls) -> str | None:
    """The regime as the run key holds it: ``None`` when it is the protocol's default run, whose key stays as
    it was before regimes existed. An explicit regime under ``paper`` is keyed even when it equals the default:
    it drops the test-set selection a default ``paper`` run keeps for some methods."""
    if request.validation is None:
        return None
    same = request.validation == default_validation(request.protocol, method_cls)
    return (
        None
        if same and not (request.protocol == "paper" and method_cls.paper_test_oracle)
        else request.validation
    )


def method_options(request: FitRequest, method_cls) -> dict[str, Any]:
    """The ``-o`` options of the run: under ``--validation none`` the method's validation-free setting first."""
    if run_validation(request, method_cls) == "none":
        return {**method_cls.validation_free.options, **request.options}
    return dict(request.options)


@dataclass(frozen=True)
class ResolvedRun:
    """A request on its store for one seed: the method with its resolved config, the run's key and folder."""

    request: FitRequest
    info: MethodInfo
    method: Method
    seed: int
    key: str
    path: Path
    validation: str = "kshot"
    """The regime asked (``kshot`` may stand in for a ``paper`` default ``full`` the store cannot serve)."""


def resolve_run(request: FitRequest, fs: FeatureStore, *, seed: int, targets: Sequence = ()) -> ResolvedRun:
    """The run ``request`` makes on ``fs`` for ``seed`` (nothing is read but the manifest).

    ``targets``: the opened domain-shift targets (:class:`~fsl_cache.runs.shift.Target`), whose stores
    the run's fingerprint includes.
    """
    info = get_method(request.method)
    if request.validation == "full":
        check_full_val(fs)
    tinfo = task_info(fs, shots=request.shots, seed=seed, protocol=request.protocol)
    method = info.cls(info.create(method_options(request, info.cls)).resolve(tinfo))
    key = run_fingerprint(
        store_fingerprint=fs.fingerprint,
        method=info.name,
        config=method.config.to_json(),
        shots=request.shots,
        seed=seed,
        protocol=request.protocol,
        targets={t.dataset: t.store.fingerprint for t in targets},
        logit_scale=tinfo.zs_scale,
        validation=keyed_validation(request, info.cls),
    )
    path = run_dir(
        request.runs,
        dataset=tinfo.dataset,
        store_dir=fs.root.name,
        method=info.name,
        shots=request.shots,
        seed=seed,
        protocol=request.protocol,
        key=key,
    )
    return ResolvedRun(request, info, method, seed, key, path, run_validation(request, info.cls))
