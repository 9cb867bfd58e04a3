"""A new method is one file: a toy method registered at runtime works through every command, no other edit.

The toy method even brings its own augmentation policy, so stage one learns from the method alone
which views to render and how.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner

from fsl_cache import api
from fsl_cache.backbones.views import Policy
from fsl_cache.cli import main
from fsl_cache.datasets import make_demo_dataset
from fsl_cache.inference import Predictor
from fsl_cache.methods import FitResult, Head, Method, MethodConfig, list_methods, register_method, registry
from fsl_cache.methods.needs import Needs, ViewNeed
from fsl_cache.store import FeatureStore

TINY = ["--model", "fsl-tiny-rn", "--pretrained", "none"]
CROP = Policy("toy_crop", (0.6, 1.0), source="this test")


# ---------------------------------------------------------------------------- the one file's worth


@dataclass(frozen=True)
class ToyConfig(MethodConfig):
    scale: float = 10.0
    """Logit scale of the cosine to the class prototypes."""


class PrototypeHead(Head):
    def __init__(self, prototypes: torch.Tensor, *, scale: float) -> None:
        super().__init__()
        self.register_buffer("prototypes", F.normalize(prototypes.float(), dim=-1))
        self.register_buffer("scale", torch.tensor(float(scale)))

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.scale * F.normalize(x["pooled"], dim=-1) @ self.prototypes.T


class ToyPrototypes(Method):
    name = "toy_prototypes"
    description = "Class means of cached toy_crop views, scored by cosine (a test's method)."
    Config = ToyConfig
    deviations = ("[PROPOSED] a toy: no paper.",)
    trains = False
    needed = Needs(train_views=(ViewNeed("toy_crop", 3, ("pooled",), custom_policy=CROP),))

    def fit(self, task, *, generator: torch.Generator) -> FitResult:
        views = task.train_views("toy_crop", views=range(3))  # [N, 3, D]
        sums = torch.zeros(task.info.num_classes, views.shape[-1]).index_add_(
            0, task.train.labels, F.normalize(views, dim=-1).mean(dim=1)
        )
        return FitResult(PrototypeHead(sums, scale=self.config.scale), selection={"views": 3})

    @classmethod
    def rebuild_head(cls, bundle, state, backbone) -> PrototypeHead:
        return PrototypeHead(state["prototypes"], scale=float(state["scale"]))


# ---------------------------------------------------------------------------- every command on it


@pytest.fixture
def toy_registered(monkeypatch):
    list_methods()  # the built-in methods are discovered before the registry is swapped for a copy
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))
    register_method(ToyPrototypes)
    yield "toy_prototypes"


def test_a_method_registered_at_runtime_goes_through_every_command(toy_registered, tmp_path):
    data = make_demo_dataset(tmp_path / "data")
    dataset, cache, runs = f"imagefolder:{data}", tmp_path / "cache", tmp_path / "runs"
    common = ["--dataset", dataset, "--cache-dir", str(cache), *TINY]
    extract = CliRunner().invoke(
        main,
        ["extract", *common, "--for", toy_registered, "--shots", "2", "--seeds", "1", "--workers", "0"],
    )
    assert extract.exit_code == 0, extract.output
    (entry,) = api.cache_ls(cache_dir=cache)
    store = FeatureStore.open(entry.path)
    try:
        assert store.arrays["images/train_pool/views/toy_crop/pooled"]["shape"][1] == 3
        assert store.manifest["policies"]["toy_crop"]["scale"] == [0.6, 1.0]
    finally:
        store.close()

    fit = CliRunner().invoke(
        main,
        ["fit", toy_registered, *common, "--shots", "2", "--seed", "1", "--runs-dir", str(runs), "--json"],
    )
    assert fit.exit_code == 0, fit.output
    fitted = json.loads(fit.stdout.splitlines()[0])
    assert fitted["test_acc"] > 0.5  # class means of the demo's colour/shape classes separate them

    grid = api.grid(
        [toy_registered],
        datasets=[dataset],
        shots=(2,),
        seeds=(1,),
        options={"scale": (10, 20)},
        model="fsl-tiny-rn",
        pretrained="none",
        cache_dir=cache,
        runs_dir=runs,
    )
    assert sorted(o.status for o in grid.outcomes) == ["done", "reused"]  # scale=10 is the fit above

    _, rows, _ = api.report(runs_dir=runs, methods=[toy_registered])
    assert len(rows) == 2 and {r.method for r in rows} == {toy_registered}

    exported = api.export(fitted["run_dir"], tmp_path / "export")
    image = next((data / "test").glob("*/*.png"))
    for source in (fitted["run_dir"], exported):
        predictions = api.predict(source, [image], top_k=2)
        assert len(predictions[0].top) == 2
    logits = Predictor.load(exported).logits([image])["main"]
    assert torch.allclose(logits, Predictor.load(fitted["run_dir"]).logits([image])["main"])
