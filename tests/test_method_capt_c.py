"""capt_c, CAPT-C (METHODS §2.9.3 [PROPOSED]): the bank, retrieval, zero-shot-reproducing init, learning a confused
pair, the base-to-novel protocol, and analytics in real run records."""

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fsl_cache import api
from fsl_cache.backbones import load_backbone
from fsl_cache.datasets import make_demo_dataset
from fsl_cache.errors import UsageError
from fsl_cache.methods import FitTask, TaskInfo, get_method
from fsl_cache.methods.capt_modules import CaptHead, load_balance, load_descriptions
from fsl_cache.methods.confusion_bank import build_bank, confusable_classes, retrieve
from fsl_cache.splits import SplitRef
from fsl_cache.splits.protocol import base_novel_classes, harmonic_mean, subset_classes
from fsl_cache.testing import ArrayStore

NAMES = ("red circle", "blue square", "green triangle", "striped pattern")


def one_hot_logits(pred: list[list[int]], c: int) -> torch.Tensor:
    return 10.0 * F.one_hot(torch.tensor(pred), c).float()  # [N, V, C]


# ---------------------------------------------------------------------------- the bank


def test_bank_counts_soft_scores_and_cells_on_hand_made_predictions():
    labels = torch.tensor([0, 0, 1, 2])
    pred = [[0, 1], [2, 1], [1, 0], [2, 2]]  # image 0 view 1 → 1; image 1 → 2 then 1; image 2 view 1 → 0
    bank = build_bank(one_hot_logits(pred, 3), labels)
    expected = torch.tensor([[0, 2, 1], [1, 0, 0], [0, 0, 0]])
    assert torch.equal(bank.counts, expected)
    assert (
        sorted(bank.cell(0, 1)) == [(0, 1), (1, 1)] and bank.cell(1, 0) == [(2, 1)] and bank.cell(2, 1) == []
    )
    probs = one_hot_logits(pred, 3).softmax(-1)
    torch.testing.assert_close(bank.soft[0, 1], probs[:2, :, 1].sum())
    assert float(bank.soft.diag().abs().sum()) == 0.0
    summary = bank.to_json(["a", "b", "c"])
    assert summary["misclassified"] == 4 and summary["top_cells"][0] == {
        "true": 0,
        "pred": 1,
        "count": 2,
        "true_name": "a",
        "pred_name": "b",
    }


def test_confusable_classes_rank_by_counts_then_soft_then_text():
    counts = torch.tensor([[0, 0, 3, 0], [0, 0, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
    soft = torch.zeros(4, 4)
    soft[0, 3] = 0.5
    text = torch.eye(4)
    text[1] = F.normalize(torch.tensor([0.9, 0.1, 0.0, 0.0]), dim=0)
    pairs = confusable_classes(counts, soft, text, k=3)
    assert pairs[0].tolist() == [2, 3, 1]  # count 4, then soft, then text similarity
    assert pairs[1, 0] == 0  # no statistics: the text-nearest class
    assert confusable_classes(counts, soft, text, k=10).shape == (4, 3)


def test_retrieval_never_returns_the_query_images_own_views():
    g = torch.Generator().manual_seed(0)
    n, v, c, d = 6, 3, 3, 8
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    logits = torch.randn(n, v, c, generator=g)
    logits[:, :, 2] = -10  # every view is predicted 0 or 1
    bank = build_bank(logits, labels)
    keys = F.normalize(torch.randn(n * v, d, generator=g), dim=-1)
    for i in range(n):
        for view in range(v):
            query = keys[i * v + view][None]  # the query IS one of its own bank entries: the most similar
            anchor = torch.tensor([int(labels[i])])
            confusers = torch.tensor([[1 - int(labels[i])]])
            _, chosen = retrieve(
                query,
                anchor,
                confusers,
                torch.ones(1, 1),
                keys=keys,
                true=bank.true,
                pred=bank.pred,
                img=bank.img,
                class_mean=torch.eye(c, d),
                k=4,
                tau=0.07,
                image_id=torch.tensor([i]),
            )
            picked = chosen[chosen >= 0]
            assert not (bank.img[picked] == i).any()
            assert (bank.true[picked] != bank.pred[picked]).all()


def test_retrieval_without_candidates_falls_back_to_confuser_class_means():
    means = torch.eye(3, 4)
    r_bar, chosen = retrieve(
        torch.ones(1, 4) / 2,
        torch.tensor([0]),
        torch.tensor([[1, 2]]),
        torch.tensor([[0.75, 0.25]]),
        keys=torch.zeros(0, 4),
        true=torch.zeros(0, dtype=torch.long),
        pred=torch.zeros(0, dtype=torch.long),
        img=torch.zeros(0, dtype=torch.long),
        class_mean=means,
        k=2,
        tau=0.07,
    )
    torch.testing.assert_close(r_bar, F.normalize(torch.tensor([[0.0, 0.75, 0.25, 0.0]]), dim=-1))
    assert (chosen == -1).all()


# ---------------------------------------------------------------------------- the head


def small_head(*, grid=None, sample=True, c=4, d=16, n=5, v=2):
    g = torch.Generator().manual_seed(1)
    text = F.normalize(torch.randn(c, d, generator=g), dim=-1)
    feats = torch.randn(n, v, d, generator=g)
    labels = torch.arange(n) % c
    bank = build_bank(100 * F.normalize(feats, dim=-1) @ text.T, labels)
    pairs = confusable_classes(bank.counts, bank.soft, text, k=2)
    e = F.normalize(torch.randn(2, c, 2, d, generator=g), dim=-1)
    head = CaptHead(
        text,
        e[0],
        e[1],
        pairs,
        bank if sample else None,
        feats.reshape(-1, d) if sample else None,
        torch.randn(c, d, generator=g) if sample else None,
        scale=100.0,
        pairs_per_image=2,
        retrieve_k=2,
        tau=0.07,
        hidden=4,
        grid=grid,
        centroids=F.normalize(torch.randn(2, d, generator=g), dim=-1),
        random_scale=0.1,
    )
    return head, text, d


@pytest.mark.parametrize("grid", [None, 3])
def test_every_expert_reproduces_zero_shot_at_initialisation(grid):
    head, text, d = small_head(grid=grid)
    head.eval()
    x = {"pooled": torch.randn(7, d)}
    if grid:
        x["dense_embed"] = torch.randn(7, grid * grid, d)
    out = head(x)
    zs = 100 * F.normalize(x["pooled"], dim=-1) @ text.T
    for name in ("capt", "zero_shot", "semantic", "sample"):
        torch.testing.assert_close(out[name], zs, msg=name)
    novel, text, d = small_head(sample=False)
    torch.testing.assert_close(
        novel.eval()({"pooled": x["pooled"]})["capt"], 100 * F.normalize(x["pooled"], dim=-1) @ text.T
    )
    assert (novel.aux["router"][:, 2] == 0).all()  # novel classes: the sample expert is masked out


def test_load_balance_has_a_gradient_and_is_zero_when_even():
    gate = torch.tensor([[2.0, 0.0, 0.0], [1.0, 0.5, 0.0]], requires_grad=True)
    loss = load_balance(gate.softmax(-1))
    loss.backward()
    assert loss > 0 and gate.grad.abs().sum() > 0
    assert float(load_balance(torch.full((4, 3), 1 / 3))) == pytest.approx(0.0, abs=1e-6)


def test_descriptions_json_in_capts_format(tmp_path):
    path = tmp_path / "d.json"
    path.write_text(
        json.dumps(
            {
                "Blue Square": [
                    "The difference between Blue Square and Red Circle is the shape.",
                    "The difference between Blue Square and nothing is moot.",
                ],
                "unknown": ["The difference between unknown and Red Circle is ..."],
            }
        )
    )
    found = load_descriptions(path, ["red_circle", "blue_square"])
    assert found == {(1, 0): ["The difference between Blue Square and Red Circle is the shape."]}
    with pytest.raises(UsageError):
        load_descriptions(tmp_path / "missing.json", ["a"])


# ---------------------------------------------------------------------------- learning a confused pair


def confused_task(parts: dict, *, d: int, shots=8, views=9):
    """Four classes; zero-shot sends every image of class 1 to class 2 (its text is closer)."""
    e = torch.eye(d)
    means = torch.stack([e[0], F.normalize(e[1] + 2 * e[4], dim=0), e[2], e[3]])
    text = torch.stack([e[0], e[1], F.normalize(e[2] + 1.5 * e[4], dim=0), e[3]])
    g = torch.Generator().manual_seed(0)

    def draw(n, v):
        y = torch.arange(4).repeat_interleave(n)
        return (means[y][:, None] + 0.05 * torch.randn(len(y), v, d, generator=g)).numpy().astype(
            np.float16
        ), y

    (tr, ytr), (va, yva), (te, yte) = draw(shots, views), draw(4, 1), draw(25, 1)
    data = {
        "images/train_pool/views/coop/pooled": tr,
        "images/val_pool/views/center/pooled": va,
        "text/tip": text.numpy(),
    }
    store = ArrayStore(data, {"views": {"train_pool/coop": views}, "fingerprint_parts": {"backbone": parts}})
    ref = lambda name, pool, y: SplitRef(name, pool, np.arange(len(y)), y, np.arange(len(y)))  # noqa: E731
    info = TaskInfo("synthetic", NAMES, shots, 1, "coop", d, {"arch": "fsl-tiny-rn", "pretrained": "none"})
    task = FitTask(store, info, train=ref("train", "train_pool", ytr), val=ref("val", "val_pool", yva))
    return task, torch.from_numpy(te).float()[:, 0], yte, text


def test_capt_reduces_the_confused_pair_versus_zero_shot():
    backbone = load_backbone("fsl-tiny-rn", "none")
    d = int(backbone.embed_dim)
    task, test_x, test_y, text = confused_task(backbone.fingerprint_parts(), d=d)
    zs_pred = (F.normalize(test_x, dim=-1) @ text.T).argmax(-1)
    zs_pair = int(((test_y == 1) & (zs_pred == 2)).sum())
    assert zs_pair == 25  # zero-shot confuses the whole class
    method = get_method("capt_c").create({"epochs": 10, "batch_size": 8, "lr": 5e-3, "refresh_every": 4})
    fitted = method.fit(task, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        pred = fitted.head.eval()({"pooled": test_x})["capt"].argmax(-1)
    capt_pair = int(((test_y == 1) & (pred == 2)).sum())
    assert capt_pair <= zs_pair // 2, f"capt {capt_pair} vs zero-shot {zs_pair}"
    assert (pred == test_y).float().mean() > (zs_pred == test_y).float().mean()
    sel = fitted.selection
    assert sel["design"].startswith("CAPT-C [PROPOSED]") and sel["bank_initial"]["top_cells"][0]["true"] == 1
    assert sel["local_branch"].startswith("disabled") and len(sel["bank_refreshes"]) >= 1
    assert "green triangle" in sel["pairs"]["blue square"][:1]


# ---------------------------------------------------------------------------- base-to-novel


def test_base_novel_split_and_harmonic_mean():
    base, novel = base_novel_classes(5)
    assert base.tolist() == [0, 1, 2] and novel.tolist() == [3, 4]  # m = ceil(5/2)
    split = SplitRef("test", "test", np.arange(6), torch.tensor([4, 0, 3, 1, 4, 2]), np.arange(10, 16))
    sub = subset_classes(split, novel)
    assert (
        sub.labels.tolist() == [1, 0, 1]
        and sub.rows.tolist() == [0, 2, 4]
        and sub.split_index.tolist() == [10, 12, 14]
    )
    assert harmonic_mean(80.0, 60.0) == pytest.approx(2 * 80 * 60 / 140) and harmonic_mean(0.0, 0.0) == 0.0
    with pytest.raises(UsageError):
        base_novel_classes(1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("capt")
    data = make_demo_dataset(root / "demo")
    api.extract(
        f"imagefolder:{data}",
        model="fsl-tiny-rn",
        pretrained="none",
        for_methods=["capt_c", "linear_probe"],
        cache_dir=root / "cache",
        shots=(2,),
        seeds=(1,),
        workers=0,
        progress=False,
    )
    return dict(
        dataset=f"imagefolder:{data}",
        model="fsl-tiny-rn",
        pretrained="none",
        shots=2,
        seeds=[1],
        cache_dir=root / "cache",
        progress=False,
    )


def record_of(result) -> dict:
    return json.loads((result.run_dir / "record.json").read_text())


@pytest.mark.parametrize("method", ["zero_shot", "linear_probe", "capt_c"])
def test_every_run_record_carries_confusion_analytics(method, tiny, tmp_path):
    options = {"epochs": 2} if method == "capt_c" else {}
    (result,) = api.fit(method, runs_dir=tmp_path, options=options, **tiny)
    record = record_of(result)
    analytics, n = record["metrics"]["analytics"], record["splits"]["test"]["n"]
    assert {"top_pairs", "zero_shot", "resolved", "per_pair"} <= set(analytics)
    assert analytics["resolved"]["confusable"] == round((100 - analytics["zero_shot"]["top1"]) * n / 100)
    if method == "zero_shot":
        assert analytics["resolved"]["resolved"] == 0 and analytics["resolved"]["introduced"] == 0


@pytest.mark.parametrize("method", ["zero_shot", "capt_c"])
def test_base2novel_reports_base_novel_and_hm(method, tiny, tmp_path):
    options = {"epochs": 2} if method == "capt_c" else {}
    (result,) = api.fit(method, runs_dir=tmp_path, options=options, protocol="base2novel", **tiny)
    record = record_of(result)
    m = record["metrics"]
    assert m["classes"] == {"base": [0, 1, 2], "novel": [3, 4]}
    assert record["splits"]["train"]["n"] == 2 * 3 and record["splits"]["test"]["n"] == 3 * 20  # base only
    assert (
        len(m["test"][m["headline"]]["confusion"]) == 3
        and len(m["test_novel"][next(iter(m["test_novel"]))]["confusion"]) == 2
    )
    assert m["hm"] == pytest.approx(
        harmonic_mean(m["base_acc"], m["novel_acc"])
    ) and result.test_acc == pytest.approx(m["hm"])
    assert "analytics_novel" in m and record["protocol"] == "base2novel"
    if method == "capt_c":
        assert record["deviations"][0].startswith("[PROPOSED] CAPT-C [PROPOSED]")


def test_base2novel_is_refused_for_methods_that_cannot_name_new_classes(tiny, tmp_path):
    with pytest.raises(UsageError, match="cannot run --protocol base2novel.*capt"):
        api.fit("linear_probe", runs_dir=tmp_path, protocol="base2novel", **tiny)
