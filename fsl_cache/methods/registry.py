"""The method registry: name → frozen :class:`MethodInfo`, filled by ``@register_method``.

Every module of this package is imported on first listing (a lookup by name imports the module of
that name first), so adding a method is adding one file (plus its test); nothing else lists methods.
"""

from __future__ import annotations

import fnmatch
import importlib
import pkgutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import UsageError, did_you_mean
from .base import Method, ValidationFree
from .needs import Needs
from .options import MethodConfig, OptionInfo

_REGISTRY: dict[str, MethodInfo] = {}
_INFRASTRUCTURE = {"base", "needs", "options", "registry"}
_discovered = False


@dataclass(frozen=True)
class MethodInfo:
    """The registry's record of one method (one line of ``fsl-cache methods``)."""

    name: str
    description: str
    cls: type[Method]
    config: type[MethodConfig]
    deviations: tuple[str, ...]
    paper_protocol: str
    trains: bool
    validation_free: ValidationFree
    """The method under ``--validation none``."""

    def needs(self, dataset: str = "", options: dict | None = None) -> Needs:
        return self.cls.needs(dataset, options)

    def options(self) -> list[OptionInfo]:
        return self.config.options()

    def defaults(self) -> dict[str, Any]:
        return self.config().to_json()

    def create(self, options: Mapping[str, Any] | None = None) -> Method:
        """An instance configured from ``-o`` options (strings or typed values)."""
        return self.cls(self.config.from_options(options or {}, method=self.name))

    def scoped(self, options: Mapping[str, Any]) -> dict[str, Any]:
        """The ``-o`` options that reach this method: ``method.key`` ones scoped to it, and unscoped ones
        its config has a field for (``epochs`` given to several methods reaches those that have epochs)."""
        fields = {o.name for o in self.options()}
        chosen = {}
        for key, value in options.items():
            scope, dot, name = key.rpartition(".")
            if (not dot or scope == self.name) and name in fields:
                chosen[name] = value
        return chosen


def check_option_names(methods: Sequence[str], keys: Iterable[str]) -> None:
    """Refuse an option no method of ``methods`` takes (a typo would otherwise change nothing)."""
    known = {o.name for m in methods for o in get_method(m).options()}  # unknown methods fail here
    for key in keys:
        scope, dot, name = key.rpartition(".")
        if dot and scope not in methods:
            raise UsageError(
                f"Option '{key}' is scoped to '{scope}', which is not among {', '.join(methods)}"
            )
        scoped = {o.name for o in get_method(scope).options()} if dot else known
        if name in scoped:
            continue
        owners = (
            [] if dot else [m for m in list_methods() if name in {o.name for o in get_method(m).options()}]
        )
        if owners:  # a real option, of a method not in the list
            raise UsageError(
                f"Option '{name}' belongs to {', '.join(owners)}, not to {', '.join(methods)}: "
                "add the method it is for to the method list"
            )
        raise did_you_mean(name, scoped, what=f"option for {scope or ', '.join(methods)}")


def register_method(cls: type[Method]) -> type[Method]:
    """Class decorator: add ``cls`` to the registry under ``cls.name``."""
    if not cls.name or not cls.description:
        raise TypeError(f"{cls.__name__} needs a name and a description")
    if cls.name in _REGISTRY and _REGISTRY[cls.name].cls.__qualname__ != cls.__qualname__:
        raise TypeError(f"method '{cls.name}' is registered twice ({_REGISTRY[cls.name].cls.__qualname__})")
    _REGISTRY[cls.name] = MethodInfo(
        cls.name,
        cls.description,
        cls,
        cls.Config,
        tuple(cls.deviations),
        cls.paper_protocol,
        cls.trains,
        cls.validation_free,
    )
    return cls


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    package = __name__.rpartition(".")[0]
    for module in pkgutil.iter_modules([str(Path(__file__).parent)]):
        if module.name not in _INFRASTRUCTURE and not module.name.startswith("_"):
            importlib.import_module(f"{package}.{module.name}")
    _discovered = True


def list_methods(pattern: str = "*") -> list[str]:
    """Registered method names matching a glob ``pattern``, sorted."""
    _discover()
    return sorted(n for n in _REGISTRY if fnmatch.fnmatch(n, pattern))


def get_method(name: str) -> MethodInfo:
    """The method ``name``; an unknown name raises a usage error suggesting the closest one.

    A method's file bears its name, so that file alone is imported first (``predict`` needs one
    method, not all of them and what they import); every other module only if it is not there.
    """
    if name not in _REGISTRY and name not in _INFRASTRUCTURE and name.isidentifier():
        if (Path(__file__).parent / f"{name}.py").is_file():
            importlib.import_module(f"{__name__.rpartition('.')[0]}.{name}")
    if name not in _REGISTRY:
        _discover()
    if name not in _REGISTRY:
        raise did_you_mean(name, _REGISTRY, what="method")
    return _REGISTRY[name]
