"""What the shared trainer needs to know: optimiser, schedule, batching, views, selection."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..errors import UsageError

Optimizer = Literal["adamw", "sgd"]
Schedule = Literal["cosine_iter", "cosine_epoch", "constant"]
WarmupMode = Literal["constant", "linear"]
Select = Literal["best", "last"]


@dataclass(frozen=True)
class TrainSettings:
    """One training run of a head on cached tensors. Methods build it from their config."""

    epochs: int
    """Passes over the support set (the view sampler advances once per pass)."""
    batch_size: int
    """Images per step."""
    lr: float
    """Base learning rate."""
    optimizer: Optimizer = "adamw"
    """``adamw`` (torch AdamW) or ``sgd`` (with ``momentum``)."""
    weight_decay: float = 0.01
    """Decoupled (AdamW) or L2 (SGD) weight decay; 0.01 is torch AdamW's default."""
    eps: float = 1e-8
    """AdamW epsilon."""
    momentum: float = 0.9
    """SGD momentum."""
    schedule: Schedule = "cosine_iter"
    """Cosine annealing to 0 stepped per iteration or per epoch, or a constant rate."""
    warmup: int = 0
    """Warm-up length in schedule units (iterations for ``cosine_iter``, else epochs)."""
    warmup_mode: WarmupMode = "constant"
    """``constant``: ``warmup_lr`` during warm-up (Dassl); ``linear``: ramp from ``warmup_lr`` to ``lr``."""
    warmup_lr: float = 1e-5
    """Learning rate at the start of (or throughout a constant) warm-up."""
    iters: int = 0
    """If > 0, stop after this many iterations instead of after ``epochs`` passes."""
    amp: bool = False
    """Mixed precision (fp16 autocast + grad scaling); applied on CUDA only."""
    eval_every: int = 0
    """Evaluate the selection split every N iterations; 0 = after every epoch."""
    select: Select = "best"
    """``best``: keep the state with the best selection accuracy (first strict maximum); ``last``: keep the end."""
    policy: str = "center"
    """Augmentation policy whose cached views feed training (view 0 is the center crop)."""
    drop_last: bool = False
    """Drop the last incomplete batch of each epoch."""
    merge_singleton: bool = False
    """Merge a final batch of one image into the previous batch (BatchNorm cannot train on one sample)."""
    grad_clip: float = 0.0
    """Clip the gradient norm to this value; 0 disables."""

    def __post_init__(self) -> None:
        if self.epochs < 0 or self.iters < 0:
            raise UsageError(f"epochs and iters must be >= 0, got {self.epochs} and {self.iters}")
        if self.batch_size < 1:
            raise UsageError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.lr < 0 or self.weight_decay < 0 or self.warmup < 0 or self.eval_every < 0:
            raise UsageError("lr, weight_decay, warmup and eval_every must be >= 0")

    @property
    def trains(self) -> bool:
        return self.epochs > 0 or self.iters > 0
