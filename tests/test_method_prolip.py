"""ProLIP (METHODS §2.10): the pre-projection tap and W0 reproduce the cached pooled feature; the loss and its
gradient re-typed from astra-vision/ProLIP methods/ProLIP.py on trained, asymmetric tensors; learning on built
features."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dataset_helpers import write_images
from method_helpers import SYNTH, fit_accuracy

from fsl_cache import api
from fsl_cache.methods.prolip import ProLIPHead, epoch_view, lambda_value, prolip_loss
from fsl_cache.store import FeatureStore
from fsl_cache.testing import make_synthetic_store, zero_shot_chance

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("model", ["fsl-tiny-rn", "fsl-tiny-vit"])
def test_preproj_times_w0_reproduces_the_cached_pooled_feature(model, tmp_path):
    root = write_images(tmp_path / "images", classes=2, counts=(2, 1, 3))
    result = api.extract(
        f"imagefolder:{root}",
        model=model,
        pretrained="none",
        cache_dir=tmp_path / "cache",
        for_methods=["prolip"],
        views=2,
        precision="fp32",
        shots=(1,),
        seeds=(1,),
        workers=0,
        progress=False,
    )
    store = FeatureStore.open(result.store)
    weight = store.read("proj/weight")
    bias = store.read("proj/bias") if store.has("proj/bias") else np.zeros(weight.shape[0], np.float32)
    assert store.has("proj/bias") == (
        model == "fsl-tiny-rn"
    )  # the RN out-projection has a bias, ViT proj none
    for prefix in ("images/test/views/center", "images/train_pool/views/tip"):
        pre = torch.from_numpy(store.read(f"{prefix}/preproj"))
        pooled = torch.from_numpy(store.read(f"{prefix}/pooled")) if store.has(f"{prefix}/pooled") else None
        if pooled is None:  # train views hold only what ProLIP trains on
            assert pre.shape[1] == 2
            continue
        rebuilt = pre @ torch.from_numpy(weight).T + torch.from_numpy(bias)
        assert (rebuilt - pooled).abs().max() <= 1e-5 * max(1.0, float(pooled.abs().max()))
    assert pre.shape[-1] == (256 if model == "fsl-tiny-rn" else 128)


def _official_loss_and_grad(x, labels, weight, bias, text, lambda_v, vit):
    """ProLIP.forward's loss, re-typed (VisProjRN / VisProjViT, MSELoss(reduction='sum'))."""
    mse = torch.nn.MSELoss(reduction="sum")
    if vit:
        vit_proj = weight.T.contiguous()
        vit_proj_copy = copy.deepcopy(vit_proj)
        param = torch.nn.Parameter(vit_proj + 0.05 * torch.arange(vit_proj.numel()).view_as(vit_proj).sin())
        image_features = x @ param
        initial_params, fine_tuned_params = vit_proj_copy.view(-1), param.view(-1)
    else:
        linear = torch.nn.Linear(weight.shape[0], weight.shape[1])
        linear.weight = torch.nn.Parameter(weight + 0.05 * torch.arange(weight.numel()).view_as(weight).sin())
        linear.bias = torch.nn.Parameter(bias.clone())
        linear.bias.requires_grad = False
        param = linear.weight
        image_features = linear(x)
        initial_params, fine_tuned_params = weight.view(-1), param.view(-1)
    image_features = F.normalize(image_features, dim=-1)
    logits = 100.0 * image_features @ text.T  # text_weights is [D, C] in the code
    loss = F.cross_entropy(logits, labels) + lambda_v * mse(initial_params, fine_tuned_params)
    loss.backward()
    grad = param.grad.T if vit else param.grad
    return loss.detach(), grad, (param.detach().T if vit else param.detach())


@pytest.mark.parametrize("vit", [False, True])
def test_loss_and_gradient_are_the_official_ones(vit):
    g = torch.Generator().manual_seed(0)
    x, text = torch.randn(12, 7, generator=g), F.normalize(torch.randn(3, 5, generator=g), dim=-1)
    weight0, labels = torch.randn(5, 7, generator=g), torch.tensor([0, 1, 2, 2, 1, 0, 0, 0, 1, 2, 1, 1])
    bias = torch.zeros(5) if vit else torch.randn(5, generator=g)
    ref_loss, ref_grad, trained = _official_loss_and_grad(x, labels, weight0, bias, text, 0.25, vit)
    w = trained.clone()[None].requires_grad_(True)
    loss = prolip_loss(x, labels, w, weight0, bias, text, torch.tensor([0.25]))
    loss.sum().backward()
    torch.testing.assert_close(loss[0].detach(), ref_loss)
    torch.testing.assert_close(w.grad[0], ref_grad)
    assert (trained - weight0).abs().sum() > 0 and ref_grad.abs().sum() > 0
    head = ProLIPHead(trained, bias, text)
    torch.testing.assert_close(head({"preproj": x}), 100 * F.normalize(x @ trained.T + bias, dim=-1) @ text.T)


def test_views_cycle_and_lambda_follow_the_code():
    cnt, used = 0, []
    for _ in range(7):  # [CODE] the epoch loop's cnt update, aug_views = 3
        cnt = 0 if (cnt + 1) % 3 == 0 else cnt + 1
        used.append(1 + cnt)  # cached view 0 is the center view
    assert [epoch_view(e, 3) for e in range(7)] == used == [2, 3, 1, 2, 3, 1, 2]
    assert (lambda_value("1/N", 4), lambda_value("1/N2", 4), lambda_value("0.5", 4)) == (0.25, 0.0625, 0.5)


def test_prolip_learns_where_zero_shot_is_chance(tmp_path):
    make_synthetic_store(
        tmp_path / "cache",
        num_classes=4,
        zero_shot=0.0,
        views={"tip": 11},
        per_class=(16, 8, 24),
        preproj=True,
    )
    zs = fit_accuracy("zero_shot", tmp_path / "cache", tmp_path / "runs")
    acc = fit_accuracy("prolip", tmp_path / "cache", tmp_path / "runs", options={"lr": 1e-2, "epochs": 30})
    (run,) = api.fit(
        "prolip",
        shots=4,
        seeds=[1],
        options={"search": True, "epochs": 10},
        cache_dir=tmp_path / "cache",
        runs_dir=tmp_path / "runs",
        progress=False,
        **SYNTH,
    )
    selection = json.loads((run.run_dir / "record.json").read_text())["selection"]
    print(f"zero-shot {zs:.1f} prolip {acc:.1f} search {run.test_acc:.1f} {selection}")
    assert zs == pytest.approx(zero_shot_chance(4)) and acc >= zs + 25
    assert selection["select"] == "search" and selection["lr"] >= 1e-4  # tiny steps cannot leave chance
