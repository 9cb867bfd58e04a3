"""ZS-LP (METHODS §2.10): a cosine linear probe initialised with the zero-shot text weights.

[CODE] jusiro/CLAP trainers/adapters.py (``AdapterMethod`` with ``INIT=ZS``, ``CustomCLIP.forward_lp``,
``TrainerXCostume.run_epoch``, ``ADAPTER.forward_backward``), configs/trainers/SGD_lr1e-1_B256_ep300.yaml.
The CLAP repo's trainer is shared by ZS-LP, CLAP (:mod:`.clap`) and its CrossModal probe
(:mod:`.cross_modal`); this module holds that shared loop.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import StoreError
from ..training import FitTask, Head
from ..training.schedule import lr_factor
from ..training.settings import TrainSettings
from .base import FitResult, Method, ValidationFree
from .needs import Needs, ViewNeed
from .options import MethodConfig, check_range
from .registry import register_method

CLAP_VIEWS = 20
"""[CODE] AdapterMethod.epochs_aumentation = 20: augmented passes over the support set, concatenated."""


@dataclass(frozen=True)
class ClapTrainConfig(MethodConfig):
    """The CLAP repo's recipe ([CODE] SGD_lr1e-1_B256_ep300.yaml, Dassl SGD defaults)."""

    epochs: int = 300
    """[CODE] OPTIM.MAX_EPOCH 300."""
    lr: float = 0.1
    """[CODE] OPTIM.LR 0.1 (SGD, momentum 0.9)."""
    batch_size: int = 256
    """[CODE] DATALOADER.TRAIN_X.BATCH_SIZE 256 (features per step, drawn from the pool of views)."""
    momentum: float = 0.9
    """[CODE] Dassl OPTIM.MOMENTUM 0.9."""
    weight_decay: float = 0.0
    """[CODE] OPTIM.WEIGHT_DECAY 0.0."""
    warmup_lr: float = 1e-5
    """[CODE] one constant warm-up epoch at WARMUP_CONS_LR 1e-5, then cosine per epoch."""
    views: int = CLAP_VIEWS
    """Augmented views per support image in the training pool ([CODE] epochs_aumentation 20; coop policy)."""
    templates: str = "coop"
    """Template set of the text weights t (the store's text/<set>; coop = the repo's CUSTOM_TEMPLATES)."""

    def __post_init__(self) -> None:
        for name in ("epochs", "lr", "momentum", "weight_decay", "warmup_lr"):
            check_range(name, getattr(self, name), low=0)
        check_range("batch_size", self.batch_size, low=1)
        check_range("views", self.views, low=1)

    def schedule(self) -> TrainSettings:
        """The Dassl schedule: 1 constant warm-up epoch, then cosine over ``epochs``, stepped per epoch."""
        return TrainSettings(
            epochs=self.epochs,
            lr=self.lr,
            optimizer="sgd",
            schedule="cosine_epoch",
            warmup=1,
            warmup_lr=self.warmup_lr,
        )


# ---------------------------------------------------------------------------- formulas and head


def cosine_logits(f: torch.Tensor, prototypes: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """``scale · normalize(f) normalize(W)ᵀ`` ([CODE] forward_lp: both normalised every forward, no bias)."""
    return F.normalize(f, dim=-1) @ F.normalize(prototypes, dim=-1).T * scale


class CosineProbeHead(Head):
    """A cosine classifier over the pooled embedding; ``prototypes`` ``[C, D]`` is the trained probe."""

    inputs = ("pooled",)

    def __init__(self, prototypes: torch.Tensor, *, scale: float) -> None:
        super().__init__()
        self.prototypes = nn.Parameter(prototypes.float().clone())
        self.register_buffer("scale", torch.tensor(float(scale)))

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        return cosine_logits(x["pooled"], self.prototypes, self.scale)


def batches_per_epoch(images: int, batch_size: int) -> int:
    """``len(train_loader_x)``: Dassl drops the last batch when the support set holds a whole one.

    [CODE] run_epoch draws ``len(self.train_loader_x)`` batches per epoch, a count over the N support
    images, not over the 20·N pooled views; Dassl's ``drop_last = len(data) >= batch_size``.
    """
    return images // batch_size if images >= batch_size else 1


def view_pool(views: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``[N, V, D]`` views → the concatenated pool ``[V·N, D]`` in pass-major order, with its labels."""
    n, v, d = views.shape
    return views.transpose(0, 1).reshape(v * n, d), labels.repeat(v)


Penalty = Callable[[torch.Tensor], torch.Tensor]
"""``penalty(prototypes)``: a term added to the cross-entropy (CLAP's constraint)."""


def train_probe(
    head: CosineProbeHead,
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    config: ClapTrainConfig,
    batches: int,
    generator: torch.Generator,
    penalty: Penalty | None = None,
    resample: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None,
    after_epoch: Callable[[int], None] | None = None,
) -> list[dict]:
    """The CLAP repo's loop: per epoch shuffle the pool, take the first ``batches`` batches, SGD steps.

    [CODE] run_epoch shuffles the whole pool and steps on slices ``[b·B, (b+1)·B)`` for
    ``b < len(train_loader_x)``; the lr follows Dassl's per-epoch schedule. ``resample`` redraws the pool
    each epoch (CrossModal's half sample), ``after_epoch`` runs CLAP's optional outer step.
    """
    settings = config.schedule()
    optimizer = torch.optim.SGD(
        [head.prototypes], lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay
    )
    history = []
    head.train()
    for epoch in range(config.epochs):
        for group in optimizer.param_groups:
            group["lr"] = config.lr * lr_factor(epoch, total=config.epochs, settings=settings)
        x, y = resample(features, labels) if resample is not None else (features, labels)
        order = torch.randperm(len(y), generator=generator)
        x, y = x[order], y[order]
        losses = []
        for b in range(batches):
            chunk = slice(b * config.batch_size, (b + 1) * config.batch_size)
            xb, yb = x[chunk], y[chunk]
            loss = F.cross_entropy(head({"pooled": xb}), yb)
            if penalty is not None:
                loss = loss + penalty(head.prototypes)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
        if after_epoch is not None:
            after_epoch(epoch)
        history.append(
            {"epoch": epoch, "loss": sum(losses) / len(losses), "lr": optimizer.param_groups[0]["lr"]}
        )
    head.eval()
    return history


def cached_views(task: FitTask, policy: str, wanted: int) -> int:
    """How many augmented ``policy`` views to use: ``wanted``, or fewer (recorded) when the store holds fewer."""
    have = task.num_views(policy) - 1
    if have < wanted:
        task.warn(
            f"store holds {max(have, 0)} augmented '{policy}' views per train image; the method uses {wanted}"
        )
    if have < 1:
        raise StoreError(f"the store holds no augmented '{policy}' views; extract with --for the method")
    return min(have, wanted)


def support_pool(task: FitTask, config: ClapTrainConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The pool of ``config.views`` cached coop views per support image, concatenated ``[V·N, D]``."""
    count = cached_views(task, "coop", config.views)
    views = task.train_views("coop", views=range(1, 1 + count))  # view 0 is the center crop
    return view_pool(views, task.train.labels.long())


def raw_text_average(task: FitTask, template_set: str) -> torch.Tensor:
    """The CLAP repo's text weights t ``[C, D]``: the mean of the raw per-template embeddings, not normalised."""
    return task.text_raw(template_set).float().mean(1)


CLAP_REPO_DEVIATIONS = (
    "[CODE] t is the mean of the raw (unnormalised) per-template embeddings of the templates set "
    "(text_raw/coop), as the code averages them.",
    "[PROPOSED] ImageNet's coop set is 'a photo of a {}.' alone; the code averages the 7 select templates "
    "and that one.",
    "[PROPOSED] the 20 augmented views are pre-extracted coop-policy views 1..20 (Dassl random_resized_crop "
    "0.08-1 + flip; exact in distribution).",
    "[PROPOSED] fp32 on cached fp16 embeddings; shuffles draw from the run's generator instead of np.random.",
)


CLAP_NEEDS = Needs(train_views=(ViewNeed("coop", 1 + CLAP_VIEWS, ("pooled",)),), text_raw=("coop",))
"""What the CLAP repo's probes read: 20 coop views per support image and the raw coop text embeddings."""


# ---------------------------------------------------------------------------- method


@register_method
class ZsLp(Method):
    name = "zs_lp"
    description = (
        "ZS-LP: cosine linear probe initialised with the zero-shot text weights, SGD on 20 cached coop views "
        "per image, last epoch, no validation (CLAP repo, §2.10)."
    )
    Config = ClapTrainConfig
    deviations = CLAP_REPO_DEVIATIONS
    validation_free = ValidationFree("[CODE] as is: the fixed recipe's last epoch, no val read")
    paper_protocol = "Same as coop: the official code keeps the last epoch and reads no validation split."
    trains = True
    min_views = {"coop": 2}

    needed = CLAP_NEEDS
    quick = {"epochs": 2}

    @classmethod
    def rebuild_head(cls, bundle, state, backbone) -> CosineProbeHead:
        return CosineProbeHead(state["prototypes"], scale=float(state["scale"]))

    def fit(self, task: FitTask, *, generator: torch.Generator) -> FitResult:
        cfg = self.config
        features, labels = support_pool(task, cfg)
        head = CosineProbeHead(raw_text_average(task, cfg.templates), scale=task.info.zs_scale)
        history = train_probe(
            head,
            features,
            labels,
            config=cfg,
            batches=batches_per_epoch(len(task.train), cfg.batch_size),
            generator=generator,
        )
        return FitResult(head, selection={"epoch": cfg.epochs - 1, "select": "last"}, history=history)
