"""CLAP (METHODS §2.10): ZS-LP with a class-wise penalty pulling the probe back to the zero-shot weights.

[CODE] jusiro/CLAP trainers/adapters.py: ``AdapterMethod.zero_shot_constraint``,
``init_lagrangian_multipliers``, ``outer_step``; ``ADAPTER.train`` (the outer step only runs for
constraint names containing "adaptative", so never by default).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F

from ..training import FitTask
from .base import FitResult, Method, ValidationFree
from .registry import register_method
from .zs_lp import (
    CLAP_NEEDS,
    CLAP_REPO_DEVIATIONS,
    ClapTrainConfig,
    CosineProbeHead,
    ZsLp,
    batches_per_epoch,
    cosine_logits,
    raw_text_average,
    support_pool,
    train_probe,
)

Multipliers = Literal["zero_shot", "balanced", "corrected", "constant"]
Distance = Literal["l2", "cosine"]


# ---------------------------------------------------------------------------- formulas


def class_multipliers(
    zs_logits: torch.Tensor, labels: torch.Tensor, *, kind: Multipliers = "zero_shot"
) -> torch.Tensor:
    """λ ``[C]``: class c's mean zero-shot softmax probability over its own support views.

    [CODE] init_lagrangian_multipliers: ``diag(softmax(logits)ᵀ onehot) / onehot.sum(0)``; "balanced"
    gives ones, "corrected" rescales λ to sum to C, "constant" sets every λ_c to their mean.
    """
    num_classes = zs_logits.shape[-1]
    if kind == "balanced":
        return torch.ones(num_classes)
    onehot = F.one_hot(labels.long(), num_classes).float()  # [M, C]
    performance = torch.diag(torch.softmax(zs_logits.float(), -1).T @ onehot) / onehot.sum(0)
    if kind == "corrected":
        performance = performance * (num_classes / performance.sum().item())
    if kind == "constant":
        performance = torch.ones(num_classes) * performance.mean().item()
    return performance


def dissimilarity(prototypes: torch.Tensor, text: torch.Tensor, *, distance: Distance = "l2") -> torch.Tensor:
    """Per class ``‖w_c − t_c‖²`` on the raw weights ("l2") or ``1 − cos(w_c, t_c)`` ("cosine")."""
    if distance == "l2":
        return (prototypes - text).pow(2).sum(-1)
    return 1 - F.cosine_similarity(prototypes, text)


def constraint(
    prototypes: torch.Tensor, text: torch.Tensor, multipliers: torch.Tensor, *, distance: Distance = "l2"
) -> torch.Tensor:
    """``mean_c λ_c · d(w_c, t_c)`` ([CODE] zero_shot_constraint)."""
    return torch.mean(multipliers * dissimilarity(prototypes, text, distance=distance))


def outer_step(
    prototypes: torch.Tensor, text: torch.Tensor, multipliers: torch.Tensor, penalty: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The augmented-Lagrangian update (PHR): new (λ, ρ) from the current l2 constraint values.

    [CODE] outer_step: ``x = λ + ρ·h``; λ ← x where x ≥ 0 else 0 (the PHR gradient); ρ ← h.
    """
    h = (prototypes - text).pow(2).sum(-1).detach()
    x = multipliers + penalty * h
    return torch.where(x >= 0, x, torch.zeros_like(h)).clone(), h.clone()


# ---------------------------------------------------------------------------- method


@dataclass(frozen=True)
class ClapConfig(ClapTrainConfig):
    multipliers: Multipliers = "zero_shot"
    """λ_c: zero_shot (the closed form, CLAP's "l2" default), balanced (1), corrected (sum C), constant (mean)."""
    distance: Distance = "l2"
    """Penalty distance between w_c and t_c: l2 (squared, on raw weights; default) or cosine."""
    adaptive: bool = False
    """Run the augmented-Lagrangian outer step after every epoch ([CODE] only for "adaptative" constraints; off)."""


@register_method
class Clap(Method):
    name = "clap"
    description = (
        "CLAP: ZS-LP plus the class-wise penalty mean_c λ_c‖w_c − t_c‖², λ_c closed form from zero-shot "
        "confidence; no validation (§2.10)."
    )
    Config = ClapConfig
    deviations = CLAP_REPO_DEVIATIONS + (
        "[CODE] λ_c from the zero-shot logits scale·cos(f, t) of the 20 pooled views, computed from the cached "
        "views and the store's text weights (the code computes them while extracting the same views).",
    )
    validation_free = ValidationFree(
        "[CODE] as is: one configuration for every task, last epoch, no val read"
    )
    paper_protocol = ZsLp.paper_protocol
    min_views = {"coop": 2}

    needed = CLAP_NEEDS
    quick = {"epochs": 2}

    @classmethod
    def rebuild_head(cls, bundle, state, backbone) -> CosineProbeHead:
        return CosineProbeHead(state["prototypes"], scale=float(state["scale"]))

    def fit(self, task: FitTask, *, generator: torch.Generator) -> FitResult:
        cfg = self.config
        features, labels = support_pool(task, cfg)
        text = raw_text_average(task, cfg.templates)
        head = CosineProbeHead(text, scale=task.info.zs_scale)
        with torch.no_grad():
            zs = cosine_logits(features, text, task.info.zs_scale)
        state = {"lambda": class_multipliers(zs, labels, kind=cfg.multipliers)}
        state["rho"] = torch.zeros_like(state["lambda"])

        def penalty(prototypes: torch.Tensor) -> torch.Tensor:
            return constraint(prototypes, text, state["lambda"], distance=cfg.distance)

        def after_epoch(epoch: int) -> None:
            if cfg.adaptive:
                state["lambda"], state["rho"] = outer_step(
                    head.prototypes, text, state["lambda"], state["rho"]
                )

        initial = state["lambda"].tolist()
        history = train_probe(
            head,
            features,
            labels,
            config=cfg,
            batches=batches_per_epoch(len(task.train), cfg.batch_size),
            generator=generator,
            penalty=penalty,
            after_epoch=after_epoch,
        )
        selection = {"epoch": cfg.epochs - 1, "select": "last", "lambda": initial}
        if cfg.adaptive:
            selection["lambda_final"] = state["lambda"].tolist()
        return FitResult(head, selection=selection, history=history)
