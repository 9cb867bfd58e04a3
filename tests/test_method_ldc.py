"""LDC (METHODS §2.6): each module against its equation, the β search, the loss, cached-feature LDC
against LDC computed from images through the frozen backbone, training, and runs through the engine."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from open_clip.modified_resnet import AttentionPool2d
from PIL import Image

from fsl_cache import api
from fsl_cache.backbones import load_backbone
from fsl_cache.backbones.taps import derive, derived_tap
from fsl_cache.backbones.views import ViewRenderer
from fsl_cache.datasets import make_demo_dataset
from fsl_cache.errors import UsageError
from fsl_cache.evaluation.scoring import predict
from fsl_cache.methods import ConfigError, get_method
from fsl_cache.methods.ldc import LDCHead, build_trunk, ldc_loss, ldc_taps, search_split
from fsl_cache.methods.ldc_modules import (
    ALF,
    ICD,
    ConvAdapter,
    RNMultiLevel,
    TokenAdapter,
    ViTMultiLevel,
    beta_grid,
    fuse_levels,
    mlp,
    search_beta,
)
from fsl_cache.methods.pooling import AttnPoolToken0
from fsl_cache.runs.record import load_head_tensors
from fsl_cache.store.store import FeatureStore
from fsl_cache.training import MemoryViews, TrainData, seeded_init, train

TINY = ("fsl-tiny-rn", "fsl-tiny-vit")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The demo dataset and one store per tiny backbone with LDC's exact and lite taps (3 ldc views)."""
    root = tmp_path_factory.mktemp("ldc")
    data = make_demo_dataset(root / "demo")
    for model in TINY:
        api.extract(
            f"imagefolder:{data}",
            model=model,
            pretrained="none",
            for_methods=["ldc", "ldc_lite"],
            views=3,
            shots=(1, 2),
            seeds=(1,),
            workers=0,
            progress=False,
            cache_dir=root / "cache",
        )
    return data, root / "cache"


def randomize_norms(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Non-trivial BatchNorm running statistics and affine parameters, so eval mode is really tested."""
    for m in module.modules():
        if isinstance(m, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            n = m.num_features
            m.running_mean.copy_(0.1 * torch.randn(n, generator=generator))
            m.running_var.copy_(0.5 + torch.rand(n, generator=generator))
            m.weight.data.copy_(1 + 0.2 * torch.randn(n, generator=generator))
            m.bias.data.copy_(0.1 * torch.randn(n, generator=generator))


def bn_eval(x: torch.Tensor, bn, dim: int = 1) -> torch.Tensor:
    shape = [1] * x.ndim
    shape[dim] = -1
    view = lambda t: t.view(shape)  # noqa: E731
    return (x - view(bn.running_mean)) / torch.sqrt(view(bn.running_var) + bn.eps) * view(bn.weight) + view(
        bn.bias
    )


def mlp_by_hand(seq, x: torch.Tensor) -> torch.Tensor:
    """``W2 · ReLU(BN(W1 · x))`` with eval-mode BatchNorm, from the module's own weights."""
    return bn_eval(x @ seq[0].weight.T, seq[1]).clamp(min=0) @ seq[3].weight.T


# ---------------------------------------------------------------------------- modules = equations


@torch.no_grad()
def test_rn_adapter_is_conv_bn_relu_avgpool():
    g = torch.Generator().manual_seed(0)
    adapter = ConvAdapter(3, 5, pool=4).eval()
    randomize_norms(adapter, g)
    x = torch.randn(2, 3, 8, 8, generator=g)
    conv = torch.einsum("oc,bchw->bohw", adapter[0].weight[:, :, 0, 0], x)
    y = bn_eval(conv, adapter[1]).clamp(min=0)
    expected = y.reshape(2, 5, 2, 4, 2, 4).mean(dim=(3, 5))  # AvgPool2d(4): 8×8 → 2×2
    torch.testing.assert_close(adapter(x), expected)
    assert isinstance(ConvAdapter(3, 5, pool=1)[3], torch.nn.Identity)


@torch.no_grad()
def test_vit_adapter_is_linear_layernorm_relu_then_mean_over_all_tokens():
    g = torch.Generator().manual_seed(1)
    adapter = TokenAdapter(6)
    adapter.norm.weight.data.copy_(torch.randn(6, generator=g))
    adapter.norm.bias.data.copy_(torch.randn(6, generator=g))
    x = torch.randn(2, 5, 6, generator=g)  # 5 tokens, CLS first
    h = x @ adapter.linear.weight.T
    h = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + 1e-5)
    y = (h * adapter.norm.weight + adapter.norm.bias).clamp(min=0)
    torch.testing.assert_close(adapter(x), y.mean(dim=1))  # CLS included
    lite = TokenAdapter(6, mean_tokens=False)
    lite.load_state_dict(adapter.state_dict())
    torch.testing.assert_close(lite(x[:, 0]), y[:, 0])


def test_fusions_weight_the_levels():
    levels = [torch.full((1, 2), float(k)) for k in (1, 2, 3, 4)]
    torch.testing.assert_close(fuse_levels(levels, "wf"), torch.full((1, 2), 0.1 + 0.4 + 0.9 + 1.6))
    torch.testing.assert_close(fuse_levels(levels, "mean"), torch.full((1, 2), 2.5))


@torch.no_grad()
def test_mlp_icd_and_alf_follow_their_equations():
    g = torch.Generator().manual_seed(2)
    c, d = 3, 4
    icd, alf = ICD(c, d).eval(), ALF(d).eval()
    randomize_norms(icd, g), randomize_norms(alf, g)
    s_zs, z = 10 * torch.randn(5, c, generator=g), torch.randn(5, d, generator=g)
    expected_icd = s_zs + mlp_by_hand(icd.a3, mlp_by_hand(icd.a1, s_zs) + mlp_by_hand(icd.a2, z))
    torch.testing.assert_close(icd(s_zs, z), expected_icd)
    s_maf = torch.randn(5, c, generator=g)
    w = torch.sigmoid(mlp_by_hand(alf.gate, z))
    assert w.shape == (5, 1)
    torch.testing.assert_close(alf(s_maf, expected_icd, z), w * s_maf + (1 - w) * expected_icd)
    layers = mlp(d, 7, c)
    assert [type(m).__name__ for m in layers] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert layers[0].bias is None and layers[3].bias is None


@torch.no_grad()
def test_rn_trunk_pools_the_weighted_fusion_through_the_frozen_attnpool():
    g = torch.Generator().manual_seed(3)
    pool = AttentionPool2d(2, 8, 2, 6)
    trunk = RNMultiLevel([2, 4, 4, 8], [8, 4, 2, 2], attnpool=pool, embed_dim=6, fuse="wf").eval()
    randomize_norms(trunk, g)
    maps = [torch.randn(3, c, s, s, generator=g) for c, s in zip([2, 4, 4, 8], [8, 4, 2, 2])]
    adapted = [a(x) for a, x in zip(trunk.adapters, maps)]
    assert [a.shape for a in adapted] == [(3, 8, 2, 2)] * 4
    expected = pool(0.1 * adapted[0] + 0.2 * adapted[1] + 0.3 * adapted[2] + 0.4 * adapted[3])
    torch.testing.assert_close(trunk(maps), expected)
    assert not any(p.requires_grad for p in trunk.frozen.parameters())
    trunk.train()
    assert not trunk.frozen.training and trunk.adapters[0].training


def test_gradients_flow_through_the_frozen_attnpool_to_the_adapters():
    pool = AttentionPool2d(2, 8, 2, 6)
    trunk = RNMultiLevel([2, 4, 4, 8], [8, 4, 2, 2], attnpool=pool, embed_dim=6, fuse="wf").train()
    maps = [torch.randn(3, c, s, s) for c, s in zip([2, 4, 4, 8], [8, 4, 2, 2])]
    trunk(maps).sum().backward()
    assert all(a[0].weight.grad is not None and a[0].weight.grad.abs().sum() > 0 for a in trunk.adapters)
    assert all(p.grad is None for p in pool.parameters())


def test_the_frozen_attnpool_computes_token_0_only_with_the_full_pools_output_and_input_gradient():
    torch.manual_seed(5)
    pool = AttentionPool2d(7, 64, 4, 32)
    token0 = AttnPoolToken0(pool)
    x = torch.randn(3, 64, 7, 7, requires_grad=True)
    target = torch.randn(3, 32)
    (pool(x) * target).sum().backward()
    expected, x.grad = x.grad, None
    out = token0(x)
    (out * target).sum().backward()
    torch.testing.assert_close(out, pool(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(x.grad, expected, rtol=1e-4, atol=1e-6)


@torch.no_grad()
def test_vit_trunk_projects_the_fusion_without_ln_post():
    g = torch.Generator().manual_seed(4)
    proj = torch.randn(6, 4, generator=g)
    trunk = ViTMultiLevel(6, proj=proj, fuse="wf").eval()
    blocks = [torch.randn(2, 5, 6, generator=g) for _ in range(4)]
    adapted = [a(x) for a, x in zip(trunk.adapters, blocks)]
    expected = (0.1 * adapted[0] + 0.2 * adapted[1] + 0.3 * adapted[2] + 0.4 * adapted[3]) @ proj
    torch.testing.assert_close(trunk(blocks), expected)
    mean = ViTMultiLevel(6, proj=proj, fuse="mean").eval()
    mean.adapters.load_state_dict(trunk.adapters.state_dict())
    torch.testing.assert_close(mean(blocks), sum(adapted) / 4 @ proj)


RN50 = dict(channels=[256, 512, 1024, 2048], sides=[56, 28, 14, 7], dim=1024)
VITB16 = dict(width=768, tokens=197, dim=512)


@pytest.fixture(scope="module")
def rn50_attnpool():
    return AttentionPool2d(7, 2048, 32, 1024)  # random weights, RN50's shapes


def real_head(kind: str, fuse: str, num_classes: int, attnpool) -> LDCHead:
    if kind == "rn":
        shapes = [(c, s, s) for c, s in zip(RN50["channels"], RN50["sides"])]
        frozen, dim, hidden = attnpool, RN50["dim"], RN50["dim"]
    else:
        shapes = [(VITB16["tokens"], VITB16["width"])] * 4
        frozen, dim, hidden = torch.randn(VITB16["width"], VITB16["dim"]), VITB16["dim"], 2048
    trunk = build_trunk(kind, shapes, frozen, embed_dim=dim, fuse=fuse, lite=False)
    text = F.normalize(torch.randn(num_classes, dim), dim=-1)
    return LDCHead(trunk, taps=("a", "b", "c", "d"), text=text, scale=100.0, maf_hidden=hidden)


@pytest.mark.parametrize("kind", ["rn", "vit"])
@pytest.mark.parametrize("fuse", ["wf", "mean", "lf"])
def test_real_sizes_shapes_and_parameter_counts(kind, fuse, rn50_attnpool):
    c = 10
    head = real_head(kind, fuse, c, rn50_attnpool).eval()
    trainable = sum(p.numel() for p in head.parameters() if p.requires_grad)
    # METHODS §2.6.5: RN50 WF 14,183,424 + 3,072·C, LF adds 10.49 M; ViT-B/16 WF 4,733,440 + 3,072·C, LF adds 2.95 M
    base = 14_183_424 if kind == "rn" else 4_733_440
    extra = {"rn": 10_489_856, "vit": 2_950_656}[kind] if fuse == "lf" else 0
    assert trainable == base + 3072 * c + extra
    if kind == "rn":
        x = {"pooled": torch.randn(2, 1024)} | {
            t: torch.randn(2, ch, s, s) for t, ch, s in zip("abcd", RN50["channels"], RN50["sides"])
        }
    else:
        x = {"pooled": torch.randn(2, 512)} | {t: torch.randn(2, 197, 768) for t in "abcd"}
    with torch.no_grad():
        z = head.maf([x[t] for t in "abcd"])
        out = head(x)
    assert z.shape == (2, RN50["dim"] if kind == "rn" else VITB16["dim"])
    assert list(out) == ["main", "alf", "maf", "icd", "zero_shot"] and all(
        v.shape == (2, c) for v in out.values()
    )
    assert not any(".frozen." in k for k in head.saved_state())


# ---------------------------------------------------------------------------- loss and β search


def test_loss_is_three_cross_entropies_plus_two_l1_terms():
    g = torch.Generator().manual_seed(5)
    out = {k: torch.randn(6, 4, generator=g, requires_grad=True) for k in ("maf", "icd", "alf")}
    out["zero_shot"] = (100 * torch.randn(6, 4, generator=g)).requires_grad_()
    y = torch.randint(0, 4, (6,), generator=g)
    lam = (1.0, 0.5, 2.0, 0.25, 3.0)
    ce = [F.cross_entropy(out[k], y) for k in ("maf", "icd", "alf")]
    l1 = [(out[k] - out["zero_shot"]).abs().mean() for k in ("maf", "icd")]
    expected = ce[0] + 0.5 * ce[1] + 2 * ce[2] + 0.25 * l1[0] + 3 * l1[1]
    loss = ldc_loss(out, y, lambdas=lam)
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert all(out[k].grad is not None for k in ("maf", "icd", "alf"))
    assert out["zero_shot"].grad is None  # the zero-shot target carries no gradient


def _official_search_hp(mlp_logits, ada_logits, labels, start=0, end=1, step=50):
    """ldc_train.py Eval.search_hp, transcribed."""
    beta_list = [i * (end - start) / step + start for i in range(step + 1)]
    best_beta, best_acc = start, 0.0
    for beta in beta_list:
        acc = (
            float((beta * mlp_logits + (1 - beta) * ada_logits).argmax(-1).eq(labels).sum())
            / len(labels)
            * 100.0
        )
        if acc > best_acc:
            best_acc, best_beta = acc, beta
    return best_beta, best_acc


def test_beta_search_picks_the_first_strict_maximum():
    grid = beta_grid()
    assert len(grid) == 51 and grid[0] == 0.0 and grid[1] == pytest.approx(0.02) and grid[-1] == 1.0
    # sample 0 needs beta > 1/3 (MAF right), sample 1 needs beta < 2/3 (ICD right): 100 % on (1/3, 2/3)
    maf = torch.tensor([[0.0, 2.0], [0.0, 1.0]])
    icd = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    beta, acc = search_beta(maf, icd, torch.tensor([1, 0]))
    assert (beta, acc) == (pytest.approx(0.34), 100.0)  # the first grid point past 1/3, not a later tie
    assert search_beta(maf, icd, torch.tensor([0, 1])) == (0.0, 50.0)  # a tie with beta = 0 keeps 0
    g = torch.Generator().manual_seed(6)
    for _ in range(5):
        m, i = torch.randn(30, 5, generator=g), torch.randn(30, 5, generator=g)
        y = torch.randint(0, 5, (30,), generator=g)
        assert search_beta(m, i, y) == pytest.approx(_official_search_hp(m, i, y))


def test_beta_is_searched_on_test_only_for_imagenet_under_the_paper_protocol():
    val, test = SimpleNamespace(name="val"), SimpleNamespace(name="test")
    task = lambda dataset, protocol: SimpleNamespace(  # noqa: E731
        info=SimpleNamespace(dataset=dataset, protocol=protocol),
        val=val,
        oracle=test if protocol == "paper" else None,
    )
    assert search_split(task("imagenet", "paper")) is test
    assert search_split(task("imagenet", "coop")) is val
    assert search_split(task("eurosat", "paper")) is val


def test_config_defaults_are_the_official_recipe_and_options_parse():
    info = get_method("ldc")
    cfg = info.config()
    assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.weight_decay, cfg.eps, cfg.schedule, cfg.optimizer) == (
        50,
        64,
        1e-4,
        1e-4,
        1e-4,
        "cosine_iter",
        "adamw",
    )
    assert (cfg.fuse, cfg.loss_lambda, cfg.select, cfg.beta_steps) == ("wf", (1.0,) * 5, "last", 50)
    settings = info.cls(cfg).train_settings(None)
    assert settings.policy == "ldc" and settings.merge_singleton and not settings.drop_last
    parsed = info.create({"fuse": "lf", "loss_lambda": "1,1,1,0.5,0.5", "epochs": "3"}).config
    assert (parsed.fuse, parsed.loss_lambda, parsed.epochs) == ("lf", (1.0, 1.0, 1.0, 0.5, 0.5), 3)
    with pytest.raises(UsageError, match="Did you mean lf"):
        info.create({"fuse": "lff"})
    with pytest.raises(ConfigError, match="5 comma-separated"):
        info.create({"loss_lambda": "1,1"})
    assert "APPROXIMATION" in get_method("ldc_lite").description
    assert get_method("ldc_lite").deviations[0].startswith("[PROPOSED] APPROXIMATION")


# ---------------------------------------------------------------------------- training


def separable_views(
    kind: str, n: int, views: int, generator: torch.Generator, common: torch.Tensor
) -> tuple[dict, torch.Tensor]:
    """Class ``c`` lights up channel / feature ``c`` of every level; pooled embeddings carry no class signal.

    Pooled embeddings sit at a fixed angle to ``common``, the direction every class text row is close
    to, so zero-shot logits look like CLIP's (about 20, a few apart) and zero-shot is at chance.
    """
    labels = torch.arange(n) % 4
    shapes = [(8, 8, 8), (16, 4, 4), (16, 2, 2), (32, 2, 2)] if kind == "rn" else [(5, 16)] * 4
    noise = torch.randn(n, views, common.shape[1], generator=generator)
    arrays = {"pooled": 0.2 * common + F.normalize(noise - (noise @ common.T) * common, dim=-1)}
    for k, shape in enumerate(shapes):
        x = torch.randn((n, views) + shape, generator=generator)
        signal = F.one_hot(labels, shape[0] if kind == "rn" else shape[-1]).float() * 3
        x += signal[:, None, :, None, None] if kind == "rn" else signal[:, None, None, :]
        arrays[f"level{k}"] = x
    return arrays, labels


@pytest.mark.parametrize("kind", ["rn", "vit"])
def test_training_on_a_separable_task_beats_zero_shot_and_merges_a_batch_of_one(kind):
    g = torch.Generator().manual_seed(8)
    dim = 32 if kind == "rn" else 8
    common = F.normalize(torch.randn(1, dim, generator=g), dim=-1)
    text = F.normalize(common + 0.05 * torch.randn(4, dim, generator=g), dim=-1)
    (train_x, train_y), (val_x, val_y), (test_x, test_y) = (
        separable_views(kind, n, v, g, common) for n, v in ((33, 3), (16, 1), (40, 1))
    )
    shapes = [tuple(t.shape[2:]) for k, t in train_x.items() if k != "pooled"]
    with seeded_init(g):
        frozen = AttentionPool2d(2, 32, 4, dim) if kind == "rn" else torch.randn(16, dim)
        trunk = build_trunk(kind, shapes, frozen, embed_dim=dim, fuse="wf", lite=False)
        head = LDCHead(
            trunk,
            taps=("level0", "level1", "level2", "level3"),
            text=text,
            scale=100.0,
            maf_hidden=dim if kind == "rn" else 2048,
        )
    method = get_method("ldc").create({"epochs": 30, "lr": 1e-3, "batch_size": 16})
    settings = method.train_settings(None)
    # 33 images in batches of 16: the last batch would hold one image, which BatchNorm1d cannot train on
    result = train(
        head, TrainData(MemoryViews(train_x), train_y), settings=settings, generator=g, loss_fn=method.loss
    )
    assert len(result.history) == 30 and result.best_iter == 60
    val = predict(head, MemoryViews(val_x))
    beta, _ = search_beta(val["maf"], val["icd"], val_y)
    head.set_beta(beta)
    test = predict(head, MemoryViews(test_x))
    acc = {k: 100.0 * float((v.argmax(1) == test_y).float().mean()) for k, v in test.items()}
    assert acc["main"] >= acc["zero_shot"] + 25 and acc["maf"] >= acc["zero_shot"] + 25, acc


# ---------------------------------------------------------------------------- cached = end to end


def fresh_taps(backbone, data, store, rows: np.ndarray, taps: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """The taps of the cached ldc views of ``rows``, recomputed from the images through the frozen backbone."""
    renderer = ViewRenderer(store.manifest["backbone"]["preprocess_cfg"])
    paths = store.read("images/train_pool/paths", rows)
    params = store.read("images/train_pool/views/ldc/aug_params", rows)  # [N, V, 5]
    images = torch.cat(
        [
            renderer.render(Image.open(data / p).convert("RGB"), params[i], policy="ldc")
            for i, p in enumerate(paths)
        ]
    )  # [N·V, 3, H, W]
    base = tuple(dict.fromkeys(derived_tap(t)[0] for t in taps))
    out = backbone.encode_taps(images, base)
    grid = tuple(out["rn/layer4"].shape[-2:]) if "rn/layer4" in out else None
    return {t: derive(out[derived_tap(t)[0]], derived_tap(t)[1], grid=grid).float() for t in taps}


@pytest.mark.parametrize("model", TINY)
@pytest.mark.parametrize("lite", [False, True], ids=["ldc", "ldc_lite"])
@torch.no_grad()
def test_cached_ldc_equals_ldc_from_images_through_the_frozen_backbone(tiny, model, lite):
    data, cache = tiny
    (root,) = (cache / "imagefolder-demo").glob(f"{model}.*")
    store = FeatureStore.open(root)
    backbone = load_backbone(model, "none")
    kind = backbone.kind
    taps = ldc_taps(store, kind=kind, lite=lite)
    inputs = ("pooled",) + taps
    rows = np.arange(4)
    cached = {
        t: torch.from_numpy(store.read(f"images/train_pool/views/ldc/{t}", rows).astype(np.float32)).flatten(
            0, 1
        )
        for t in inputs
    }  # [N·V, ...]
    fresh = fresh_taps(backbone, data, store, rows, inputs)
    for t in inputs:  # the store holds exactly these tensors, rounded to fp16
        torch.testing.assert_close(cached[t], fresh[t].half().float(), rtol=2e-3, atol=1e-6)

    visual = backbone.model.visual
    frozen = visual.attnpool if kind == "rn" else visual.proj.detach()
    shapes = [tuple(cached[t].shape[1:]) for t in taps]
    dim = store.manifest["backbone"]["embed_dim"]
    text = torch.from_numpy(store.read("text/tip", None)).float()
    trunk = build_trunk(kind, shapes, frozen, embed_dim=dim, fuse="wf", lite=lite)
    head = LDCHead(trunk, taps=taps, text=text, scale=100.0, maf_hidden=dim if kind == "rn" else 2048).eval()
    randomize_norms(head, torch.Generator().manual_seed(8))
    from_cache, from_images = head(cached), head(fresh)
    from_rounded = head({t: v.half().float() for t, v in fresh.items()})
    for name in from_cache:  # fp16 storage is the only difference: ~6e-4 of the logit range measured
        ref = from_images[name]
        torch.testing.assert_close(
            from_cache[name], ref, rtol=5e-3, atol=5e-3 * float(ref.abs().max()) + 1e-6
        )
        torch.testing.assert_close(from_cache[name], from_rounded[name])
    assert (from_cache["main"].argmax(1) == from_images["main"].argmax(1)).float().mean() >= 0.9
    store.close()


# ---------------------------------------------------------------------------- through the engine


@pytest.mark.parametrize("model", TINY)
@pytest.mark.parametrize("method", ["ldc", "ldc_lite"])
def test_fit_records_all_four_accuracies(tiny, model, method, tmp_path):
    data, cache = tiny
    (result,) = api.fit(
        method,
        dataset=f"imagefolder:{data}",
        model=model,
        pretrained="none",
        shots=2,
        seeds=[1],
        options={"epochs": 2},
        cache_dir=cache,
        runs_dir=tmp_path,
        progress=False,
    )
    record = json.loads((result.run_dir / "record.json").read_text())
    m = record["metrics"]
    assert m["headline"] == "main" and set(m["test"]) == {"main", "alf", "maf", "icd", "zero_shot"}
    assert set(result.heads) == set(m["test"]) and all(0 <= h["test"] <= 100 for h in result.heads.values())
    sel = record["selection"]
    assert sel["beta"] in beta_grid() and sel["search_on"] == "val" and sel["epoch_on"] == "last"
    tensors = load_head_tensors(result.run_dir)
    assert tensors["beta"].item() == pytest.approx(sel["beta"])
    assert not any(".frozen." in k for k in tensors)  # the frozen pooling comes from the backbone
    assert record["deviations"] == list(get_method(method).deviations)
    assert any("approximation" in w for w in record["warnings"]) == (method == "ldc_lite")


def test_same_seed_gives_the_same_ldc_run(tiny, tmp_path):
    data, cache = tiny
    runs = [
        api.fit(
            "ldc",
            dataset=f"imagefolder:{data}",
            model="fsl-tiny-vit",
            pretrained="none",
            shots=2,
            seeds=[1],
            options={"epochs": 3},
            cache_dir=cache,
            runs_dir=tmp_path / str(i),
            progress=False,
        )[0]
        for i in range(2)
    ]
    assert runs[0].heads == runs[1].heads
    a, b = (load_head_tensors(r.run_dir) for r in runs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
