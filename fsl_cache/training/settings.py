"""What the shared trainer needs to know: optimiser, schedule, batching, views, selection."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..errors import UsageError

Optimizer = Literal["adamw", "sgd", "adam"]
Schedule = Literal["cosine_iter", "cosine_epoch", "constant"]
WarmupMode = Literal["constant", "linear"]
Select = Literal["best", "last"]


@dataclass(frozen=True, kw_only=True)
class Optimisation:
    """The trainer's knobs a user may turn: every gradient-based method's ``-o`` options start from these
    (``methods.options.TrainOptions``), and :class:`TrainSettings` adds what the method itself fixes."""

    epochs: int = 20
    """Passes over the support set; each image is seen through one cached augmented view per pass."""
    iters: int = 0
    """If > 0, train for this many iterations instead of ``epochs`` passes."""
    batch_size: int = 32
    """Images per step."""
    lr: float = 1e-3
    """Base learning rate."""
    optimizer: Optimizer = "adamw"
    """adamw (torch AdamW), sgd (with momentum) or adam (torch Adam, L2 weight decay as Dassl's adam)."""
    weight_decay: float = 0.01
    """Decoupled (AdamW) or L2 (SGD, Adam) weight decay; 0.01 is torch AdamW's default."""
    eps: float = 1e-8
    """AdamW / Adam epsilon."""
    momentum: float = 0.9
    """SGD momentum."""
    schedule: Schedule = "cosine_iter"
    """cosine_iter (cosine to 0, stepped per iteration), cosine_epoch (stepped per epoch) or constant."""
    warmup: int = 0
    """Warm-up length (iterations for cosine_iter, else epochs)."""
    warmup_mode: WarmupMode = "constant"
    """constant: hold warmup_lr (Dassl); linear: ramp from warmup_lr to lr."""
    warmup_lr: float = 1e-5
    """Learning rate during (or at the start of) warm-up."""
    amp: bool = False
    """Mixed precision on CUDA (fp16 autocast + grad scaling); ignored on CPU."""
    eval_every: int = 0
    """Evaluate the selection split every N iterations; 0 = after every epoch."""
    select: Select = "best"
    """best: keep the state with the best val accuracy (first strict maximum); last: keep the final state."""


@dataclass(frozen=True, kw_only=True)
class TrainSettings(Optimisation):
    """One training run of a head on cached tensors. Methods build it from their config."""

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
