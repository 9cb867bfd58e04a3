"""Every method learns, end to end: ``extract`` with the tiny CLIP trained on the shapes world
(``--pretrained shapes``), on a colour × texture dataset seen under a shift no caption showed, then ``fit``.

Zero-shot must be well above chance and well below 100 %; every trained method (and training-free
Tip-Adapter) must beat it by :data:`MARGINS` points at 4 shots, seed 1; LDC's ``main`` head must be at
least its ``zero_shot`` head. The numbers are deterministic for a machine and thread count; the margins
leave room for float rounding elsewhere. These tests add to the exactness tests, they replace none.
"""

from __future__ import annotations

import pytest

from fsl_cache import api
from fsl_cache.cli import DEMO_OPTIONS
from fsl_cache.datasets.shapes import make_shapes_dataset

pytestmark = pytest.mark.usefixtures("one_thread")

SHOTS = 4
COUNTS = {"train": SHOTS, "val": 4, "test": 20}
"""Per class: exactly the 4 shots, the few-shot val, and 20 test images (240 over the 12 classes)."""
METHODS = (
    "linear_probe",
    "tip_adapter",
    "tip_adapter_f",
    "clip_adapter",
    "coop",
    "ldc",
    "safe",
    "safe_a",
    "capt_c",
    "capt",
    "zs_lp",
    "clap",
    "lp_pp",
    "gda",
    "ape",
    "ape_t",
    "taskres",
    "prolip",
    "cross_modal",
)
MARGINS = {
    "linear_probe": 10.0,
    "tip_adapter": 2.0,
    "tip_adapter_f": 10.0,
    "clip_adapter": 3.0,
    "coop": 10.0,
    "ldc": 8.0,
    "safe": 15.0,
    "safe_a": 15.0,
    "capt_c": 3.0,
    "capt": 8.0,
    "zs_lp": 10.0,
    "clap": 10.0,
    "lp_pp": 10.0,
    "gda": 10.0,
    "ape": 10.0,
    "ape_t": 8.0,
    "taskres": 2.0,
    "prolip": 3.0,
    "cross_modal": 10.0,
}
"""Test top-1 points above zero-shot each method must reach (README: "What the shapes weights show")."""
FAST = {
    key.split(".")[0]: {
        k.split(".")[1]: v[0] for k, v in DEMO_OPTIONS.items() if k.startswith(key.split(".")[0] + ".")
    }
    for key in DEMO_OPTIONS
}
"""The demo's options (shorter schedules, see ``DEMO_OPTIONS``), as one dict per method."""


@pytest.fixture(scope="module")
def shapes_store(tmp_path_factory):
    root = tmp_path_factory.mktemp("shapes")
    data = make_shapes_dataset(root / "data", counts=COUNTS)
    where = dict(
        dataset=f"imagefolder:{data}", model="fsl-tiny-rn", pretrained="shapes", cache_dir=root / "cache"
    )
    api.extract(
        **where, for_methods=("zero_shot", *METHODS), shots=(SHOTS,), seeds=(1,), workers=0, progress=False
    )
    return {**where, "runs_dir": root / "runs"}


def _fit(store: dict, method: str):
    (result,) = api.fit(
        method, shots=SHOTS, seeds=(1,), options=FAST.get(method, {}), progress=False, **store
    )
    return result


@pytest.fixture(scope="module")
def zero_shot(shapes_store) -> float:
    return _fit(shapes_store, "zero_shot").test_acc  # percent


def test_zero_shot_is_above_chance_and_below_perfect(zero_shot):
    chance = 100 / 12
    assert 2 * chance < zero_shot < 80


@pytest.mark.parametrize("method", METHODS)
def test_method_beats_zero_shot(shapes_store, zero_shot, method):
    accuracy = _fit(shapes_store, method).test_acc

    assert accuracy >= zero_shot + MARGINS[method], f"{method} {accuracy:.1f} vs zero-shot {zero_shot:.1f}"


def test_ldc_main_head_is_at_least_its_zero_shot_head(shapes_store):
    heads = _fit(shapes_store, "ldc").heads
    assert heads["main"]["test"] >= heads["zero_shot"]["test"]
