"""Zero-shot CLIP (METHODS §2.1): ``100 · f̂ Wᵀ`` with the dataset's hand-crafted templates."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..training import FitTask, Head
from .base import FitResult, Method, ValidationFree
from .options import MethodConfig
from .registry import register_method


@dataclass(frozen=True)
class ZeroShotConfig(MethodConfig):
    templates: str = "tip"
    """Template set whose class weights classify (the store's text/<set>; tip always exists)."""


class ZeroShotHead(Head):
    """``scale · normalize(f) Wᵀ``; ``W`` rows are L2-normalised class text embeddings."""

    inputs = ("pooled",)

    def __init__(self, text: torch.Tensor, *, scale: float) -> None:
        super().__init__()
        self.register_buffer("text", text.float().clone())  # [C, D]
        self.register_buffer("scale", torch.tensor(float(scale)))

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        f = F.normalize(x["pooled"], dim=-1)  # [B, D]
        return self.scale * f @ self.text.T  # [B, C]


@register_method
class ZeroShot(Method):
    name = "zero_shot"
    description = "Zero-shot CLIP: 100·f̂Wᵀ with the dataset's templates; no training (METHODS §2.1)."
    Config = ZeroShotConfig
    validation_free = ValidationFree("as is: zero-shot has nothing to select")
    deviations = (
        "[PROPOSED] logits computed in fp32 from the cached embedding; the official code runs fp16 end to end.",
    )
    trains = False

    base2novel = True

    @classmethod
    def rebuild_head(cls, bundle, state, backbone) -> ZeroShotHead:
        return ZeroShotHead(state["text"], scale=float(state["scale"]))

    def fit(self, task: FitTask, *, generator: torch.Generator) -> FitResult:
        head = ZeroShotHead(task.text(self.config.templates), scale=task.info.zs_scale)
        return FitResult(head, selection={"templates": self.config.templates})

    def novel_head(self, fitted: FitResult, task: FitTask) -> ZeroShotHead:
        return ZeroShotHead(task.text(self.config.templates), scale=task.info.zs_scale)
