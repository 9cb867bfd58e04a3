"""Every registered method's head against its formula re-typed from METHODS.md / the official code, on a
head whose trainable parts are NOT at their initialisation and whose hyperparameters are distinct and
asymmetric (no alpha = beta, no beta = 1, no ratio 0.5).

Why: a swap of two terms (``rho·a + (1−rho)·f`` ↔ ``rho·f + (1−rho)·a``, ``beta·O + F`` ↔ ``O + beta·F``,
``alpha`` ↔ ``beta``) gives the same numbers when the trained part still equals its initialisation
(SAFE's tuned copy = frozen copy, CAPT's zero-initialised experts) or when two hyperparameters are
equal. ``tests/mutations.py`` keeps a list of such swaps and checks that these tests catch each one.

The references below are written from the formulas, not by calling the code under test: only frozen
parts that come from open_clip (its ``AttentionPool2d``, ``ResidualAttentionBlock``, text tower) are
run as modules.
"""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import numpy as np
import pytest
import test_method_ape
import test_method_ape_t
import test_method_clap
import test_method_cross_modal
import test_method_gda
import test_method_lp_pp
import test_method_prolip
import test_method_taskres
import test_method_zs_lp
import torch
import torch.nn.functional as F
from open_clip.modified_resnet import AttentionPool2d
from open_clip.transformer import LayerNorm, QuickGELU, ResidualAttentionBlock

from fsl_cache.backbones import load_backbone
from fsl_cache.methods import get_method, list_methods
from fsl_cache.methods.capt_modules import CaptHead
from fsl_cache.methods.capt_prompts import CaptPromptHead
from fsl_cache.methods.clip_adapter import ClipAdapterHead
from fsl_cache.methods.confusion_bank import build_bank, confusable_classes
from fsl_cache.methods.coop import CoOpHead
from fsl_cache.methods.ldc import LDCHead, build_trunk, ldc_loss
from fsl_cache.methods.linear_probe import fit_logreg, head_from_sklearn
from fsl_cache.methods.pooling import AttnPoolToken0, _rn_tail, _vit_tail
from fsl_cache.methods.safe import SafeHead
from fsl_cache.methods.safe_a import SafeAHead
from fsl_cache.methods.tip_adapter import TipHead, build_values
from fsl_cache.methods.zero_shot import ZeroShotHead

pytestmark = pytest.mark.usefixtures("one_thread")

# Distinct, asymmetric hyperparameters used throughout (none equal, none 0.5 or 1).
SCALE, ALPHA, BETA, RHO, SAFE_BETA, LDC_BETA = 37.0, 1.7, 5.3, 0.3, 0.35, 0.27
C, D = 4, 6  # classes != embedding width, so C/D swaps fail on shapes too


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def unit(x: torch.Tensor) -> torch.Tensor:
    """Rows divided by their Euclidean norm, written out (not F.normalize)."""
    return x / x.pow(2).sum(dim=-1, keepdim=True).sqrt()


@torch.no_grad()
def perturb(module: torch.nn.Module, g: torch.Generator, *, scale: float = 0.5) -> None:
    """Move every parameter (trainable or not) and BatchNorm statistic away from its initialisation."""
    for p in module.parameters():
        p.add_(scale * torch.randn(p.shape, generator=g))
    for name, b in module.named_buffers():
        if name.endswith("running_mean"):
            b.copy_(0.3 * torch.randn(b.shape, generator=g))
        elif name.endswith("running_var"):
            b.copy_(0.5 + torch.rand(b.shape, generator=g))


def bn(x: torch.Tensor, m, dim: int = 1) -> torch.Tensor:
    """Eval-mode BatchNorm written out: ``(x − μ)/√(σ² + ε)·γ + b`` along ``dim``."""
    shape = [1] * x.ndim
    shape[dim] = -1
    r = lambda t: t.reshape(shape)  # noqa: E731
    return (x - r(m.running_mean)) / torch.sqrt(r(m.running_var) + m.eps) * r(m.weight) + r(m.bias)


def ln(x: torch.Tensor, m) -> torch.Tensor:
    """LayerNorm written out (biased variance)."""
    mu = x.mean(dim=-1, keepdim=True)
    var = ((x - mu) ** 2).mean(dim=-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + m.eps) * m.weight + m.bias


def mlp_ref(seq, x: torch.Tensor) -> torch.Tensor:
    """LDC's ``Linear(nb) → BN1d → ReLU → Linear(nb)``."""
    return torch.relu(bn(x @ seq[0].weight.T, seq[1])) @ seq[3].weight.T


def test_every_registered_method_has_a_formula_test_here():
    """A new method needs its own trained-head formula test in this file (tests/README.md)."""
    missing = sorted(set(list_methods()) - set(FORMULA_TESTS))
    assert not missing, f"no trained-head formula test for {missing}: add one and list it in FORMULA_TESTS"


# ---------------------------------------------------------------------------- zero-shot, linear probe


def test_zero_shot_head_is_scale_times_cosine():
    g = gen(0)
    f, text = 3 * torch.randn(5, D, generator=g), unit(torch.randn(C, D, generator=g))
    expected = SCALE * unit(f) @ text.T
    torch.testing.assert_close(ZeroShotHead(text, scale=SCALE)({"pooled": f}), expected)


@pytest.mark.parametrize("classes", [3, 2])
def test_linear_probe_head_is_sklearn_decision_function(classes):
    """``f Aᵀ + b`` on raw features = sklearn's decision function (binary: logit(1) − logit(0))."""
    rng = np.random.default_rng(classes)
    y = np.repeat(np.arange(classes), 7)
    x = rng.normal(size=(len(y), D)) + 2.0 * np.eye(classes, D)[y]
    clf = fit_logreg(x, y, c=0.37, max_iter=1000)
    head = head_from_sklearn(clf, num_classes=classes, dim=D)
    logits = head({"pooled": torch.from_numpy(x).float()}).detach().double().numpy()
    decision = clf.decision_function(x)
    if classes == 2:
        np.testing.assert_allclose(logits[:, 1] - logits[:, 0], decision, rtol=1e-4, atol=1e-4)
    else:
        np.testing.assert_allclose(logits, decision, rtol=1e-4, atol=1e-4)
    w, b = head.linear.weight.detach(), head.linear.bias.detach()
    f = torch.from_numpy(x).float()
    torch.testing.assert_close(head({"pooled": f}), f @ w.T + b)


# ---------------------------------------------------------------------------- Tip-Adapter(-F)


def tip_ref(f, keys, values, text, *, alpha, beta, scale):
    """METHODS §2.3: ``scale·f̂Wᵀ + α·exp(−β(1 − f̂Kᵀ))L``, keys used as stored (not re-normalised)."""
    f_hat = unit(f)
    return scale * f_hat @ text.T + alpha * torch.exp(-beta * (1.0 - f_hat @ keys.T)) @ values


def trained_keys(g: torch.Generator, n: int) -> torch.Tensor:
    """Keys as Tip-Adapter-F leaves them: unit keys moved by training, no longer unit norm."""
    keys = unit(torch.randn(n, D, generator=g))
    return keys + 0.2 * torch.randn(n, D, generator=g)


def tip_case(seed: int):
    g = gen(seed)
    n = 7
    keys = trained_keys(g, n)
    values = build_values(torch.arange(n) % C, C)
    text = unit(torch.randn(C, D, generator=g))
    f = 2 * torch.randn(5, D, generator=g)
    return f, keys, values, text


@pytest.mark.parametrize("name", ["tip_adapter", "tip_adapter_f"])
def test_tip_adapter_head_equals_the_formula_with_trained_keys(name):
    f, keys, values, text = tip_case(1)
    head = TipHead(keys, values, text, alpha=ALPHA, beta=BETA, scale=SCALE, train_keys=name.endswith("_f"))
    assert not torch.allclose(keys.norm(dim=1), torch.ones(len(keys)))
    expected = tip_ref(f, keys, values, text, alpha=ALPHA, beta=BETA, scale=SCALE)
    with torch.no_grad():
        torch.testing.assert_close(head({"pooled": f}), expected)
        head.set_alpha_beta(alpha=BETA, beta=ALPHA)  # the setter, too, must not swap them
        swapped = tip_ref(f, keys, values, text, alpha=BETA, beta=ALPHA, scale=SCALE)
        torch.testing.assert_close(head({"pooled": f}), swapped)


def test_tip_adapter_f_head_after_training_on_a_task(pooled_task):
    """Tip-Adapter-F briefly trained by the method itself: keys moved off their init, formula still holds."""
    from fsl_cache.testing import fit_method

    task, test = pooled_task
    opts = {"epochs": 3, "lr": 0.05, "init_alpha": ALPHA, "init_beta": BETA, "augment_views": 3}
    fitted = fit_method("tip_adapter_f", task, {**opts, "search": False})
    head = fitted.head
    keys = head.adapter.weight.detach()
    init = unit(task.train_views("tip", views=range(1, 4)).float().mean(dim=1))
    assert (keys - init).abs().max() > 1e-3, "keys did not move: the test would not see a swap"
    assert (float(head.alpha), float(head.beta)) == pytest.approx((ALPHA, BETA))
    expected = tip_ref(test, keys, head.values, task.text("tip"), alpha=ALPHA, beta=BETA, scale=100.0)
    with torch.no_grad():
        torch.testing.assert_close(head({"pooled": test}), expected, rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def pooled_task():
    """A small in-memory task with tip views (Tip-Adapter-F training)."""
    from fsl_cache.methods import FitTask, TaskInfo
    from fsl_cache.splits import SplitRef
    from fsl_cache.testing import ArrayStore

    g = gen(3)
    means = 2 * unit(torch.randn(C, D, generator=g))
    text = unit(means + 1.5 * torch.randn(C, D, generator=g))

    def draw(n, v):
        y = torch.arange(C).repeat_interleave(n)
        return (means[y][:, None] + 0.6 * torch.randn(len(y), v, D, generator=g)).numpy(), y

    (tr, ytr), (va, yva), (te, _) = draw(3, 5), draw(2, 1), draw(3, 1)
    data = {
        "images/train_pool/views/tip/pooled": tr,
        "images/train_pool/views/center/pooled": tr[:, :1],
        "images/val_pool/views/center/pooled": va,
        "text/tip": text.numpy(),
    }
    store = ArrayStore(data, {"views": {"train_pool/tip": 5, "train_pool/center": 1}})
    ref = lambda name, pool, y: SplitRef(name, pool, np.arange(len(y)), y, np.arange(len(y)))  # noqa: E731
    info = TaskInfo("synthetic", tuple("abcd"), 3, 1, "coop", D)
    task = FitTask(store, info, train=ref("train", "train_pool", ytr), val=ref("val", "val_pool", yva))
    return task, torch.from_numpy(te[:, 0]).float()


# ---------------------------------------------------------------------------- CLIP-Adapter


def test_clip_adapter_head_equals_the_formula_with_moved_weights():
    g = gen(4)
    text = 2 * torch.randn(C, D * 2, generator=g)  # un-normalised: the head normalises T
    head = ClipAdapterHead(text, rho=RHO, scale=SCALE, reduction=3)
    perturb(head, g)
    w1, w2 = head.adapter.fc[0].weight.detach(), head.adapter.fc[2].weight.detach()
    f = 3 * torch.randn(5, D * 2, generator=g)
    a = torch.relu(torch.relu(f @ w1.T) @ w2.T)  # ReLU(W₂ ReLU(W₁ f)), no bias
    expected = SCALE * unit(RHO * a + (1 - RHO) * f) @ unit(text).T
    with torch.no_grad():
        torch.testing.assert_close(head({"pooled": f}), expected)


# ---------------------------------------------------------------------------- CoOp


@pytest.fixture(scope="module")
def tiny_rn():
    return load_backbone("fsl-tiny-rn", "none")


NAMES = ("red circle", "blue square", "green tri", "checkerboard")


def coop_reference(model, tokenizer, ctx: torch.Tensor, *, position: str) -> torch.Tensor:
    """CoOp's text features, written from ``PromptLearner.forward`` + ``TextEncoder``: the placeholder prompt
    ``X…X name.`` re-ordered as token ids, embedded, ctx rows written in, run over all 77 positions."""
    m = ctx.shape[-2]
    placeholder = tokenizer([" ".join(["X"] * m) + " " + n + "." for n in NAMES])  # [C, 77]
    name_len = [int(t.argmax()) - 1 for t in tokenizer(list(NAMES))]
    feats = []
    for c, ids in enumerate(placeholder):
        ctx_c = ctx if ctx.dim() == 2 else ctx[c]
        sos, name, rest = ids[:1], ids[1 + m : 1 + m + name_len[c]], ids[1 + m + name_len[c] :]
        slots = torch.full((m,), -1)
        half = m // 2
        order = {
            "end": [sos, slots, name, rest],
            "middle": [sos, slots[:half], name, slots[half:], rest],
            "front": [sos, name, slots, rest],
        }[position]
        seq = torch.cat(order)
        emb = model.token_embedding(seq.clamp(min=0))
        where = (seq == -1).nonzero().flatten()
        emb[where] = ctx_c.to(emb.dtype)  # ctx tokens in order
        x = emb[None] + model.positional_embedding
        x = model.ln_final(model.transformer(x, attn_mask=model.attn_mask))
        eot = int(torch.where(seq == -1, 0, seq).argmax())  # EOT has the largest token id
        feats.append(x[0, eot] @ model.text_projection)
    return torch.stack(feats)


@pytest.mark.parametrize(("position", "csc"), [("end", False), ("middle", False), ("front", True)])
@torch.no_grad()
def test_coop_head_equals_the_formula_with_moved_context(tiny_rn, position, csc):
    model, tok = tiny_rn.model, tiny_rn.tokenizer
    head = CoOpHead(model, tok, list(NAMES), n_ctx=5, csc=csc, position=position, scale=SCALE).eval()
    g = gen(5)
    head.prompt_learner.ctx.add_(0.5 * torch.randn(head.prompt_learner.ctx.shape, generator=g))
    ctx = head.prompt_learner.ctx.detach().clone()
    if csc:
        assert not torch.allclose(ctx[0], ctx[1])
    f = torch.randn(3, model.text_projection.shape[1], generator=g)
    text = coop_reference(model, tok, ctx, position=position)
    expected = SCALE * unit(f) @ unit(text).T
    torch.testing.assert_close(head({"pooled": f}), expected, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------- LDC and LDC-lite

RN_CHANNELS, RN_SIDES, GRID = (3, 4, 5, 8), (16, 8, 4, 2), 2
VIT_WIDTH, VIT_TOKENS = 8, 5
LDC_LAMBDAS = (1.3, 0.7, 0.2, 2.1, 0.45)


def ldc_case(kind: str, fuse: str, lite: bool, seed: int = 6):
    """An LDC head with every adapter, BN statistic and MLP moved off its initialisation, beta = 0.27."""
    g = gen(seed)
    torch.manual_seed(seed)
    if kind == "rn":
        pool = AttentionPool2d(GRID, RN_CHANNELS[-1], 2, D).eval()
        frozen = AttnPoolToken0(pool)
        shapes = [(c, GRID, GRID) if lite else (c, s, s) for c, s in zip(RN_CHANNELS, RN_SIDES)]
    else:
        pool = torch.randn(VIT_WIDTH, D, generator=g)
        frozen = pool
        shapes = [(VIT_WIDTH,) if lite else (VIT_TOKENS, VIT_WIDTH)] * 4
    text = unit(torch.randn(C, D, generator=g))
    trunk = build_trunk(kind, shapes, frozen, embed_dim=D, fuse=fuse, lite=lite)
    head = LDCHead(
        trunk,
        taps=("l1", "l2", "l3", "l4"),
        text=text,
        scale=SCALE,
        maf_hidden=D if kind == "rn" else 2048,
        beta=LDC_BETA,
    )
    trainable = list(head.children())
    for m in trainable:
        perturb(m, g)
    if kind == "rn":  # the frozen pool is the backbone's: restore it, the reference uses the original module
        head.maf.frozen.load_state_dict(AttnPoolToken0(pool).state_dict())
    else:
        head.maf.frozen.weight.data.copy_(pool)
    head.eval()
    x = {"pooled": 3 * torch.randn(5, D, generator=g)}
    for k, s in enumerate(shapes):
        x[f"l{k + 1}"] = torch.randn((5, *s), generator=g)
    return head, pool, text, x


def ldc_reference(head, pool, text, x, *, kind: str, fuse: str, lite: bool) -> dict[str, torch.Tensor]:
    """METHODS §2.6.1–2.6.4 and §2.6.6 written out, reading the head's (moved) weights."""
    levels = [x[f"l{k + 1}"] for k in range(4)]
    adapted = []
    for a, lv in zip(head.maf.adapters, levels):
        if kind == "rn":
            w = a[0].weight[:, :, 0, 0]  # Conv1×1 as a matrix [out, in]
            y = torch.relu(bn(torch.einsum("oi,bihw->bohw", w, lv), a[1]))
            side = lv.shape[-1] // GRID
            if side > 1:
                y = y.reshape(*y.shape[:2], GRID, side, GRID, side).mean(dim=(3, 5))  # AvgPool_s
            adapted.append(y)
        else:
            y = torch.relu(ln(lv @ a.linear.weight.T, a.norm))
            adapted.append(y if lite else y.mean(dim=1))  # mean over all tokens, CLS included
    if kind == "rn":
        if fuse == "lf":
            z = mlp_ref(head.maf.lf, torch.cat([pool(a) for a in adapted], dim=1))
        else:
            z = pool(0.1 * adapted[0] + 0.2 * adapted[1] + 0.3 * adapted[2] + 0.4 * adapted[3])
    else:
        m = (
            mlp_ref(head.maf.lf, torch.cat(adapted, dim=1))
            if fuse == "lf"
            else 0.1 * adapted[0] + 0.2 * adapted[1] + 0.3 * adapted[2] + 0.4 * adapted[3]
        )
        z = m @ pool  # no ln_post
    s_zs = SCALE * unit(x["pooled"]) @ text.T
    s_maf = mlp_ref(head.maf_head, z)  # no normalisation, no ×100
    icd = head.icd
    s_icd = s_zs + mlp_ref(icd.a3, mlp_ref(icd.a1, s_zs) + mlp_ref(icd.a2, z))
    w = torch.sigmoid(mlp_ref(head.alf.gate, z))
    return {
        "main": LDC_BETA * s_maf + (1 - LDC_BETA) * s_icd,
        "alf": w * s_maf + (1 - w) * s_icd,
        "maf": s_maf,
        "icd": s_icd,
        "zero_shot": s_zs,
    }


LDC_CASES = [
    ("ldc", "rn", "wf"),
    ("ldc", "rn", "lf"),
    ("ldc", "vit", "wf"),
    ("ldc", "vit", "lf"),
    ("ldc_lite", "rn", "wf"),
    ("ldc_lite", "vit", "wf"),
]


@pytest.mark.parametrize(("method", "kind", "fuse"), LDC_CASES)
@torch.no_grad()
def test_ldc_head_and_ldc_lite_head_equal_the_formulas_with_moved_weights(method, kind, fuse):
    lite = method == "ldc_lite"
    head, pool, text, x = ldc_case(kind, fuse, lite)
    out = head(x)
    ref = ldc_reference(head, pool, text, x, kind=kind, fuse=fuse, lite=lite)
    w = torch.sigmoid(mlp_ref(head.alf.gate, head.maf([x[f"l{k + 1}"] for k in range(4)])))
    assert (w - 0.5).abs().min() > 1e-3, "ALF weight at 0.5: a swap of its two terms would go unseen"
    assert set(out) == set(ref)
    for name in ref:
        torch.testing.assert_close(out[name], ref[name], rtol=1e-4, atol=1e-4, msg=name)


def test_ldc_loss_weights_each_term_by_its_own_lambda():
    """Distinct λ: a swap of two loss terms (or their weights) changes the value."""
    g = gen(7)
    out = {k: torch.randn(6, C, generator=g) for k in ("maf", "icd", "alf")}
    out["zero_shot"] = 30 * torch.randn(6, C, generator=g)
    y = torch.randint(0, C, (6,), generator=g)

    def ce(z):
        return (torch.logsumexp(z, dim=1) - z[torch.arange(len(y)), y]).mean()

    lam = LDC_LAMBDAS
    expected = (
        lam[0] * ce(out["maf"])
        + lam[1] * ce(out["icd"])
        + lam[2] * ce(out["alf"])
        + lam[3] * (out["maf"] - out["zero_shot"]).abs().mean()
        + lam[4] * (out["icd"] - out["zero_shot"]).abs().mean()
    )
    torch.testing.assert_close(ldc_loss(out, y, lambdas=lam), expected)
    method = get_method("ldc").create({"loss_lambda": ",".join(map(str, lam))})
    torch.testing.assert_close(method.loss(out, y, {}), expected)


# ---------------------------------------------------------------------------- SAFE and SAFE-A


def rn_pools(seed: int):
    """AttnPool_O (open_clip's module) and AttnPool_F: the same module with every weight moved."""
    torch.manual_seed(seed)
    frozen = AttentionPool2d(3, 8, 2, D).eval()
    tuned = copy.deepcopy(frozen)
    perturb(tuned, gen(seed), scale=0.3)
    return frozen, tuned


def vit_tails(seed: int):
    """A CLIP-style last block + ln_post + proj (open_clip modules), frozen and moved copies."""
    torch.manual_seed(seed)
    width = 8

    def visual():
        block = ResidualAttentionBlock(width, 2, act_layer=QuickGELU, norm_layer=LayerNorm).eval()
        return SimpleNamespace(
            transformer=SimpleNamespace(resblocks=[block]),
            ln_post=LayerNorm(width),
            proj=torch.nn.Parameter(torch.randn(width, D)),
            attn_pool=None,
            pool_type="tok",
        )

    frozen = visual()
    tuned = SimpleNamespace(**vars(copy.deepcopy(frozen)))
    g = gen(seed)
    perturb(tuned.transformer.resblocks[0], g, scale=0.3)
    perturb(tuned.ln_post, g, scale=0.3)
    with torch.no_grad():
        tuned.proj.add_(0.3 * torch.randn(tuned.proj.shape, generator=g))
    return frozen, tuned


def vit_embed(v, x: torch.Tensor) -> torch.Tensor:
    """``ln_post(block(x)[CLS]) @ proj`` through open_clip's own block."""
    return v.ln_post(v.transformer.resblocks[0](x)[:, 0]) @ v.proj


def safe_case(kind: str, seed: int = 8):
    g = gen(seed)
    if kind == "rn":
        frozen, tuned = rn_pools(seed)
        tails = _rn_tail(SimpleNamespace(attnpool=frozen)), _rn_tail(SimpleNamespace(attnpool=tuned))
        x = torch.randn(5, 8, 3, 3, generator=g)
        o, f = frozen(x), tuned(x)
    else:
        frozen, tuned = vit_tails(seed)
        tails = _vit_tail(frozen), _vit_tail(tuned)
        x = torch.randn(5, 4, 8, generator=g)
        o, f = vit_embed(frozen, x), vit_embed(tuned, x)
    text = 2 * torch.randn(C, D, generator=g)
    head = SafeHead(*tails, text, tap="dense", beta=SAFE_BETA, tau=SCALE).eval()
    assert (o - f).abs().max() > 1e-2, "tuned copy equals the frozen one: a swap would go unseen"
    return head, text, x, o.detach(), f.detach()


@pytest.mark.parametrize("kind", ["rn", "vit"])
@torch.no_grad()
def test_safe_head_blends_beta_frozen_plus_tuned(kind):
    """METHODS §2.7: ``τ·normalize(β·AttnPool_O(F) + AttnPool_F(F))·Ŵᵀ`` with AttnPool_F moved off AttnPool_O."""
    head, text, x, o, f = safe_case(kind)
    expected = SCALE * unit(SAFE_BETA * o + f) @ unit(text).T
    torch.testing.assert_close(head({"dense": x}), expected, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(head.embed({"dense": x}), SAFE_BETA * o + f, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("kind", ["rn", "vit"])
@torch.no_grad()
def test_safe_a_head_is_tip_on_the_blended_embedding(kind):
    """METHODS §2.8: Tip-Adapter-F logits (trained keys) on ``β·AttnPool_O(F) + AttnPool_F(F)``."""
    safe, _, x, o, f = safe_case(kind)
    _, keys, values, text = tip_case(9)
    tip = TipHead(keys, values, text, alpha=ALPHA, beta=BETA, scale=SCALE, train_keys=True)
    head = SafeAHead(safe, tip).eval()
    expected = tip_ref(SAFE_BETA * o + f, keys, values, text, alpha=ALPHA, beta=BETA, scale=SCALE)
    torch.testing.assert_close(head({"dense": x}), expected, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------- CAPT-C

CAPT = dict(k_p=3, k_s=2, k_r=2, tau=0.07, hidden=3, grid=2)


def capt_case(seed: int = 10):
    """A CAPT-C head with every zero-initialised part (γ, expert MLPs, router, α, DWConv) moved."""
    g = gen(seed)
    torch.manual_seed(seed)
    n, v, c, d = 6, 2, 5, 8
    text = unit(torch.randn(c, d, generator=g))
    feats = torch.randn(n, v, d, generator=g)
    labels = torch.arange(n) % c
    # the bank's predictions: every view right except class 0's, taken for class 1, so queries near
    # classes 0 and 1 find confusing entries and the others fall back to the confusers' class means
    pred = torch.where(labels == 0, 1, labels)
    bank = build_bank(10 * F.one_hot(pred, c).float()[:, None].expand(n, v, c), labels)
    pairs = confusable_classes(bank.counts, bank.soft, text, k=CAPT["k_p"])
    e_dif, e_com = unit(torch.randn(2, c, CAPT["k_p"], d, generator=g))
    class_mean = torch.randn(c, d, generator=g)
    head = CaptHead(
        text,
        e_dif,
        e_com,
        pairs,
        bank,
        feats.reshape(-1, d),
        class_mean,
        scale=SCALE,
        pairs_per_image=CAPT["k_s"],
        retrieve_k=CAPT["k_r"],
        tau=CAPT["tau"],
        hidden=CAPT["hidden"],
        grid=CAPT["grid"],
    )
    perturb(head, g, scale=0.4)
    head.eval()
    near = 3 * text[[0, 1, 3, 0]] + 0.3 * torch.randn(4, d, generator=g)
    x = {
        "pooled": torch.cat([feats[:3, 0], near]),
        "dense_embed": torch.randn(7, CAPT["grid"] ** 2, d, generator=g),
        "image_id": torch.tensor([0, 1, 2, -1, -1, -1, 5]),
    }
    return (
        head,
        dict(
            text=text,
            e_dif=e_dif,
            e_com=e_com,
            pairs=pairs,
            bank=bank,
            keys=feats.reshape(-1, d),
            mean=class_mean,
        ),
        x,
    )


def capt_reference(head, k, x) -> dict[str, torch.Tensor]:
    """METHODS §2.9.3 steps 2–4, written out per image."""
    text, pairs, bank = k["text"], k["pairs"], k["bank"]
    keys = unit(k["keys"]).half().float()  # the bank keeps its keys in fp16
    f_hat = unit(x["pooled"])
    s_zs = SCALE * f_hat @ text.T
    w_tilde = unit(text + head.gamma * (k["e_dif"].mean(dim=1) - k["e_com"].mean(dim=1)))
    wrong = bank.true != bank.pred
    out = {n: [] for n in ("capt", "zero_shot", "semantic", "sample")}
    for i in range(len(f_hat)):
        p = torch.softmax(s_zs[i], dim=0)
        anchor = int(p.argmax())
        row = bank.counts[anchor].float()
        cand = pairs[anchor]
        score = p[cand] * (1 + row[cand] / max(1.0, float(row.sum())))
        top, slot = score.topk(CAPT["k_s"])
        omega = torch.softmax(top, dim=0)
        conf = cand[slot]
        g_d = (omega[:, None] * k["e_dif"][anchor, slot]).sum(dim=0)
        g_c = (omega[:, None] * k["e_com"][anchor, slot]).sum(dim=0)
        sem = head.semantic_mlp
        z_sem = f_hat[i] + sem[2](F.gelu(sem[0](torch.cat([f_hat[i], g_d, g_c]))))
        s_sem = SCALE * unit(z_sem) @ w_tilde.T
        # SAM: misclassified entries of cells (ĉ, c_k) and (c_k, ĉ), never the query's own image
        in_cells = [
            m
            for m in range(len(bank.true))
            if wrong[m]
            and (
                (int(bank.true[m]) == anchor and int(bank.pred[m]) in conf.tolist())
                or (int(bank.pred[m]) == anchor and int(bank.true[m]) in conf.tolist())
            )
            and int(bank.img[m]) != int(x["image_id"][i])
        ]
        if in_cells:
            sims = torch.stack([f_hat[i] @ keys[m] for m in in_cells])
            best = sims.topk(min(CAPT["k_r"], len(in_cells)))
            weights = torch.softmax(best.values / CAPT["tau"], dim=0)
            r_bar = (weights[:, None] * keys[[in_cells[j] for j in best.indices]]).sum(dim=0)
        else:
            r_bar = unit((omega[:, None] * unit(k["mean"])[conf]).sum(dim=0))  # unit class-mean directions
        ad = head.adapter
        h_g = ad.global_mlp[2](F.gelu(ad.global_mlp[0](f_hat[i] - r_bar)))
        tokens = x["dense_embed"][i]  # [L, D], row-major grid
        grid = tokens.T.reshape(1, -1, CAPT["grid"], CAPT["grid"])
        xp = (
            tokens
            + F.conv2d(grid, ad.dwconv.weight, ad.dwconv.bias, padding=1, groups=grid.shape[1])[0]
            .flatten(1)
            .T
        )
        attn = torch.softmax(-(unit(xp) @ r_bar) / CAPT["tau"], dim=0)
        h_l = ad.local_mlp[2](F.gelu(ad.local_mlp[0]((attn[:, None] * xp).sum(dim=0))))
        a = torch.sigmoid(ad.alpha)
        h = a * h_l + (1 - a) * h_g
        s_samp = SCALE * unit(f_hat[i] + h) @ w_tilde.T
        r = torch.softmax(head.router @ f_hat[i], dim=0)
        top2, idx = r.topk(2)
        experts = [s_zs[i], s_sem, s_samp]
        s_capt = sum(wt / top2.sum() * experts[int(e)] for wt, e in zip(top2, idx))
        for name, value in zip(("capt", "zero_shot", "semantic", "sample"), (s_capt, *experts)):
            out[name].append(value)
    return {n: torch.stack(v) for n, v in out.items()}


@torch.no_grad()
def test_capt_head_equals_the_formula_with_moved_experts():
    head, parts, x = capt_case()
    out = head(x)
    ref = capt_reference(head, parts, x)
    assert (out["semantic"] - out["zero_shot"]).abs().max() > 1e-2  # the experts really moved
    assert (out["sample"] - out["semantic"]).abs().max() > 1e-2
    assert abs(float(torch.sigmoid(head.adapter.alpha)) - 0.5) > 0.05  # σ(α) ≠ ½: the fusion's terms differ
    for name in ref:
        torch.testing.assert_close(out[name], ref[name], rtol=1e-4, atol=1e-4, msg=name)


@torch.no_grad()
def test_capt_head_router_picks_different_expert_pairs():
    """The reference above only tests the top-2 weights if the router's choice varies across images."""
    head, parts, x = capt_case()
    r = torch.softmax(unit(x["pooled"]) @ head.router.T, dim=-1)
    top2 = {tuple(sorted(t)) for t in r.topk(2, dim=-1).indices.tolist()}
    assert len(top2) >= 2 and (r.topk(2, dim=-1).values[:, 0] - r.topk(2, dim=-1).values[:, 1]).min() > 1e-3


def test_capt_head_retrieval_finds_candidates_for_some_images_and_falls_back_for_others():
    """The reference tests both retrieval paths only if both occur on its inputs."""
    from fsl_cache.methods.confusion_bank import retrieve

    head, parts, x = capt_case()
    f_hat = unit(x["pooled"])
    anchor, _, confusers, omega = head.confusion_pairs(SCALE * f_hat @ parts["text"].T)
    _, chosen = retrieve(
        f_hat,
        anchor,
        confusers,
        omega,
        keys=head.bank_keys.float(),
        true=head.bank_true,
        pred=head.bank_pred,
        img=head.bank_img,
        class_mean=head.class_mean,
        k=CAPT["k_r"],
        tau=CAPT["tau"],
        image_id=x["image_id"],
    )
    found = (chosen >= 0).any(dim=1)
    assert found.any() and not found.all(), found


def test_capt_head_loss_weights_are_distinct_in_the_formula_test():
    """CAPT's loss: ``CE(capt) + w_e·ΣCE(expert) + λ_hn·L_hn + λ_lb·L_lb``; with w_e = λ_hn = 0.5 by default a swap of
    the two weights is invisible, so the loss is checked with distinct weights."""
    from fsl_cache.methods.capt_c import CaptC, CaptCConfig

    head, parts, x = capt_case()
    method = CaptC(CaptCConfig(expert_weight=0.3, hn_weight=0.0, lb_weight=0.7))
    method.head = head
    head.eval()
    out = head(x)
    y = torch.tensor([0, 1, 2, 3, 4, 0, 1])
    r = head.aux["router"]
    mean = r.mean(dim=0)
    lb = math.log(3) + (mean * mean.log()).sum()

    def ce(z):
        return (torch.logsumexp(z, dim=1) - z[torch.arange(len(y)), y]).mean()

    expected = ce(out["capt"]) + 0.3 * (ce(out["semantic"]) + ce(out["sample"])) + 0.7 * lb
    torch.testing.assert_close(method.loss(out, y, x), expected, rtol=1e-5, atol=1e-5)


def capt_prompt_reference(model, tokenizer, ctx: torch.Tensor, deep: torch.Tensor) -> torch.Tensor:
    """IVLP text features written out: ``a photo of a name.`` embedded, ctx rows at 1..M, ``deep[i-1]`` written
    over them before block i, all 77 positions, EOT row through ln_final and the projection."""
    tokens = tokenizer([f"a photo of a {n}." for n in NAMES])
    m = ctx.shape[0]
    x = model.token_embedding(tokens).float().clone()
    x[:, 1 : 1 + m] = ctx
    x = x + model.positional_embedding
    for i, block in enumerate(model.transformer.resblocks):
        if 1 <= i <= len(deep):
            x = x.clone()
            x[:, 1 : 1 + m] = deep[i - 1]
        x = block(x, attn_mask=model.attn_mask)
    x = model.ln_final(x)[torch.arange(len(NAMES)), tokens.argmax(dim=-1)]
    return x @ model.text_projection


@pytest.mark.parametrize("dpc", [0.2, None])
def test_capt_prompt_head_equals_the_formula_with_moved_prompts(tiny_rn, dpc):
    """capt / promptkd: moved context and deep prompts; with DPC the encoder reads (ctx − 0.8·pre) / 0.2."""
    model, tok = tiny_rn.model, tiny_rn.tokenizer
    head = CaptPromptHead(model, tok, list(NAMES), dpc_weight=dpc, scale=SCALE).eval()
    g = gen(12)
    with torch.no_grad():
        head.prompt_learner.ctx.add_(0.3 * torch.randn(head.prompt_learner.ctx.shape, generator=g))
        head.deep.add_(0.3 * torch.randn(head.deep.shape, generator=g))
    ctx, deep = head.prompt_learner.ctx.detach().clone(), head.deep.detach().clone()
    read = ctx if dpc is None else (ctx - 0.8 * head.pre_ctx) / 0.2
    f = torch.randn(3, model.text_projection.shape[1], generator=g)
    with torch.no_grad():
        expected = SCALE * unit(f) @ unit(capt_prompt_reference(model, tok, read, deep)).T
        torch.testing.assert_close(head({"pooled": f}), expected, rtol=1e-4, atol=1e-4)


FORMULA_TESTS = {
    "zero_shot": test_zero_shot_head_is_scale_times_cosine,
    "linear_probe": test_linear_probe_head_is_sklearn_decision_function,
    "tip_adapter": test_tip_adapter_head_equals_the_formula_with_trained_keys,
    "tip_adapter_f": test_tip_adapter_f_head_after_training_on_a_task,
    "clip_adapter": test_clip_adapter_head_equals_the_formula_with_moved_weights,
    "coop": test_coop_head_equals_the_formula_with_moved_context,
    "ldc": test_ldc_head_and_ldc_lite_head_equal_the_formulas_with_moved_weights,
    "ldc_lite": test_ldc_head_and_ldc_lite_head_equal_the_formulas_with_moved_weights,
    "safe": test_safe_head_blends_beta_frozen_plus_tuned,
    "safe_a": test_safe_a_head_is_tip_on_the_blended_embedding,
    "capt_c": test_capt_head_equals_the_formula_with_moved_experts,
    "capt": test_capt_prompt_head_equals_the_formula_with_moved_prompts,
    "promptkd": test_capt_prompt_head_equals_the_formula_with_moved_prompts,
    # the cached-feature baselines (METHODS §2.10): their trained-head tests live in their own files
    "zs_lp": test_method_zs_lp.test_train_probe_is_the_official_loop_on_the_same_shuffles,
    "clap": test_method_clap.test_trained_probe_is_the_official_loop_with_the_penalty,
    "cross_modal": test_method_cross_modal.test_trained_probe_is_the_official_cross_modal_loop_on_the_same_draws,
    "lp_pp": test_method_lp_pp.test_the_loop_is_the_official_one_including_the_accumulated_alpha_gradient,
    "taskres": test_method_taskres.test_head_is_the_official_residual_and_starts_as_zero_shot,
    "prolip": test_method_prolip.test_loss_and_gradient_are_the_official_ones,
    "gda": test_method_gda.test_precision_weights_and_bias_match_the_official_code,
    "ape": test_method_ape.test_shot_weights_and_logits_match_the_official_code,
    "ape_t": test_method_ape_t.test_refined_head_matches_the_official_forward_on_trained_parameters,
}
"""Each registered method's trained-head formula test (a new method adds its line)."""
