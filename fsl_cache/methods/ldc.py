"""LDC — Logits DeConfusion (METHODS §2.6) on cached multi-level maps, and the flagged LDC-lite approximation.

The head reads the cached layer1..4 maps (RN) or blocks 6, 8, 10, 12 (ViT) of one view plus its
pooled embedding, and computes MAF, ICD and ALF exactly as the official model does after the frozen
backbone; the frozen attention pooling (RN) or projection (ViT) comes from the store's backbone,
re-loaded and fingerprint-checked. [CODE] LiShuo1001/LDC ``clip_ldc/model.py``, ``ldc_train.py``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..backbones.taps import resolve_taps
from ..evaluation.scoring import predict
from ..splits import SplitRef
from ..training import FitTask, Head, Selector, TrainResult, TrainSettings, seeded_init
from ..training.settings import Select
from .base import FitResult, Method, ValidationFree
from .ldc_modules import (
    ALF,
    ICD,
    VIT_MAF_HIDDEN,
    Fuse,
    RNMultiLevel,
    ViTMultiLevel,
    fuse_beta,
    mlp,
    search_beta,
)
from .needs import Needs, ViewNeed
from .options import ConfigError, TrainOptions, check_range
from .pooling import tower_pooling
from .registry import register_method

HEADS = ("main", "alf", "maf", "icd", "zero_shot")
"""Named outputs of :class:`LDCHead`; ``main`` is the headline ``acc`` = β·MAF + (1 − β)·ICD."""


# ---------------------------------------------------------------------------- head


class LDCHead(Head):
    """LDC after the frozen backbone: ``{main, alf, maf, icd, zero_shot}`` logits from cached taps.

    ``inputs`` is ``pooled`` followed by the four level taps in order (layer1..4 / block 6..12).
    """

    def __init__(
        self,
        trunk: RNMultiLevel | ViTMultiLevel,
        *,
        taps: tuple[str, ...],
        text: torch.Tensor,
        scale: float,
        maf_hidden: int,
        beta: float = 0.5,
        eval_batch_size: int = 64,
    ) -> None:
        super().__init__()
        num_classes, embed_dim = text.shape
        self.inputs = ("pooled",) + tuple(taps)
        self.maf = trunk
        self.maf_head = mlp(embed_dim, maf_hidden, num_classes)  # [CODE] adapter_mlp: no norm, no ×100
        self.icd = ICD(num_classes, embed_dim)
        self.alf = ALF(embed_dim)
        self.register_buffer("text", text.float().clone())  # [C, D], rows L2-normalised
        self.register_buffer("scale", torch.tensor(float(scale)))
        self.register_buffer("beta", torch.tensor(float(beta)))
        self.eval_batch_size = eval_batch_size
        """Images per evaluation forward: multi-level maps are megabytes per image."""

    def forward(self, x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        z = self.maf([x[t] for t in self.inputs[1:]])  # z^e [B, D]
        s_zs = self.scale * F.normalize(x["pooled"].float(), dim=-1) @ self.text.T  # [B, C], frozen path
        s_maf = self.maf_head(z)
        s_icd = self.icd(s_zs, z)
        s_alf = self.alf(s_maf, s_icd, z)
        return {
            "main": fuse_beta(s_maf, s_icd, self.beta),
            "alf": s_alf,
            "maf": s_maf,
            "icd": s_icd,
            "zero_shot": s_zs,
        }

    def set_beta(self, beta: float) -> None:
        self.beta.fill_(beta)

    def saved_state(self) -> dict[str, torch.Tensor]:
        """Everything but the frozen pooling / projection (re-loaded from the store's backbone)."""
        return {k: v for k, v in self.state_dict().items() if ".frozen." not in k}


def ldc_loss(
    outputs: dict[str, torch.Tensor],
    labels: torch.Tensor,
    *,
    lambdas: tuple[float, float, float, float, float],
) -> torch.Tensor:
    """``λ1 CE(MAF) + λ2 CE(ICD) + λ3 CE(ALF) + λ4 L1(MAF, ZS) + λ5 L1(ICD, ZS)`` ([CODE] ``Runner.get_loss``).

    ``F.l1_loss`` uses mean reduction over B×C on the ×100-scaled zero-shot logits, which carry no gradient.
    """
    zs = outputs["zero_shot"].detach()
    terms = (
        F.cross_entropy(outputs["maf"], labels),
        F.cross_entropy(outputs["icd"], labels),
        F.cross_entropy(outputs["alf"], labels),
        F.l1_loss(outputs["maf"], zs),
        F.l1_loss(outputs["icd"], zs),
    )
    return sum(lam * term for lam, term in zip(lambdas, terms, strict=True))


# ---------------------------------------------------------------------------- building from a store


def ldc_vit_blocks(store) -> tuple[int, ...]:
    """ViT blocks LDC adapts: the last block N and N−2, N−4, N−6 of those the store tapped.

    [CODE] ``Transformer.forward(return_fea=True)``: indices ``total − 2·{3, 2, 1, 0}`` (6, 8, 10, 12 of 12).
    """
    found = {
        int(m.group(1)) for name in store.arrays if (m := re.search(r"/vit/block(\d+)(?:_mean)?$", name))
    }
    last = max(found) if found else 12
    return tuple(last - 2 * k for k in (3, 2, 1, 0))


def ldc_taps(store, *, kind: str, lite: bool) -> tuple[str, ...]:
    """The four level taps, in order, as stage one names them (``rn/layer1`` …, ``vit/block06_mean`` …)."""
    generic = ("multilevel_lite",) if lite else ("multilevel",)
    return resolve_taps(generic, kind=kind, dense_tap="", vit_blocks=ldc_vit_blocks(store))


def tap_shapes(task: FitTask, taps: tuple[str, ...]) -> list[tuple[int, ...]]:
    """Per-image shapes of ``taps`` (no batch or view axis), read from the train pool's center views."""
    return [tuple(task.store.arrays[f"images/{task.train.pool}/views/center/{t}"]["shape"][2:]) for t in taps]


def frozen_pooling(task: FitTask) -> nn.Module | torch.Tensor:
    """RN: the backbone's attention pooling (output token 0 only); ViT: its ``proj`` ``[W, D]``
    (fingerprint-checked)."""
    return tower_pooling(task.backbone().model.visual, task.info.backbone.get("kind", "rn"))


def build_trunk(
    kind: str,
    shapes: list[tuple[int, ...]],
    frozen,
    *,
    embed_dim: int,
    fuse: Fuse,
    lite: bool,
    fused: bool = False,
) -> RNMultiLevel | ViTMultiLevel:
    """The MAF trunk for cached maps of ``shapes`` (RN ``[c, h, w]`` ×4, ViT ``[L, W]`` or ``[W]`` ×4)."""
    if kind == "rn":
        return RNMultiLevel(
            [s[0] for s in shapes],
            [s[-1] for s in shapes],
            attnpool=frozen,
            embed_dim=embed_dim,
            fuse=fuse,
            pre_pooled=lite,
            fused=fused,
        )
    return ViTMultiLevel(shapes[0][-1], proj=frozen, fuse=fuse, pre_pooled=lite)


# ---------------------------------------------------------------------------- config and method


UNSEARCHED_BETA = 0.5
"""[PROPOSED] β of the headline fusion under ``--validation none`` (LDC's code has no unsearched β)."""


@dataclass(frozen=True)
class LDCConfig(TrainOptions):
    epochs: int = 50
    """[CODE] train_epoch 50."""
    batch_size: int = 64
    """[CODE] batch_size 64; a last batch of one image is merged into the previous one (BatchNorm1d)."""
    lr: float = 1e-4
    """[CODE] AdamW lr = config.lr / 10 = 1e-4."""
    weight_decay: float = 1e-4
    """[CODE] AdamW weight_decay 1e-4."""
    eps: float = 1e-4
    """[CODE] AdamW eps 1e-4 (fp16 adapter weights in the original)."""
    amp: bool = True
    """fp16 autocast over fp32 master weights on CUDA (the original trains fp16 weights); ignored on CPU."""
    select: Select = "last"
    """[CODE] last: the official code evaluates the model after the final epoch; best: keep the epoch whose
    beta-searched val accuracy is the first strict maximum."""
    fuse: Fuse = "wf"
    """Multi-level fusion: wf (0.1/0.2/0.3/0.4, fuse_type=2, all reported results), mean (fuse_type=1) or lf
    (concatenate pooled levels + MLP, fuse_type=3)."""
    loss_lambda: tuple[float, float, float, float, float] = (1.0, 1.0, 1.0, 1.0, 1.0)
    """Loss weights: CE(MAF), CE(ICD), CE(ALF), L1(MAF, ZS), L1(ICD, ZS) ([CODE] all 1.0)."""
    beta_steps: int = 50
    """The beta grid is i / beta_steps for i = 0..beta_steps ([CODE] 0, 0.02, ..., 1.0)."""
    templates: str = "tip"
    """Template set of the zero-shot branch s^ZS ([CODE] Tip-Adapter templates)."""
    eval_batch_size: int = 64
    """Images per evaluation forward pass (maps are megabytes per image)."""
    fused: bool = False
    """RN adapters: compute Conv1×1 → BN → ReLU → AvgPool tile by tile from the input's moments (exact up to
    fp32 rounding, ~0.2x the step's peak memory; slower than the plain modules on CPU, see benchmarks/README.md)."""

    def __post_init__(self) -> None:
        TrainOptions.__post_init__(self)
        check_range("beta_steps", self.beta_steps, low=1)
        check_range("eval_batch_size", self.eval_batch_size, low=1)
        if any(lam < 0 for lam in self.loss_lambda):
            raise ConfigError(f"option loss_lambda takes weights >= 0, got {self.loss_lambda}")


LDC_DEVIATIONS = (
    "[PROPOSED] fp32 master weights with fp16 autocast on CUDA (-o amp); the official code trains fp16 "
    "Conv/Linear adapter weights (convert_weights) with fp32 BatchNorm. On CPU everything is fp32.",
    "[PROPOSED] each epoch trains on one cached ldc-policy view per image (view sampler, METHODS §1.6); the "
    "original draws a fresh view every epoch, so this is exact in distribution only with 1 + epochs views.",
    "[PROPOSED] a final batch of one image is merged into the previous batch (BatchNorm1d cannot train on "
    "one sample; the official loader with drop_last=False would crash on it).",
    "[PROPOSED] the frozen attention pooling (RN) / projection (ViT) is re-loaded from the store's backbone "
    "and run in fp32 (fp16 under autocast); s^ZS is recomputed in fp32 from the cached fp16 embedding.",
    "[PROPOSED] coop protocol: beta is searched on the few-shot val (min(k,4) per class), not the full val split.",
    "[PROPOSED] backbones other than RN50 / ViT-B/16: adapters map every level to layer4's channels and grid, "
    "the RN LF MLP is 4D→c4→D and the ViT MAF head keeps the hard-coded 2048 hidden units.",
)


@register_method
class LDC(Method):
    name = "ldc"
    description = (
        "LDC: multi-level adapters (MAF), inter-class deconfusion (ICD) and adaptive fusion (ALF) "
        "on cached layer maps; beta-fusion of MAF and ICD searched on val (§2.6)."
    )
    Config = LDCConfig
    deviations = LDC_DEVIATIONS
    validation_free = ValidationFree(
        f"[CODE] last epoch; [PROPOSED] β = {UNSEARCHED_BETA}, equal MAF/ICD weights (the code always searches β "
        "on val; the trained ALF fusion is scored beside it)",
        {"select": "last"},
    )
    paper_protocol = (
        "beta searched on the full val split (when the store has val_full); ImageNet searches beta "
        "on test, as ldc_train.py does without a val loader. The official single seed is 2024 "
        "(pass --seeds 2024 with a store that holds that draw)."
    )
    paper_full_val = True
    paper_test_oracle = True  # only read for the ImageNet beta search
    min_views = {"ldc": 2}
    needs_backbone = True
    lite: bool = False

    quick = {"epochs": 1}
    needed = Needs(
        eval_taps=("pooled", "multilevel"), train_views=(ViewNeed("ldc", 10, ("pooled", "multilevel")),)
    )

    @classmethod
    def rebuild_head(cls, bundle, state, backbone) -> LDCHead:
        cfg, meta = bundle.meta["config"], bundle.meta["backbone"]
        kind, d, taps = meta.get("kind", "rn"), int(meta["embed_dim"]), bundle.inputs[1:]
        frozen = tower_pooling(backbone().model.visual, kind)
        shapes = [tuple(bundle.meta["tap_shapes"][t]) for t in taps]
        trunk = build_trunk(kind, shapes, frozen, embed_dim=d, fuse=cfg["fuse"], lite=cls.lite)
        return LDCHead(
            trunk,
            taps=taps,
            text=state["text"],
            scale=float(state["scale"]),
            maf_hidden=d if kind == "rn" else VIT_MAF_HIDDEN,
            eval_batch_size=int(cfg["eval_batch_size"]),
        )

    def build_head(self, task: FitTask, *, generator: torch.Generator) -> LDCHead:
        cfg, kind = self.config, task.info.backbone.get("kind", "rn")
        taps = ldc_taps(task.store, kind=kind, lite=self.lite)
        frozen = frozen_pooling(task)
        d = task.info.embed_dim
        with seeded_init(generator):
            trunk = build_trunk(
                kind,
                tap_shapes(task, taps),
                frozen,
                embed_dim=d,
                fuse=cfg.fuse,
                lite=self.lite,
                fused=cfg.fused,
            )
            return LDCHead(
                trunk,
                taps=taps,
                text=task.text(cfg.templates),
                scale=task.info.zs_scale,
                maf_hidden=d if kind == "rn" else VIT_MAF_HIDDEN,
                eval_batch_size=cfg.eval_batch_size,
            )

    def train_settings(self, task: FitTask) -> TrainSettings:
        return self.config.train_settings(policy="ldc", merge_singleton=True)

    def loss(self, outputs, labels, inputs) -> torch.Tensor:
        return ldc_loss(outputs, labels, lambdas=self.config.loss_lambda)

    def selector(self, task: FitTask, head: LDCHead) -> Selector | None:
        if self.config.select == "last":
            return None
        source = task.views(task.val, taps=head.inputs)

        def score(h):
            return searched_accuracy(
                h, source, task.val.labels, steps=self.config.beta_steps, device=task.device
            )[1]

        return Selector(source, task.val.labels, name=task.val.name, score=score)

    def finalize(self, result: TrainResult, task: FitTask) -> FitResult:
        head = result.head
        selection = {
            "epoch": result.best_epoch,
            "iteration": result.best_iter,
            "epoch_score": result.best_score,
            "epoch_on": "last" if self.config.select == "last" else task.val.name,
        }
        if not task.has_val:  # --validation none
            head.set_beta(UNSEARCHED_BETA)
            selection |= {"beta": UNSEARCHED_BETA, "search_on": "none"}
            return FitResult(head, selection=selection, history=result.history)
        split = search_split(task)
        beta, acc = searched_accuracy(
            head,
            task.views(split, taps=head.inputs),
            split.labels,
            steps=self.config.beta_steps,
            device=task.device,
        )
        head.set_beta(beta)
        selection |= {"beta": beta, "search_acc": acc, "search_on": split.name, "search_n": len(split)}
        return FitResult(head, selection=selection, history=result.history)


def searched_accuracy(
    head: LDCHead, source, labels: torch.Tensor, *, steps: int, device
) -> tuple[float, float]:
    """(β, accuracy %) of the β search on the split behind ``source`` (MAF and ICD on the center view)."""
    out = predict(head, source, device=device, batch_size=head.eval_batch_size)
    return search_beta(out["maf"], out["icd"], labels, steps=steps)


def search_split(task: FitTask) -> SplitRef:
    """Where β is searched: val; under --protocol paper on ImageNet, test ([CODE] no val loader for ImageNet)."""
    if task.info.protocol == "paper" and task.info.dataset == "imagenet" and task.oracle is not None:
        return task.oracle
    return task.val


@register_method
class LDCLite(LDC):
    name = "ldc_lite"
    description = (
        "LDC-lite [PROPOSED APPROXIMATION, not LDC]: the LDC head with adapters applied to 7×7-pooled "
        "maps (RN) or block token means (ViT); 376 KB instead of 3 MB per RN50 view (§2.6.7)."
    )
    deviations = (
        "[PROPOSED] APPROXIMATION: adapters run on maps average-pooled to layer4's grid (RN: Conv1×1 → BN → ReLU "
        "on the pooled map) or on block token means (ViT: Linear → LayerNorm → ReLU on the mean); ReLU, BN and "
        "LayerNorm do not commute with pooling, so this is not LDC. Report it separately.",
    ) + LDC_DEVIATIONS
    lite = True

    # [PROPOSED] METHODS §2.6.7 ldc-lite: 376 KB instead of 3 MB per RN50 view; an approximation
    needed = Needs(
        eval_taps=("pooled", "multilevel_lite"),
        train_views=(ViewNeed("ldc", 10, ("pooled", "multilevel_lite")),),
    )

    def build_head(self, task: FitTask, *, generator: torch.Generator) -> LDCHead:
        task.warn("ldc_lite is an approximation of LDC (adapters on pre-pooled maps), not LDC itself")
        return super().build_head(task, generator=generator)
