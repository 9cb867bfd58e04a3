"""PromptKD (the stage CAPT starts from, METHODS §2.9.2): student prompts distilled from a teacher's cached logits.

[CODE] zhengli97/PromptKD ``trainers/promptkd.py::forward_backward``:
``L = KD_WEIGHT · T² · KL(softmax(t/T) ‖ softmax(s/T))`` summed and divided by ``s.numel()``, no labels.
Cache-native: the student is CAPT's text side (:class:`CaptPromptHead`) on the cached image embeddings;
the teacher's logits are another store's zero-shot logits of the same images (``-o teacher``).
``capt -o init=RUN`` starts from the prompts this method learns.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..training import FitTask, TrainData, TrainSettings, seeded_init, train
from ..training.settings import Optimizer, Schedule
from .base import FitResult, Method, ValidationFree
from .capt import open_teacher_store, teacher_logits
from .capt_c import IndexedViews
from .capt_prompts import CaptPromptHead
from .needs import Needs, ViewNeed
from .options import ConfigError, TrainOptions, check_range
from .registry import register_method
from .zero_shot import ZeroShotHead


def kd_loss(
    student: torch.Tensor, teacher: torch.Tensor, *, temperature: float, weight: float
) -> torch.Tensor:
    """``weight · T² · Σ KL(p_t ‖ p_s) / numel`` ([CODE] ``F.kl_div(..., reduction='sum') · T² / numel``)."""
    t = temperature
    kl = F.kl_div(F.log_softmax(student / t, dim=1), F.softmax(teacher / t, dim=1), reduction="sum")
    return weight * kl * t * t / student.numel()


@dataclass(frozen=True)
class PromptKDConfig(TrainOptions):
    epochs: int = 20
    """[CODE] PromptKD OPTIM.MAX_EPOCH 20."""
    batch_size: int = 32
    """[CODE] PromptKD batch 32."""
    lr: float = 5e-3
    """[CODE] PromptKD OPTIM.LR 0.005."""
    optimizer: Optimizer = "sgd"
    """[CODE] OPTIM.NAME sgd."""
    weight_decay: float = 5e-4
    """[CODE] Dassl OPTIM.WEIGHT_DECAY 5e-4."""
    momentum: float = 0.9
    """[CODE] Dassl OPTIM.MOMENTUM 0.9."""
    schedule: Schedule = "cosine_epoch"
    """[CODE] cosine, stepped once per epoch."""
    warmup: int = 1
    """[CODE] 1 constant warm-up epoch."""
    warmup_lr: float = 1e-5
    """[CODE] warm-up learning rate 1e-5."""
    n_ctx: int = 4
    """[CODE] N_CTX_TEXT 4."""
    ctx_init: str = "a photo of a"
    """[CODE] CTX_INIT."""
    text_depth: int = 9
    """[CODE] PROMPT_DEPTH_TEXT 9 (capped at the text encoder's depth)."""
    kd_weight: float = 1000.0
    """[CODE] TRAINER.PROMPTKD.KD_WEIGHT."""
    temperature: float = 1.0
    """[CODE] TRAINER.PROMPTKD.TEMPERATURE 1."""
    teacher: str | None = None
    """ARCH/PRETRAINED of another store of the dataset (e.g. ViT-L-14/openai); none = the student's own zero-shot
    logits (a smoke setting: the prompts then learn to reproduce zero-shot)."""
    templates: str = "tip"
    """Template set of the teacher's zero-shot logits and of the novel classes under base2novel."""
    truncate: bool = True
    """[PROPOSED] Run the text encoder on max(eot)+1 positions (exact under the causal mask)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("n_ctx", "text_depth"):
            check_range(name, getattr(self, name), low=1)
        check_range("kd_weight", self.kd_weight, low=0)
        check_range("temperature", self.temperature, low=0, strict_low=True)
        if self.teacher is not None and "/" not in self.teacher:
            raise ConfigError(f"option teacher takes ARCH/PRETRAINED, got {self.teacher!r}")


@register_method
class PromptKD(Method):
    name = "promptkd"
    description = (
        "PromptKD, the stage CAPT starts from: text prompts distilled (KL, T=1, weight 1000) from a teacher "
        "store's cached zero-shot logits; no labels (§2.9.2)."
    )
    Config = PromptKDConfig
    deviations = (
        "[CODE] the official student learns deep visual prompts and a 512→768 projector against the teacher's "
        "text features; on the cache (no visual prompts yet) the student learns CAPT's text prompts instead.",
        "[PROPOSED] the teacher is another store's zero-shot logits on the center view (the official teacher is a "
        "PromptSRC-tuned ViT-L/14 run on the augmented image); default: the student's own zero-shot logits.",
        "[PROPOSED] distilled on the few-shot train split's cached coop views (one per image per epoch), over the "
        "task's classes; the official code distils on every train image of all classes, labels unused.",
        "[PROPOSED] fp32 training; the epoch is selected on the few-shot val (the official code keeps the best "
        "val model too); novel classes under base2novel use the frozen zero-shot text.",
    )
    validation_free = ValidationFree(
        "[CODE] last epoch (PromptKD evaluates the final model)", {"select": "last"}
    )
    paper_protocol = "Same as coop: PromptKD's own setting is --protocol base2novel."
    min_views = {"coop": 2}
    needs_backbone = True
    base2novel = True

    quick = {"epochs": 1}
    needed = Needs(train_views=(ViewNeed("coop", 21, ("pooled",)),))

    @classmethod
    def rebuild_head(cls, bundle, state, backbone) -> CaptPromptHead:
        cfg, bb = bundle.meta["config"], backbone()
        return CaptPromptHead(
            bb.model,
            bb.tokenizer,
            bundle.classnames,
            n_ctx=int(cfg["n_ctx"]),
            ctx_init="",  # the saved context replaces it
            text_depth=int(cfg["text_depth"]),
            dpc_weight=None,
            scale=float(state["scale"]),
            truncate=bool(cfg["truncate"]),
        )

    def train_settings(self, task: FitTask) -> TrainSettings:
        return self.config.train_settings(policy="coop")

    def build_head(self, task: FitTask, *, generator: torch.Generator) -> CaptPromptHead:
        cfg, backbone = self.config, task.backbone()
        with seeded_init(generator):
            return CaptPromptHead(
                backbone.model,
                backbone.tokenizer,
                list(task.info.classnames),
                n_ctx=cfg.n_ctx,
                ctx_init=cfg.ctx_init,
                text_depth=cfg.text_depth,
                dpc_weight=None,
                scale=task.info.zs_scale,
                truncate=cfg.truncate,
            )

    def fit(self, task: FitTask, *, generator: torch.Generator) -> FitResult:
        cfg, settings = self.config, self.train_settings(task)
        source = task.train_source("coop", taps=("pooled",), epochs=settings.epochs)
        head = self.build_head(task, generator=generator)
        self.zs_text, self.scale, self.teacher = task.text(cfg.templates), task.info.zs_scale, None
        note = f"the student's own zero-shot logits ({cfg.templates} templates) of each cached view"
        if cfg.teacher is not None:
            store = open_teacher_store(task.store, cfg.teacher)
            try:
                self.teacher = teacher_logits(store, task, templates=cfg.templates)
            finally:
                store.close()
            note = f"{cfg.teacher} zero-shot logits ({cfg.templates} templates, center view) from {store.root.name}"
        result = train(
            head,
            TrainData(IndexedViews(source), task.train.labels),
            settings=settings,
            generator=generator,
            selector=self.selector(task, head),
            loss_fn=self.loss,
            device=task.device,
        )
        selection = {
            "epoch": result.best_epoch,
            "val_acc": result.best_score,
            "teacher": note,
            "text_depth": head.text_depth,
            "text_length": head.length,
        }
        return FitResult(result.head, selection=selection, history=result.history)

    def loss(
        self, outputs: dict[str, torch.Tensor], labels: torch.Tensor, inputs: dict[str, torch.Tensor]
    ) -> torch.Tensor:
        """KL from the teacher's logits of the batch's images; labels are not used ([CODE] L_ukd)."""
        student = next(iter(outputs.values()))
        if self.teacher is None:
            f = F.normalize(inputs["pooled"], dim=-1)
            teacher = self.scale * f @ self.zs_text.to(f).T
        else:
            teacher = self.teacher[inputs["image_id"].cpu()].to(student)
        cfg = self.config
        return kd_loss(student, teacher.detach(), temperature=cfg.temperature, weight=cfg.kd_weight)

    def novel_head(self, fitted: FitResult, task: FitTask) -> ZeroShotHead:
        return ZeroShotHead(task.text(self.config.templates), scale=task.info.zs_scale)
