"""capt (METHODS §2.9.2): CAPT's official objective on cached features, pinned on the same tensors with the
formulas re-typed from greatest-gourmet/CAPT ``trainers/sple_promptkd.py``; the CLI run; old records."""

import contextlib
import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from click.testing import CliRunner
from dataset_helpers import extract_argv
from torch import nn

from fsl_cache import api, store_extension
from fsl_cache.backbones import load_backbone
from fsl_cache.backbones.taps import resolve_taps
from fsl_cache.cli import main
from fsl_cache.datasets import make_demo_dataset
from fsl_cache.errors import UsageError
from fsl_cache.inference import Predictor
from fsl_cache.methods import ConfigError, FitTask, get_method
from fsl_cache.methods.capt import Capt, teacher_logits
from fsl_cache.methods.capt_prompts import (
    CaptPromptHead,
    capt_infonce,
    mine_negatives,
    mix_centroids,
    widen_batch,
)
from fsl_cache.methods.capt_visual import PromptedImageEncoder
from fsl_cache.methods.coop import CoOpHead
from fsl_cache.methods.promptkd import kd_loss
from fsl_cache.reports.rows import load_rows
from fsl_cache.runs.record import load_head_tensors, method_of
from fsl_cache.runs.request import task_info
from fsl_cache.splits.protocol import build_splits, split_ref
from fsl_cache.store.reads import read_rows
from fsl_cache.store.store import FeatureStore
from fsl_cache.testing import ArrayStore, fit_method

NAMES = ["red circle", "blue square", "green triangle"]


@pytest.fixture(scope="module")
def backbone():
    return load_backbone("fsl-tiny-rn", "none")


def trained_like(head: CaptPromptHead, seed: int = 0) -> CaptPromptHead:
    """Asymmetric, non-initial prompts (as after training)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.prompt_learner.ctx.add_(0.05 * torch.randn(head.prompt_learner.ctx.shape, generator=g))
        head.deep.copy_(0.05 * torch.randn(head.deep.shape, generator=g))
    return head.eval()


# ---------------------------------------------------------------------------- text side


def retyped_text_features(model, tokenizer, names, ctx, deep) -> torch.Tensor:
    """IVLP by hand: context at positions 1..M, ``deep[i-1]`` replaces them before block i, EOT features."""
    tokens = tokenizer([f"a photo of a {n}." for n in names])  # "a photo of a" is the 4 context tokens
    x = model.token_embedding(tokens).float()
    m = ctx.shape[0]
    x = torch.cat([x[:, :1], ctx.expand(len(names), -1, -1), x[:, 1 + m :]], dim=1)
    x = x + model.positional_embedding
    assert model.transformer.batch_first
    for i, block in enumerate(model.transformer.resblocks):
        if 1 <= i <= len(deep):
            x = torch.cat([x[:, :1], deep[i - 1].expand(len(names), -1, -1), x[:, 1 + m :]], dim=1)
        x = block(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)[torch.arange(len(names)), tokens.argmax(dim=-1)]
    return x @ model.text_projection


@pytest.mark.parametrize("truncate", [True, False])
def test_deep_text_prompts_replace_the_context_before_each_block(backbone, truncate):
    head = trained_like(
        CaptPromptHead(
            backbone.model, backbone.tokenizer, NAMES, text_depth=9, dpc_weight=None, truncate=truncate
        )
    )
    assert head.text_depth == len(backbone.model.transformer.resblocks) == 2  # 9 capped at the tiny depth
    with torch.no_grad():
        expected = retyped_text_features(
            backbone.model, backbone.tokenizer, NAMES, head.prompt_learner.ctx, head.deep
        )
        torch.testing.assert_close(head.text_features(), expected, rtol=1e-5, atol=1e-5)


def test_initial_context_is_a_photo_of_a_and_reproduces_clip(backbone):
    head = CaptPromptHead(backbone.model, backbone.tokenizer, NAMES, text_depth=1).eval()
    tokens = backbone.tokenizer([f"a photo of a {n}." for n in NAMES])
    with torch.no_grad():
        clip = backbone.model.encode_text(tokens)
        torch.testing.assert_close(head.text_features(), clip, rtol=1e-5, atol=1e-5)


def test_dpc_decoupling_reads_the_converse_context(backbone):
    head = trained_like(CaptPromptHead(backbone.model, backbone.tokenizer, NAMES, dpc_weight=0.2))
    pre = head.pre_ctx
    init = CaptPromptHead(backbone.model, backbone.tokenizer, NAMES, dpc_weight=None).prompt_learner.ctx
    torch.testing.assert_close(pre, init)  # pre_ctx is the start (SPLE_INIT: ctx starts there too)
    ctx = head.prompt_learner.ctx
    torch.testing.assert_close(head.context(), (ctx - 0.8 * pre) / 0.2)  # [CODE] (ctx − (1−w)·pre) / w
    fresh = CaptPromptHead(backbone.model, backbone.tokenizer, NAMES, dpc_weight=0.2)
    torch.testing.assert_close(fresh.context(), init)  # the first forward reads the initial context
    # the parameter's gradient is the read context's gradient / w
    fresh.context().sum().backward()
    torch.testing.assert_close(fresh.prompt_learner.ctx.grad, torch.full_like(init, 1 / 0.2))


def test_visual_depth_0_equals_coops_text_path(backbone):
    """Same prompts → same logits: capt (text_depth 1, DPC on) against CoOp's head with its read context."""
    capt = trained_like(
        CaptPromptHead(backbone.model, backbone.tokenizer, NAMES, text_depth=1, dpc_weight=0.2)
    )
    coop = CoOpHead(backbone.model, backbone.tokenizer, NAMES, n_ctx=4, scale=100.0).eval()
    with torch.no_grad():
        coop.prompt_learner.ctx.copy_(capt.context())
    x = {
        "pooled": torch.randn(
            6, backbone.model.text_projection.shape[1], generator=torch.Generator().manual_seed(1)
        )
    }
    with torch.no_grad():
        torch.testing.assert_close(capt(x), coop(x), rtol=1e-5, atol=1e-4)


# ---------------------------------------------------------------------------- visual side


@pytest.fixture(scope="module")
def vit():
    return load_backbone("fsl-tiny-vit", "none")


def images(bb, n: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, bb.image_size, bb.image_size, generator=torch.Generator().manual_seed(seed))


@contextlib.contextmanager
def prompted_backbone(visual, prompts: torch.Tensor, *, at_end: bool):
    """open_clip's own ViT forward with IVLP prompts hooked in: set 0 joins the tokens entering ``ln_pre``,
    set i replaces them before block i; ``at_end`` is the code's layout (appended after the patches)."""
    n = prompts.shape[1]

    def put(x, p, replace):
        p = p.expand(len(x), -1, -1)
        if at_end:
            return torch.cat([x[:, : len(x[0]) - n] if replace else x, p], dim=1)
        return torch.cat([x[:, :1], p, x[:, 1 + n :] if replace else x[:, 1:]], dim=1)

    hooks = [visual.ln_pre.register_forward_pre_hook(lambda m, a: (put(a[0], prompts[0], False),))]
    for i in range(1, len(prompts)):
        block = visual.transformer.resblocks[i]
        hooks.append(
            block.register_forward_pre_hook(
                lambda m, a, kw, i=i: ((put(a[0], prompts[i], True),) + a[1:], kw), with_kwargs=True
            )
        )
    try:
        yield
    finally:
        for h in hooks:
            h.remove()


def test_cached_tokens_without_prompts_reproduce_the_pooled_embedding(vit):
    taps = vit.encode_taps(images(vit), ["pooled", "vit/tokens"])
    assert taps["vit/tokens"].shape[1:] == vit.tap_shape("vit/tokens") == (65, 128)
    encoder = PromptedImageEncoder(vit.model.visual)
    with torch.no_grad():
        torch.testing.assert_close(encoder(taps["vit/tokens"]), taps["pooled"], rtol=1e-4, atol=1e-4)
    assert "vit/tokens" not in load_backbone("fsl-tiny-rn", "none").taps()


@pytest.mark.parametrize("at_end", [False, True])
def test_visual_prompts_on_cached_tokens_equal_the_backbone_run_on_the_images(vit, at_end):
    """Also pins the deviation note: after the class token or appended (the code) gives the same features."""
    x = images(vit, seed=1)
    prompts = 0.5 * torch.randn(3, 4, 128, generator=torch.Generator().manual_seed(2))
    tokens = vit.encode_taps(x, ["vit/tokens"])["vit/tokens"]
    encoder = PromptedImageEncoder(vit.model.visual)
    with torch.no_grad(), prompted_backbone(vit.model.visual, prompts, at_end=at_end):
        expected = vit.model.encode_image(x)
    with torch.no_grad():
        torch.testing.assert_close(encoder(tokens, prompts), expected, rtol=1e-5, atol=1e-5)


def test_visual_prompts_change_the_features_and_get_gradients(vit):
    head = CaptPromptHead(vit.model, vit.tokenizer, NAMES, text_depth=1, visual_depth=9)
    assert head.visual_depth == 9 and head.visual_prompts.shape == (9, 4, 128)
    assert head.inputs == ("pooled", "vit/tokens")
    assert 0.015 < float(head.visual_prompts.detach().std()) < 0.025  # [CODE] N(0, 0.02)
    taps = vit.encode_taps(images(vit), ["pooled", "vit/tokens"])
    f = head.image_features(taps)
    assert not torch.allclose(f, F.normalize(taps["pooled"], dim=-1), atol=1e-3)
    head.train()(taps).logsumexp(dim=1).sum().backward()
    grad = head.visual_prompts.grad
    assert grad is not None and bool((grad.flatten(1).abs().sum(1) > 0).all())  # every block's set
    assert not any(k.startswith("image_encoder.") for k in head.saved_state())
    assert "visual_prompts" in head.saved_state()


# ---------------------------------------------------------------------------- mining, widening


def test_mining_drops_the_label_and_every_class_already_in_the_batch():
    c = 12
    teacher = torch.zeros(2, c)
    teacher[0, [3, 5, 0, 7, 1, 9, 2, 4]] = torch.arange(8, 0, -1).float()  # top-8 of sample 0, in order
    teacher[1, [5, 6, 7, 8, 10, 11, 1, 2]] = torch.arange(8, 0, -1).float()
    labels = torch.tensor([0, 1])
    mined = mine_negatives(teacher, labels, topk=8, fill=2, generator=torch.Generator().manual_seed(0))
    assert mined[0] == [3, 5, 7, 9, 2, 4]  # minus label 0 and in-batch class 1
    assert mined[1] == [6, 8, 10, 11]  # minus 5, 7 (mined for sample 0), 1 (label), 2 (mined for sample 0)
    assert mine_negatives(teacher, labels, topk=3, fill=0, generator=torch.Generator())[0] == [3, 5]


def test_mining_fills_with_random_classes_outside_the_batch_never_class_0():
    c = 6
    teacher = torch.zeros(3, c)
    teacher[:, 2] = 5.0  # every sample's top-2 are {2, 1}
    teacher[:, 1] = 4.0
    labels = torch.tensor([1, 2, 3])
    for seed in range(30):
        mined = mine_negatives(teacher, labels, topk=2, fill=2, generator=torch.Generator().manual_seed(seed))
        flat = [n for negs in mined for n in negs]
        assert all(0 < n < c and n not in (1, 2, 3) for n in flat)  # never class 0, never in the batch
        assert len(flat) == len(set(flat)) and all(len(negs) <= 2 for negs in mined)
    # with room to fill, two negatives per sample: classes 4 and 5 for sample 0, then none are left
    mined = mine_negatives(teacher, labels, topk=2, fill=2, generator=torch.Generator().manual_seed(0))
    assert sorted(mined[0]) == [4, 5] and mined[1] == [] and mined[2] == []


def test_widening_appends_one_bank_image_of_each_negative_after_its_sample():
    bank_labels = torch.tensor([2, 0, 1, 2, 1, 0, 2])
    bank = torch.arange(7).float()[:, None].repeat(1, 3)  # row r holds r
    features = -torch.ones(2, 3) * torch.tensor([[1.0], [2.0]])
    labels = torch.tensor([0, 1])
    image, widened = widen_batch(
        features, labels, [[2, 1], [0]], bank, bank_labels, generator=torch.Generator().manual_seed(0)
    )
    assert widened.tolist() == [0, 2, 1, 1, 0] and image.shape == (5, 3)  # B·(1+n) rows, sample first
    torch.testing.assert_close(image[0], features[0])
    torch.testing.assert_close(image[3], features[1])
    for row in (1, 2, 4):
        source = int(image[row, 0])
        assert bank_labels[source] == widened[row]  # a bank image of the mined class


# ---------------------------------------------------------------------------- semantic guidance, loss


def test_centroid_mix_is_a_fresh_linear_5_to_n_on_the_centroids():
    g = torch.Generator().manual_seed(3)
    text, centroids = torch.randn(7, 16, generator=g), F.normalize(torch.randn(5, 16, generator=g), dim=-1)
    mixed = mix_centroids(text, centroids, scale=1.0, generator=torch.Generator().manual_seed(9))
    replay = torch.Generator().manual_seed(9)
    proj = nn.Linear(5, 7)  # [CODE] proj = nn.Linear(topk.size(0), text.size(0)); text + proj(topk.T).T
    with torch.no_grad():
        proj.weight.copy_((torch.rand(7, 5, generator=replay) * 2 - 1) / 5**0.5)
        proj.bias.copy_((torch.rand(7, generator=replay) * 2 - 1) / 5**0.5)
        torch.testing.assert_close(mixed, text + proj(centroids.T).T)
    assert proj.weight.abs().max() <= 1 / 5**0.5  # torch's Linear init bound 1/sqrt(fan_in)
    half = mix_centroids(text, centroids, scale=0.5, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(half - text, 0.5 * (mixed - text))
    draws = [mix_centroids(text, centroids, generator=torch.Generator().manual_seed(s)) for s in (1, 2)]
    assert not torch.allclose(draws[0], draws[1])  # re-drawn every forward


def test_infonce_is_the_symmetric_diagonal_cross_entropy():
    g = torch.Generator().manual_seed(4)
    image = F.normalize(torch.randn(5, 8, generator=g), dim=-1)
    text = torch.randn(5, 8, generator=g)
    s = 100.0 * image @ text.T
    i2t = -sum(torch.log_softmax(s[i], 0)[i] for i in range(5)) / 5
    t2i = -sum(torch.log_softmax(s[:, i], 0)[i] for i in range(5)) / 5
    torch.testing.assert_close(capt_infonce(image, text, scale=100.0), (i2t + t2i) / 2)


def test_recipe_defaults_are_the_official_config_and_visual_prompts_add_the_token_tap():
    cfg = get_method("capt").create().config
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.optimizer, cfg.schedule) == (
        20,
        4,
        2e-3,
        "sgd",
        "cosine_epoch",
    )
    assert (cfg.warmup, cfg.warmup_lr, cfg.n_ctx, cfg.ctx_init, cfg.text_depth) == (
        1,
        1e-5,
        4,
        "a photo of a",
        9,
    )
    assert (cfg.dpc, cfg.dpc_weight, cfg.topk, cfg.fill, cfg.centroids, cfg.centroid_scale) == (
        True,
        0.2,
        8,
        2,
        5,
        1.0,
    )
    assert (cfg.visual_depth, cfg.visual_prompts) == (0, 4)
    assert get_method("capt").create({"visual_depth": "9"}).config.visual_depth == 9
    assert "vit/tokens" not in get_method("capt").needs("demo", {"visual_depth": "0"}).eval_taps
    assert get_method("capt").needs("demo", {"visual_depth": "9"}).eval_taps == ("pooled", "vit/tokens")
    with pytest.raises(ConfigError, match="visual_prompts"):
        get_method("capt").create({"visual_prompts": "0"})


# ---------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("capt")
    data = make_demo_dataset(root / "demo")
    api.extract(
        f"imagefolder:{data}",
        model="fsl-tiny-vit",
        pretrained="none",
        for_methods=["capt"],
        cache_dir=root / "cache",
        shots=(4,),
        seeds=(1,),
        workers=0,
        progress=False,
    )
    return root, data


def test_cli_fit_capt_base2novel_records_mode_teacher_and_deviations(demo, tmp_path):
    root, data = demo
    args = [
        "fit",
        "capt",
        "--dataset",
        f"imagefolder:{data}",
        "--model",
        "fsl-tiny-vit",
        "--pretrained",
        "none",
    ]
    args += ["--shots", "4", "--seed", "1", "--protocol", "base2novel", "--cache-dir", str(root / "cache")]
    args += ["--runs-dir", str(tmp_path), "-o", "epochs=1", "--json"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    (path,) = tmp_path.glob("*/*/capt/*/record.json")
    record = json.loads(path.read_text())
    selection, metrics = record["selection"], record["metrics"]
    assert selection["mode"].startswith("visual_depth=0") and "zero-shot" in selection["teacher"]
    assert selection["sentences"]["source"] == "templates" and "few-shot train split" in selection["bank"]
    assert selection["mean_widened_batch"] > 4  # the batch grew by its mined negatives
    assert any("Diff-Manner Adapter" in d for d in record["deviations"])
    assert metrics["hm"] == pytest.approx(
        2 * metrics["base_acc"] * metrics["novel_acc"] / (metrics["base_acc"] + metrics["novel_acc"])
    )
    assert record["head"]["class"] == "CaptPromptHead"


def test_fit_visual_depth_1_completes_the_store_records_the_mode_and_predicts(demo, tmp_path):
    root, data = demo
    fit = dict(dataset=f"imagefolder:{data}", pretrained="none", shots=4, seeds=[1], progress=False)
    fit.update(cache_dir=root / "cache", runs_dir=tmp_path)
    (run,) = api.fit("capt", model="fsl-tiny-vit", options={"epochs": 1, "visual_depth": 1}, **fit)
    record = json.loads((run.run_dir / "record.json").read_text())
    assert record["selection"]["mode"].startswith("visual_depth=1: deep visual prompts")
    assert record["head"]["inputs"] == ["pooled", "vit/tokens"]
    store = FeatureStore.open(record["store"]["path"])
    try:  # fit added the tokens to the store: train (the bank), val and test center views, train coop views
        assert all(
            store.has(f"images/{p}/views/center/vit/tokens") for p in ("train_pool", "val_pool", "test")
        )
        assert store.arrays["images/train_pool/views/coop/vit/tokens"]["shape"][1:] == [21, 65, 128]
        tokens = store.arrays["images/test/views/center/vit/tokens"]
        assert tokens["dtype"] == "float16" and tuple(tokens["shape"][-2:]) == (65, 128)
    finally:
        store.close()
    images = sorted((data / "test").glob("*/*.png"))[:3]
    logits = Predictor.load(run.run_dir).logits(images)[record["metrics"]["headline"]]
    assert np.isfinite(logits.numpy()).all()
    exported = Predictor.load(api.export(run.run_dir, tmp_path / "export")).logits(images)
    torch.testing.assert_close(exported[record["metrics"]["headline"]], logits)


def test_extract_with_the_fits_option_stores_the_tokens_up_front(demo, tmp_path):
    """``extract -o visual_depth=N`` on the GPU node leaves ``fit`` nothing to add where no images are."""
    _, data = demo
    args = extract_argv(data, tmp_path, model="fsl-tiny-vit", for_methods="capt", views=1, shots=4, seeds=1)
    result = CliRunner().invoke(main, [*args, "-o", "visual_depth=9", "--workers", "0", "--json"])
    assert result.exit_code == 0, result.output
    store = FeatureStore.open(json.loads(result.stdout.splitlines()[-1])["store"])
    try:
        assert all(
            store.has(f"images/{p}/views/center/vit/tokens") for p in ("train_pool", "val_pool", "test")
        )
        assert store.has("images/train_pool/views/coop/vit/tokens")
    finally:
        store.close()
    result = CliRunner().invoke(main, [*args, "-o", "visual_dpth=9"])
    assert result.exit_code == 2 and "Did you mean visual_depth" in result.output


def test_grid_with_visual_prompts_extracts_the_tokens_its_option_needs(demo, tmp_path, monkeypatch):
    """What capt reads hangs on ``visual_depth``: ``grid`` completes a fresh store with the tokens before its
    runs, in one extraction for both values."""
    _, data = demo
    extractions = []
    extract = store_extension._extract
    monkeypatch.setattr(
        store_extension, "_extract", lambda *a, **k: extractions.append(k["options"]) or extract(*a, **k)
    )
    sweep = api.grid(
        ["capt"],
        datasets=[f"imagefolder:{data}"],
        shots=[4],
        seeds=[1],
        options={"epochs": [1], "visual_depth": [0, 1]},
        model="fsl-tiny-vit",
        pretrained="none",
        yes=True,
        cache_dir=tmp_path / "cache",
        runs_dir=tmp_path / "runs",
    )
    assert sweep.count("done") == 2, [o.error for o in sweep.outcomes]
    modes = {
        json.loads(p.read_text())["selection"]["mode"][:14] for p in tmp_path.glob("runs/**/record.json")
    }
    assert modes == {"visual_depth=0", "visual_depth=1"}
    (options,) = extractions
    assert options.method_options == ({"epochs": 1, "visual_depth": 0}, {"epochs": 1, "visual_depth": 1})
    (path,) = tmp_path.glob("cache/*/*")
    store = FeatureStore.open(path)
    try:
        assert store.has("images/test/views/center/vit/tokens")
    finally:
        store.close()


def test_resnet_stores_refuse_visual_prompts_in_one_line():
    task = SimpleNamespace(info=None, store=ArrayStore({}, {"backbone": {"kind": "rn", "arch": "RN50"}}))
    with pytest.raises(UsageError, match="visual_depth=1 prompts ViT blocks; .* of RN50: use visual_depth=0"):
        fit_method("capt", task, {"visual_depth": "1"})
    assert resolve_taps(("pooled", "vit/tokens"), kind="rn", dense_tap="rn/layer4", vit_blocks=()) == (
        "pooled",
    )


def test_old_capt_records_load_report_and_predict_as_capt_c(demo, tmp_path):
    """A run recorded as 'capt' before the rename (head CaptHead) is a capt_c run."""
    root, data = demo
    (run,) = api.fit(
        "capt_c",
        dataset=f"imagefolder:{data}",
        model="fsl-tiny-vit",
        pretrained="none",
        shots=4,
        seeds=[1],
        options={"epochs": 1},
        cache_dir=root / "cache",
        runs_dir=tmp_path,
        progress=False,
    )
    path = run.run_dir / "record.json"
    record = json.loads(path.read_text())
    record["method"] = "capt"  # as written before issue 13
    path.write_text(json.dumps(record))
    assert (
        method_of(record) == "capt_c"
        and method_of({"method": "capt", "head": {"class": "CaptPromptHead"}}) == "capt"
    )
    (row,) = load_rows(tmp_path)
    assert row.method == "capt_c"
    predictor = Predictor.load(run.run_dir)
    assert predictor.bundle.method == "capt_c"
    image = next((data / "test").glob("*/*.png"))
    assert np.isfinite(predictor.logits([image])[record["metrics"]["headline"]].numpy()).all()


def test_teacher_logits_come_from_another_store_of_the_dataset(demo, tmp_path):
    root, data = demo
    fit = dict(
        dataset=f"imagefolder:{data}",
        model="fsl-tiny-vit",
        pretrained="none",
        shots=4,
        seeds=[1],
        cache_dir=root / "cache",
        runs_dir=tmp_path,
        progress=False,
    )
    with pytest.raises(
        UsageError, match="No fsl-tiny-rn/none store of .*fsl-cache extract --dataset .* --model fsl-tiny-rn"
    ):
        api.fit("capt", options={"epochs": 1, "teacher": "fsl-tiny-rn/none"}, **fit)
    api.extract(
        f"imagefolder:{data}",
        model="fsl-tiny-rn",
        pretrained="none",
        for_methods=["zero_shot"],
        cache_dir=root / "cache",
        shots=(4,),
        seeds=(1,),
        workers=0,
        progress=False,
    )
    (run,) = api.fit("capt", options={"epochs": 1, "teacher": "fsl-tiny-rn/none"}, **fit)
    record = json.loads((run.run_dir / "record.json").read_text())
    assert record["selection"]["teacher"].startswith("fsl-tiny-rn/none zero-shot logits")
    (zs,) = api.fit("zero_shot", **{**fit, "model": "fsl-tiny-rn"})
    store = FeatureStore.open(json.loads((zs.run_dir / "record.json").read_text())["store"]["path"])
    try:
        student = FeatureStore.open(record["store"]["path"])
        splits = build_splits(student, Capt, shots=4, seed=1, protocol="coop")
        info = task_info(student, shots=4, seed=1, protocol="coop")
        task = FitTask(student, info, train=splits.train, val=splits.val)
        logits = teacher_logits(store, task, templates="tip")
        ref = split_ref(store, "train", "train_pool", splits.train.split_index)
        cached = torch.from_numpy(
            read_rows(store, "images/train_pool/views/center/pooled", ref.rows)
        ).float()[:, 0]
        text = torch.from_numpy(read_rows(store, "text/tip", None)).float()
        torch.testing.assert_close(logits, 100 * F.normalize(cached, dim=-1) @ text.T, rtol=1e-4, atol=1e-3)
        student.close()
    finally:
        store.close()


# ---------------------------------------------------------------------------- promptkd and capt -o init


def test_kd_loss_is_the_codes_summed_kl_over_numel():
    g = torch.Generator().manual_seed(5)
    student, teacher = torch.randn(4, 6, generator=g), 3 * torch.randn(4, 6, generator=g)
    for t in (1.0, 2.0):
        p_t, p_s = (teacher / t).softmax(1), (student / t).softmax(1)
        expected = 1000 * t * t * (p_t * (p_t.log() - p_s.log())).sum() / student.numel()
        torch.testing.assert_close(kd_loss(student, teacher, temperature=t, weight=1000), expected)


def test_capt_starts_from_a_promptkd_runs_prompts(demo, tmp_path):
    root, data = demo
    fit = dict(
        dataset=f"imagefolder:{data}",
        model="fsl-tiny-vit",
        pretrained="none",
        shots=4,
        seeds=[1],
        cache_dir=root / "cache",
        runs_dir=tmp_path,
        progress=False,
    )
    (kd,) = api.fit("promptkd", options={"epochs": 1}, **fit)
    kd_state = load_head_tensors(kd.run_dir)
    (capt,) = api.fit("capt", options={"epochs": 0, "init": str(kd.run_dir)}, **fit)  # the start, untrained
    state = load_head_tensors(capt.run_dir)
    torch.testing.assert_close(state["prompt_learner.ctx"], kd_state["prompt_learner.ctx"])
    torch.testing.assert_close(state["pre_ctx"], kd_state["prompt_learner.ctx"])  # DPC reads the start first
    torch.testing.assert_close(state["deep"], kd_state["deep"])
    record = json.loads((capt.run_dir / "record.json").read_text())
    assert record["selection"]["init"] == str(kd.run_dir)
    (zs,) = api.fit("zero_shot", **fit)
    with pytest.raises(UsageError, match="takes a promptkd, coop or capt run"):
        api.fit("capt", options={"epochs": 0, "init": str(zs.run_dir)}, **fit)


def test_descriptions_in_capts_common_format_feed_the_centroids(demo, tmp_path):
    root, data = demo
    folder = tmp_path / "descriptions"
    folder.mkdir()
    sentences = {
        "red_circle": ["The commonality between red circle and blue square is that both are flat shapes."],
        "Blue Square": ["The commonality between blue square and red circle is their sharp colour."],
        "unicorn": ["not a class of this dataset"],
    }
    (folder / "demo_prompt_common.json").write_text(json.dumps(sentences))
    (run,) = api.fit(
        "capt",
        dataset=f"imagefolder:{data}",
        model="fsl-tiny-vit",
        pretrained="none",
        shots=4,
        seeds=[1],
        options={"epochs": 1, "descriptions": str(folder)},
        cache_dir=root / "cache",
        runs_dir=tmp_path / "runs",
        progress=False,
    )
    note = json.loads((run.run_dir / "record.json").read_text())["selection"]["sentences"]
    assert note["source"] == "descriptions" and (
        note["classes_from_file"],
        note["classes_from_templates"],
    ) == (2, 3)
    (folder / "other_prompt_common.json").write_text("{}")
    with pytest.raises(UsageError, match="holds 2 \\*_prompt_common.json files"):
        api.fit(
            "capt",
            dataset=f"imagefolder:{data}",
            model="fsl-tiny-vit",
            pretrained="none",
            shots=4,
            seeds=[1],
            options={"epochs": 1, "descriptions": str(folder)},
            cache_dir=root / "cache",
            runs_dir=tmp_path / "runs2",
            progress=False,
        )
