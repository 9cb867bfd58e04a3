"""CrossModal linear probe (METHODS §2.10): class text embeddings join the support set as labelled samples.

[CODE] as the CLAP toolbox runs it (jusiro/CLAP trainers/adapters.py: ``INIT=CrossModal``, ``ADAPTER.train``
"Preparing cross-modal dataset", ``TrainerXCostume.run_epoch``'s half sample), on the same 20-view pool and
recipe as ZS-LP (:mod:`.zs_lp`); the idea is linzhiqiu/cross_modal_adaptation's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..training import FitTask
from .base import FitResult, Method, ValidationFree
from .options import ConfigError
from .registry import register_method
from .zs_lp import (
    CLAP_NEEDS,
    CLAP_REPO_DEVIATIONS,
    ClapTrainConfig,
    CosineProbeHead,
    ZsLp,
    batches_per_epoch,
    raw_text_average,
    support_pool,
    train_probe,
)


def text_samples(
    text: torch.Tensor, count: int, *, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``count`` text embeddings drawn with replacement from ``text`` ``[C, T, D]``, with their class labels.

    [CODE] "resample for a balanced dataset between modalities": ``np.random.choice(C·T, #image features)``.
    """
    c, t, d = text.shape
    flat, labels = text.reshape(c * t, d), torch.arange(c).repeat_interleave(t)
    idx = torch.randint(0, c * t, (count,), generator=generator)
    return flat[idx], labels[idx]


def half_sample(generator: torch.Generator):
    """Each epoch, ``M // 2`` of the ``M`` pooled samples drawn with replacement ([CODE] run_epoch, CrossModal)."""

    def resample(features: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        idx = torch.randint(0, len(labels), (len(labels) // 2,), generator=generator)
        return features[idx], labels[idx]

    return resample


@dataclass(frozen=True)
class CrossModalConfig(ClapTrainConfig):
    text_sets: tuple[str, ...] = ("coop",)
    """Template sets whose raw per-template embeddings become text samples (coop = the code's)."""

    def __post_init__(self) -> None:
        ClapTrainConfig.__post_init__(self)
        if not self.text_sets:
            raise ConfigError("option text_sets needs at least one template set")


@register_method
class CrossModal(Method):
    name = "cross_modal"
    description = (
        "CrossModal linear probe: ZS-LP whose training pool adds the class text embeddings as labelled "
        "samples (CLAP toolbox recipe, §2.10)."
    )
    Config = CrossModalConfig
    deviations = CLAP_REPO_DEVIATIONS + (
        "[CODE] the text samples are the raw per-template embeddings (text_raw/<set> of every set in "
        "text_sets), one sample per template and class; the probe normalises every input.",
        "[PROPOSED] the recipe is the CLAP toolbox's CrossModal (ZS init, SGD 0.1, 300 epochs, half sample per "
        "epoch), not cross_modal_adaptation's own search over lr / weight decay on val.",
    )
    validation_free = ValidationFree("as is: the fixed recipe's last epoch, no val read")
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
        text = torch.cat([task.text_raw(s).float() for s in cfg.text_sets], dim=1)  # [C, T, D]
        words, word_labels = text_samples(text, len(labels), generator=generator)
        pool = torch.cat([features, words]), torch.cat([labels, word_labels])
        head = CosineProbeHead(raw_text_average(task, cfg.templates), scale=task.info.zs_scale)
        history = train_probe(
            head,
            *pool,
            config=cfg,
            batches=batches_per_epoch(len(task.train), cfg.batch_size),
            generator=generator,
            resample=half_sample(generator),
        )
        selection = {"epoch": cfg.epochs - 1, "select": "last", "text_samples": len(word_labels)}
        return FitResult(head, selection=selection, history=history)
