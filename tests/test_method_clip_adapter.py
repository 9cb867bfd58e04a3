"""CLIP-Adapter (METHODS §2.4): the residual blend, training on cached coop views, the rho search."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fsl_cache import api
from fsl_cache.datasets import make_demo_dataset
from fsl_cache.methods import FitTask, TaskInfo, get_method
from fsl_cache.methods.clip_adapter import ClipAdapterHead, blend
from fsl_cache.methods.zero_shot import ZeroShotHead
from fsl_cache.runs.fitting import fit_runs
from fsl_cache.runs.request import FitRequest
from fsl_cache.splits import SplitRef
from fsl_cache.testing import ArrayStore, fit_method, pooled_accuracy

NAMES = ("a", "b", "c", "d", "e")
FAST = {"epochs": 2, "batch_size": 4}


@pytest.fixture(scope="module")
def deranged():
    """Class c sits on the text direction of class c+1: zero-shot gets ~0 %, an adapter can fix it."""
    g = torch.Generator().manual_seed(0)
    c, d, shots, views = len(NAMES), 64, 4, 9
    text = F.normalize(torch.randn(c, d, generator=g), dim=-1)
    means = 3 * text[(torch.arange(c) + 1) % c]

    def draw(n, v):
        y = torch.arange(c).repeat_interleave(n)
        return (means[y][:, None] + 0.3 * torch.randn(len(y), v, d, generator=g)).numpy().astype(
            np.float16
        ), y

    (tr, ytr), (va, yva), (te, yte) = draw(shots, views), draw(4, 1), draw(20, 1)
    data = {
        "images/train_pool/views/coop/pooled": tr,
        "images/val_pool/views/center/pooled": va,
        "text/coop": text.numpy(),
    }
    store = ArrayStore(data, {"views": {"train_pool/coop": views}})
    ref = lambda name, pool, y: SplitRef(name, pool, np.arange(len(y)), y, np.arange(len(y)))  # noqa: E731
    info = TaskInfo("synthetic", NAMES, shots, 1, "coop", d)
    task = FitTask(store, info, train=ref("train", "train_pool", ytr), val=ref("val", "val_pool", yva))
    return task, (torch.from_numpy(te).float()[:, 0], yte)


def fit(task, options, seed=1):
    return fit_method("clip_adapter", task, options, seed=seed)


def test_head_equals_its_formula_on_hand_made_tensors():
    text = torch.randn(3, 8)
    head = ClipAdapterHead(text, rho=0.3, scale=100.0)
    w1, w2 = head.adapter.fc[0].weight, head.adapter.fc[2].weight
    assert w1.shape == (2, 8) and w2.shape == (8, 2) and head.adapter.fc[0].bias is None
    f = torch.randn(5, 8) * 4  # un-normalised
    a = torch.relu(torch.relu(f @ w1.T) @ w2.T)
    expected = 100.0 * F.normalize(0.3 * a + 0.7 * f, dim=-1) @ F.normalize(text, dim=-1).T
    with torch.no_grad():
        torch.testing.assert_close(head({"pooled": f}), expected)
    torch.testing.assert_close(blend(torch.ones(2), torch.zeros(2), 0.2), torch.full((2,), 0.2))


def test_learns_a_separable_task_beyond_zero_shot(deranged):
    task, test = deranged
    zero_shot = pooled_accuracy(ZeroShotHead(task.text("coop"), scale=100.0), test)
    fitted = fit(task, {"epochs": 10, "batch_size": 4, "lr": 0.05})
    assert zero_shot < 20 and pooled_accuracy(fitted.head, test) >= zero_shot + 60
    assert [n for n, p in fitted.head.named_parameters() if p.requires_grad] == [
        "adapter.fc.0.weight",
        "adapter.fc.2.weight",
    ]


def test_training_is_deterministic_for_a_seed(deranged):
    task, _ = deranged
    a, b = fit(task, FAST), fit(task, FAST)
    for x, y in zip(a.head.parameters(), b.head.parameters()):
        assert torch.equal(x, y)
    assert a.history == b.history
    c = fit(task, FAST, seed=2)
    assert not torch.equal(a.head.adapter.fc[0].weight, c.head.adapter.fc[0].weight)


def test_rho_grid_trains_one_adapter_per_ratio_and_keeps_the_best_on_val(deranged):
    task, _ = deranged
    fitted = fit(task, FAST | {"rho_grid": "0.2,0.8", "lr": 0.05})
    sel = fitted.selection
    assert sel["rho_grid"] == [0.2, 0.8] and len(sel["rho_val_acc"]) == 2
    assert sel["rho"] == pytest.approx([0.2, 0.8][int(np.argmax(sel["rho_val_acc"]))])
    assert float(fitted.head.rho) == pytest.approx(sel["rho"])


def test_recipe_defaults_follow_shots_and_protocol(deranged):
    method = get_method("clip_adapter").create({})
    assert method.config.rho == 0.2 and method.config.templates == "coop"
    for shots, epochs in ((1, 50), (2, 100), (4, 100), (8, 200), (16, 200)):
        resolved = method.resolve(TaskInfo("dtd", NAMES, shots, 1, "coop", 64))
        assert (resolved.epochs, resolved.select) == (epochs, "best")
    assert method.resolve(TaskInfo("dtd", NAMES, 16, 1, "paper", 64)).select == "last"
    s = method.train_settings(deranged[0])
    assert (
        s.optimizer,
        s.lr,
        s.momentum,
        s.weight_decay,
        s.schedule,
        s.warmup,
        s.warmup_lr,
        s.batch_size,
        s.policy,
    ) == ("sgd", 2e-3, 0.9, 5e-4, "cosine_epoch", 1, 1e-5, 32, "coop")


def test_runs_end_to_end_on_a_tiny_store_deterministically(tmp_path):
    root = make_demo_dataset(tmp_path / "demo")
    api.extract(
        f"imagefolder:{root}",
        model="fsl-tiny-rn",
        pretrained="none",
        for_methods=["clip_adapter"],
        cache_dir=tmp_path / "cache",
        shots=(1,),
        seeds=(1,),
        workers=0,
        progress=False,
    )
    kwargs = dict(
        dataset=f"imagefolder:{root}",
        shots=1,
        seeds=(1,),
        model="fsl-tiny-rn",
        pretrained="none",
        cache_dir=tmp_path / "cache",
        runs_dir=tmp_path / "runs",
        options=FAST,
        force=True,
    )
    first, second = (
        fit_runs(FitRequest("clip_adapter", **kwargs))[0],
        fit_runs(FitRequest("clip_adapter", **kwargs))[0],
    )
    assert (first.val_acc, first.test_acc, first.heads) == (second.val_acc, second.test_acc, second.heads)
    assert (first.run_dir / "head.safetensors").exists()
