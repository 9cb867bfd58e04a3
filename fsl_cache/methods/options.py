"""Method configs: frozen dataclasses whose fields are the ``-o key=value`` options of ``fsl-cache fit``.

A field's type drives how its string is parsed, its attribute docstring is its help text (read from
the source, as litgpt and simple-parsing do), and ``__post_init__`` validates the values.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import textwrap
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from functools import cache
from typing import Any, Literal

from ..errors import UsageError, did_you_mean

_NONE_WORDS = ("none", "null", "default")
_TRUE_WORDS = ("1", "true", "yes", "on")
_FALSE_WORDS = ("0", "false", "no", "off")


class ConfigError(UsageError):
    """A method option with an invalid value."""


@dataclass(frozen=True)
class OptionInfo:
    """One ``-o`` option as ``fsl-cache methods`` shows it."""

    name: str
    type: str
    default: Any
    doc: str


@dataclass(frozen=True)
class MethodConfig:
    """Base of every method's ``Config``; a method without options uses it as is."""

    @classmethod
    def from_options(cls, options: Mapping[str, Any], *, method: str) -> MethodConfig:
        """Build a config from ``{key: value}``; string values are parsed by the field's type."""
        known = {f.name for f in dataclasses.fields(cls)}
        hints = typing.get_type_hints(cls)
        values = {}
        for raw_key, raw in options.items():
            key = raw_key.replace("-", "_")
            if key not in known:
                if not known:
                    raise UsageError(f"Method {method} takes no options (got '{raw_key}')")
                raise did_you_mean(raw_key, known, what=f"{method} option")
            values[key] = parse_value(raw, hints[key], key=key)
        return cls(**values)

    def replace(self, **changes: Any) -> MethodConfig:
        return dataclasses.replace(self, **changes)

    def to_json(self) -> dict[str, Any]:
        return {f.name: _jsonable(getattr(self, f.name)) for f in dataclasses.fields(self)}

    @classmethod
    def options(cls) -> list[OptionInfo]:
        docs = field_docs(cls)
        hints = typing.get_type_hints(cls)
        return [
            OptionInfo(f.name, type_name(hints[f.name]), _jsonable(_default(f)), docs.get(f.name, ""))
            for f in dataclasses.fields(cls)
        ]


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _jsonable(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


# ---------------------------------------------------------------------------- parsing


def parse_value(raw: Any, hint: Any, *, key: str) -> Any:
    """Turn ``raw`` (a CLI string, or an already typed API value) into a value of type ``hint``."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return _parse_optional(raw, args, key=key)
    if origin is Literal:
        return _parse_choice(raw, args, key=key)
    if origin is tuple:
        return _parse_tuple(raw, args, key=key)
    if hint is bool:
        return _parse_bool(raw, key=key)
    if hint in (int, float, str):
        return _parse_scalar(raw, hint, key=key)
    raise TypeError(f"option {key}: unsupported type {hint!r}")


def _parse_optional(raw: Any, args: tuple, *, key: str) -> Any:
    inner = [a for a in args if a is not type(None)]
    if raw is None or (isinstance(raw, str) and raw.strip().lower() in _NONE_WORDS):
        return None
    union = typing.Union[tuple(inner)]  # noqa: UP007 (built at runtime from the annotation's members)
    return parse_value(raw, inner[0] if len(inner) == 1 else union, key=key)


def _parse_choice(raw: Any, choices: tuple, *, key: str) -> Any:
    for choice in choices:
        if raw == choice or (isinstance(raw, str) and raw.strip() == str(choice)):
            return choice
    raise did_you_mean(str(raw), [str(c) for c in choices], what=f"value for option {key}")


def _parse_tuple(raw: Any, args: tuple, *, key: str) -> tuple:
    items = [s.strip() for s in raw.split(",") if s.strip()] if isinstance(raw, str) else list(raw)
    if len(args) == 2 and args[1] is Ellipsis:
        return tuple(parse_value(v, args[0], key=key) for v in items)
    if len(items) != len(args):
        raise ConfigError(f"option {key} takes {len(args)} comma-separated values, got {raw!r}")
    return tuple(parse_value(v, t, key=key) for v, t in zip(items, args))


def _parse_bool(raw: Any, *, key: str) -> bool:
    if isinstance(raw, bool):
        return raw
    word = str(raw).strip().lower()
    if word in _TRUE_WORDS:
        return True
    if word in _FALSE_WORDS:
        return False
    raise ConfigError(f"option {key} takes true or false, got {raw!r}")


def _parse_scalar(raw: Any, kind: type, *, key: str) -> Any:
    if isinstance(raw, bool) and kind is not str:
        raise ConfigError(f"option {key} takes {kind.__name__}, got {raw!r}")
    try:
        if kind is int and isinstance(raw, float):
            if not raw.is_integer():
                raise ValueError
            return int(raw)
        if kind is int and isinstance(raw, str):
            value = float(raw)  # accept 1e3
            if not value.is_integer():
                raise ValueError
            return int(value)
        return kind(raw.strip() if isinstance(raw, str) else raw)
    except (TypeError, ValueError):
        raise ConfigError(f"option {key} takes {kind.__name__}, got {raw!r}") from None


def type_name(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in args)
    if origin is Literal:
        return "{" + ",".join(str(a) for a in args) + "}"
    if origin is tuple:
        return ",".join(type_name(a) for a in args if a is not Ellipsis) + ("..." if Ellipsis in args else "")
    return "none" if hint is type(None) else getattr(hint, "__name__", str(hint))


# ---------------------------------------------------------------------------- docs


@cache
def field_docs(cls: type) -> dict[str, str]:
    """Attribute docstrings of a dataclass and its bases: ``x: int = 1`` followed by ``\"\"\"doc\"\"\"``."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass) or klass is object:
            continue
        docs.update(_class_field_docs(klass))
    return docs


def _class_field_docs(klass: type) -> dict[str, str]:
    try:
        source = textwrap.dedent(inspect.getsource(klass))
    except (OSError, TypeError):
        return {}
    body = ast.parse(source).body[0].body
    docs = {}
    for node, after in zip(body, body[1:]):
        if (
            isinstance(node, ast.AnnAssign)
            and isinstance(node.target, ast.Name)
            and isinstance(after, ast.Expr)
            and isinstance(after.value, ast.Constant)
            and isinstance(after.value.value, str)
        ):
            docs[node.target.id] = " ".join(after.value.value.split())
    return docs


# ---------------------------------------------------------------------------- validation helpers


def check_range(
    name: str, value: float, *, low: float | None = None, high: float | None = None, strict_low: bool = False
) -> None:
    """Raise :class:`ConfigError` unless ``low <= value <= high`` (``low < value`` if ``strict_low``)."""
    if low is not None and (value <= low if strict_low else value < low):
        raise ConfigError(f"option {name} must be {'>' if strict_low else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise ConfigError(f"option {name} must be <= {high}, got {value}")


# ---------------------------------------------------------------------------- training options

from ..training.settings import Optimisation, TrainSettings  # noqa: E402


@dataclass(frozen=True)
class TrainOptions(MethodConfig, Optimisation):
    """The shared trainer's options (fields and help from :class:`~fsl_cache.training.settings.Optimisation`);
    a gradient-based method's ``Config`` subclasses this and re-declares the fields whose official defaults differ."""

    def __post_init__(self) -> None:
        for name in (
            "epochs",
            "iters",
            "warmup",
            "eval_every",
            "lr",
            "weight_decay",
            "momentum",
            "warmup_lr",
        ):
            if getattr(self, name) is not None:  # None: a per-dataset default filled in by Method.resolve
                check_range(name, getattr(self, name), low=0)
        check_range("batch_size", self.batch_size, low=1)
        check_range("eps", self.eps, low=0, strict_low=True)

    def train_settings(self, **fixed) -> TrainSettings:
        """:class:`TrainSettings` from these options plus what the method fixes (``policy`` ...)."""
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(Optimisation)}
        return TrainSettings(**{**values, **fixed})
