"""Optimisers and learning-rate schedules named by :class:`TrainSettings`."""

from __future__ import annotations

import math

import torch

from .settings import TrainSettings


def build_optimizer(params, settings: TrainSettings) -> torch.optim.Optimizer:
    if settings.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=settings.lr, momentum=settings.momentum, weight_decay=settings.weight_decay
        )
    if settings.optimizer == "adam":
        return torch.optim.Adam(params, lr=settings.lr, eps=settings.eps, weight_decay=settings.weight_decay)
    return torch.optim.AdamW(params, lr=settings.lr, eps=settings.eps, weight_decay=settings.weight_decay)


def lr_factor(step: int, *, total: int, settings: TrainSettings) -> float:
    """Multiplier of the base lr at schedule step ``step`` (an iteration or an epoch).

    Cosine anneals to 0 over ``total`` steps like ``CosineAnnealingLR(T_max=total)``. A constant
    warm-up holds ``warmup_lr`` and then continues the cosine at its step 0, which is what Dassl's
    ``ConstantWarmupScheduler`` does ([CODE] Dassl lr_scheduler.py: the successor cosine keeps
    ``T_max = max_epoch``); a linear warm-up ramps from ``warmup_lr`` to ``lr``.
    """
    base = settings.lr
    if step < settings.warmup and base > 0:
        if settings.warmup_mode == "constant":
            return settings.warmup_lr / base
        return (settings.warmup_lr + (base - settings.warmup_lr) * step / settings.warmup) / base
    if settings.schedule == "constant" or total <= 0:
        return 1.0
    t = step - settings.warmup
    return 0.5 * (1.0 + math.cos(math.pi * min(t, total) / total))


def build_scheduler(
    optimizer: torch.optim.Optimizer, settings: TrainSettings, *, iters_per_epoch: int, total_iters: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Stepped once per iteration for ``cosine_iter``, once per epoch otherwise (see :func:`per_iteration`)."""
    if per_iteration(settings):
        total = total_iters
    else:
        total = -(-total_iters // max(iters_per_epoch, 1))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total=total, settings=settings)
    )


def per_iteration(settings: TrainSettings) -> bool:
    return settings.schedule == "cosine_iter"
