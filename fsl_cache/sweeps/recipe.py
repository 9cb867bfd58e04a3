"""Recipes: a sweep written down as YAML in ``pipelines/`` (``fsl-cache grid --recipe pipelines/X.yaml``).

.. code-block:: yaml

    name: demo
    description: tiny random-weight backbone on the generated demo dataset
    model: fsl-tiny-rn
    pretrained: none
    datasets: [imagefolder:demo_data/fsl-demo]
    methods: [zero_shot, tip_adapter, linear_probe]
    shots: [1, 2, 4]
    seeds: [1, 2, 3]
    protocol: coop           # or domain_shift (with targets: [imagenet_v2, ...])
    validation: kshot        # or none, full (default: the protocol's own regime)
    options:                 # option grids: a value or a list of values
      tip_adapter_f.epochs: [5, 10]
    extract_for: [zero_shot, tip_adapter, linear_probe]
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ..defaults import DEFAULT_MODEL, DEFAULT_PRETRAINED, DEFAULT_SEEDS, DEFAULT_SHOTS
from ..errors import UsageError, did_you_mean
from .spec import GridSpec

KEYS = {
    "name",
    "description",
    "model",
    "pretrained",
    "datasets",
    "methods",
    "shots",
    "seeds",
    "protocol",
    "validation",
    "targets",
    "options",
    "root",
    "extract_for",
    "notes",
}


def load_recipe(path: str | Path) -> GridSpec:
    """The :class:`GridSpec` a recipe file describes; unknown keys and wrong types fail with the key's name."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"No recipe file {path} (recipes live in pipelines/*.yaml)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UsageError(f"{path} is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise UsageError(f"{path} must hold a mapping of recipe keys ({', '.join(sorted(KEYS))})")
    for key in data:
        if key not in KEYS:
            raise did_you_mean(str(key), KEYS, what=f"recipe key in {path}")
    return GridSpec(
        methods=_names(data, "methods", path),
        datasets=_names(data, "datasets", path),
        shots=_ints(data, "shots", path, DEFAULT_SHOTS),
        seeds=_ints(data, "seeds", path, DEFAULT_SEEDS),
        options={str(k): _as_tuple(v) for k, v in (data.get("options") or {}).items()},
        protocol=str(data.get("protocol", "coop")),
        validation=str(data["validation"]) if data.get("validation") is not None else None,
        targets=_names(data, "targets", path) if "targets" in data else (),
        model=str(data.get("model", DEFAULT_MODEL)),
        pretrained=str(data.get("pretrained", DEFAULT_PRETRAINED)),
        name=str(data.get("name", path.stem)),
        root=data.get("root"),
        extract_for=tuple(data.get("extract_for") or ()),
    )


def _names(data: dict, key: str, path: Path) -> tuple[str, ...]:
    value = data.get(key)
    if value is None:
        raise UsageError(f"{path} has no '{key}'")
    values = value.split(",") if isinstance(value, str) else value
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise UsageError(f"'{key}' in {path} must be a list of names")
    return tuple(v.strip() for v in values)


def _ints(data: dict, key: str, path: Path, default: tuple[int, ...]) -> tuple[int, ...]:
    values = _as_tuple(data.get(key, default))
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        raise UsageError(f"'{key}' in {path} must be a list of integers, got {list(values)}")
    return values


def _as_tuple(value: Any) -> tuple:
    return tuple(value) if isinstance(value, (list, tuple)) else (value,)
