"""SAFE (METHODS §2.7): fine-tune a copy of CLIP's pooling tail on cached dense maps, blend with the frozen one.

[PAPER] SAFE Alg. 1, Eq. 2–4, Sec. IV-A; protocol [CODE] linzhiqiu/cross_modal_adaptation (``train.py``,
``engine/clip/partial_model.py``, ``engine/optimizer/default.py::HYPER_DICT``). No public SAFE code exists.

``AttnPool_O`` (frozen) and ``AttnPool_F`` (trainable, initialised from it) read the store's ``dense`` tap:
RN ``layer4`` or the input of the ViT's last block. Training logits ``τ·normalize(AttnPool_F(F))·Wᵀ``
against the frozen zero-shot text classifier; inference ``τ·normalize(β·AttnPool_O(F) + AttnPool_F(F))·Wᵀ``.
On a GPU the whole lr × wd grid trains in one pass over the data: every batch is read once and feeds
every grid member (stacked parameters, :mod:`.pooling`), which gives the numbers of separate runs. On
the CPU the points train one after another on the same batches (``grid_chunk``): stacking 24 RN50
attention pools (1.4 GB of weights) ran 1.4–1.6× slower per point there, memory-bound.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..evaluation.metrics import correct_count
from ..training import FitTask, Head, ViewSource
from ..training.sampler import epoch_batches
from ..training.schedule import lr_factor
from ..training.settings import TrainSettings
from .base import FitResult, Method
from .needs import Needs, ViewNeed
from .options import ConfigError, MethodConfig, check_range
from .pooling import PoolingTail
from .registry import register_method

TRAIN_POLICY = "flip"
"""[CODE] cross_modal features.sh ``--image-augmentation flip``: view 0 center, view 1 its mirror."""
EVAL_BATCH = 256
"""Images per batched forward of all grid members during selection."""


@dataclass(frozen=True)
class SafeConfig(MethodConfig):
    iterations: int = 12800
    """[PAPER] Training iterations (cosine schedule over them)."""
    epochs: int = 0
    """If > 0, train for this many passes over the cached (image, view) pairs instead of ``iterations``."""
    batch_size: int = 8
    """[PAPER] Images per step."""
    lrs: tuple[float, ...] = (1e-4, 1e-5, 1e-6, 1e-7)
    """[PAPER] AdamW learning rates of the grid (cross_modal's 'adapter' sweep)."""
    wds: tuple[float, ...] = (0.0, 1e-3, 1e-5)
    """[PAPER] AdamW weight decays of the grid; every (lr, wd) pair is trained."""
    warmup: int = 50
    """[CODE] cross_modal LinearWarmupScheduler: warm-up iterations."""
    warmup_lr: float = 1e-5
    """[CODE] cross_modal: the warm-up ramps linearly from this rate to the grid point's lr."""
    eps: float = 1e-8
    """AdamW epsilon (torch default, as cross_modal)."""
    eval_every: int = 100
    """[PAPER] Score the few-shot val every N iterations and keep each grid point's best state (0: only at the end)."""
    beta: float = 0.5
    """[PAPER] Weight of the frozen branch at inference: β·AttnPool_O(F) + AttnPool_F(F) (the paper's β, METHODS' ρ)."""
    tau: float = 100.0
    """[PROPOSED] Logit scale τ_s of training and inference (CLIP's 100; cross_modal's partial recipe uses
    e⁴ ≈ 54.6)."""
    templates: str = "tip"
    """Template set of the frozen text classifier W_c."""
    grid_chunk: int = 0
    """Grid points trained together per pass over the data; 0: the whole grid on a GPU, one point at a time on
    the CPU (faster there); lower it to save GPU memory."""

    def __post_init__(self) -> None:
        for name in ("iterations", "epochs", "warmup", "eval_every", "warmup_lr", "beta", "grid_chunk"):
            check_range(name, getattr(self, name), low=0)
        check_range("batch_size", self.batch_size, low=1)
        check_range("eps", self.eps, low=0, strict_low=True)
        check_range("tau", self.tau, low=0, strict_low=True)
        if not self.lrs or not self.wds:
            raise ConfigError("options lrs and wds need at least one value each")
        for value in self.lrs + self.wds:
            check_range("lrs/wds", value, low=0)

    def grid(self) -> list[tuple[float, float]]:
        """The (lr, wd) points, lr-major: the order ties are broken in."""
        return [(lr, wd) for lr in self.lrs for wd in self.wds]

    def safe_options(self) -> SafeConfig:
        """Just the SAFE fields (SAFE-A's config extends this one)."""
        return SafeConfig(**{f.name: getattr(self, f.name) for f in dataclasses.fields(SafeConfig)})


SAFE_DEVIATIONS = (
    "[PROPOSED] tau = 100 (CLIP's logit scale); the paper gives none (cross_modal's partial recipe uses e^4). "
    "Option tau.",
    "[PROPOSED] inference normalises after blending: normalize(beta*AttnPool_O(F) + AttnPool_F(F)); "
    "the paper is silent.",
    "[PROPOSED] ViT AttnPool_F = last transformer block + ln_post + proj (cross_modal partial_model layer_idx=1); "
    "the paper says 'last transformer layer'.",
    "[PROPOSED] views: center + deterministic flip (V=2, cross_modal features.sh); each step draws 8 (image, view) "
    "pairs from a fresh permutation of all N*V pairs.",
    "[PROPOSED] uni-modal training: no text samples in the batches (Alg. 1 trains on images only).",
    "[CODE] cross_modal: linear warm-up over 50 iterations from 1e-5 (above the grid's smaller lrs), then cosine.",
    "[PROPOSED] every eval_every iterations each grid point is scored on the few-shot val with the blended "
    "(inference) head; its first strict maximum is kept; the grid point with the best val accuracy wins "
    "(ties: first in lr-major order).",
    "[PROPOSED] the lr x wd grid trains on shared batches: every grid point sees the batch order of a separate run "
    "with the same seed (on a GPU in one pass of stacked weights; on the CPU one point after another).",
    "[PROPOSED] AttnPool_O is recomputed from the cached dense map (not read from the cached pooled embedding) so "
    "both branches see the same input; only query 0 / the CLS token is computed (exact).",
    "[PROPOSED] fp32 heads on fp16 caches (cross_modal trains in fp32).",
)


# ---------------------------------------------------------------------------- the head


class SafeHead(Head):
    """``τ · normalize(β·AttnPool_O(F) + AttnPool_F(F)) · Ŵᵀ`` on the cached dense map ``F``."""

    def __init__(
        self,
        frozen: PoolingTail,
        tuned: PoolingTail,
        text: torch.Tensor,
        *,
        tap: str,
        beta: float,
        tau: float,
    ) -> None:
        super().__init__()
        self.inputs = (tap,)
        self.frozen = frozen.requires_grad_(False)
        self.tuned = tuned
        self.register_buffer("text", F.normalize(text.float(), dim=-1).clone())  # [C, D]
        self.register_buffer("beta", torch.tensor(float(beta)))
        self.register_buffer("tau", torch.tensor(float(tau)))

    def embed(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        """The blended, un-normalised embedding ``β·AttnPool_O(F) + AttnPool_F(F)`` ``[B, D]``."""
        dense = x[self.inputs[0]]
        return self.beta * self.frozen(dense)[0] + self.tuned(dense)[0]

    def forward(self, x: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.tau * F.normalize(self.embed(x), dim=-1) @ self.text.T  # [B, C]

    def saved_state(self) -> dict[str, torch.Tensor]:
        """Everything but the frozen copy (the backbone's own weights)."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("frozen.")}


# ---------------------------------------------------------------------------- the grid trainer


class StackedAdamW:
    """torch's AdamW update on parameters stacked ``[G, ...]``, with a learning rate and weight decay per member."""

    def __init__(
        self,
        params: list[torch.Tensor],
        *,
        weight_decay: torch.Tensor,
        eps: float,
        betas: tuple[float, float] = (0.9, 0.999),
    ) -> None:
        self.params, self.weight_decay, self.eps, self.betas = params, weight_decay, eps, betas
        self.state = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
        self.steps = 0

    @torch.no_grad()
    def step(self, lr: torch.Tensor) -> None:
        """One update with per-member learning rates ``lr [G]`` (the formula of torch.optim.AdamW)."""
        self.steps += 1
        b1, b2 = self.betas
        bias1, bias2_sqrt = 1 - b1**self.steps, math.sqrt(1 - b2**self.steps)
        for p, (m, v) in zip(self.params, self.state):
            shape = (-1,) + (1,) * (p.ndim - 1)
            rate, decay = lr.reshape(shape), self.weight_decay.reshape(shape)
            p.mul_(1 - rate * decay)
            if p.grad is None:  # the attention key bias: softmax ignores it, so its gradient is exactly zero
                m.mul_(b1)
                v.mul_(b2)
            else:
                m.lerp_(p.grad, 1 - b1)
                v.mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
            update = v.sqrt().div_(bias2_sqrt).add_(self.eps).reciprocal_().mul_(m).mul_(rate / bias1)
            p.sub_(update)  # one temporary per tensor: the stacked grid can be large
            p.grad = None


@dataclass
class GridResult:
    """Each grid point's kept state and val curve, and the winner."""

    tuned: PoolingTail
    """Kept state of every member, ``[G, ...]``."""
    scores: list[float | None]
    """Best val accuracy of each member (``None`` if never scored)."""
    best_iters: list[int]
    history: list[dict] = field(default_factory=list)

    @property
    def winner(self) -> int:
        return first_best(self.scores)


def first_best(scores: list[float | None]) -> int:
    """Index of the first strict maximum (0 if nothing was scored)."""
    best = 0
    for i, score in enumerate(scores):
        if score is not None and (scores[best] is None or score > scores[best]):
            best = i
    return best


@dataclass
class GridData:
    """What the grid trains and selects on."""

    train: ViewSource
    """Cached dense maps of the train images, all views (``flip`` policy)."""
    labels: torch.Tensor
    val: ViewSource | None
    """Cached dense maps of the selection split (center view); ``None``: keep the last state."""
    val_labels: torch.Tensor | None
    text: torch.Tensor
    """Frozen classifier ``[C, D]``, rows normalised."""
    tap: str


def train_grid(
    frozen: PoolingTail,
    data: GridData,
    config: SafeConfig,
    points: list[tuple[float, float]],
    *,
    generator: torch.Generator,
    device: torch.device | str = "cpu",
) -> GridResult:
    """Train one stacked copy of ``frozen`` per (lr, wd) point on the same batches (one pass over the data)."""
    device = torch.device(device)
    with flush_denormals(device):
        return _train_grid(frozen, data, config, points, generator=generator, device=device)


@contextlib.contextmanager
def flush_denormals(device: torch.device) -> Iterator[None]:
    """On CPU, treat denormal floats as 0 while training (restored to torch's default after).

    The key bias has an exactly-zero gradient (softmax ignores a constant shift), so Adam's second
    moment fills with denormal rounding noise, which makes CPU kernels about 10x slower.
    """
    if device.type != "cpu" or not torch.set_flush_denormal(True):
        yield
        return
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def _train_grid(
    frozen: PoolingTail,
    data: GridData,
    config: SafeConfig,
    points: list[tuple[float, float]],
    *,
    generator: torch.Generator,
    device: torch.device,
) -> GridResult:
    frozen = frozen.to(device)
    tuned = frozen.stacked(len(points)).requires_grad_(True)
    params = list(tuned.params.values())
    optimizer = StackedAdamW(
        params, weight_decay=torch.tensor([p[1] for p in points], device=device), eps=config.eps
    )
    schedules = [
        TrainSettings(
            epochs=1,
            batch_size=config.batch_size,
            lr=base,
            warmup=config.warmup,
            warmup_mode="linear",
            warmup_lr=config.warmup_lr,
        )
        for base, _ in points
    ]
    total = total_iterations(config, len(data.train) * data.train.num_views)
    selection = _Selection(tuned, frozen, data, config, device)
    text = data.text.to(device)
    for step, (positions, views) in enumerate(train_batches(data.train, config, total, generator)):
        x = data.train.batch(positions, views)[data.tap].to(device)
        y = data.labels[torch.as_tensor(positions)].to(device)
        logits = config.tau * F.normalize(tuned(x), dim=-1) @ text.T  # [G, B, C]
        # summed over members: each member's gradient is that of its own mean cross-entropy
        loss = F.cross_entropy(logits.flatten(0, 1), y.repeat(len(points)), reduction="sum") / len(y)
        loss.backward()
        optimizer.step(torch.tensor([rate(step, total, sched) for sched in schedules], device=device))
        if (config.eval_every and (step + 1) % config.eval_every == 0) or step + 1 == total:
            selection.score(step + 1, loss=float(loss.detach()) / len(points))
    return selection.result(total)


def rate(step: int, total: int, settings: TrainSettings) -> float:
    """Learning rate at iteration ``step``: the engine's linear warm-up, then cosine to 0 over ``total``."""
    return settings.lr * lr_factor(step, total=total, settings=settings) if settings.lr > 0 else 0.0


def total_iterations(config: SafeConfig, pairs: int) -> int:
    if config.epochs > 0:
        return config.epochs * -(-pairs // config.batch_size)
    return config.iterations


def train_batches(
    source: ViewSource, config: SafeConfig, total: int, generator: torch.Generator
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``total`` batches of (image position, view) drawn from fresh permutations of all N × V pairs."""
    views = source.num_views
    done = 0
    while done < total:
        for pairs in epoch_batches(len(source) * views, batch_size=config.batch_size, generator=generator):
            yield pairs // views, pairs % views
            done += 1
            if done == total:
                return


class _Selection:
    """Scores every member on val with the blended head; keeps each member's first strict maximum."""

    def __init__(
        self,
        tuned: PoolingTail,
        frozen: PoolingTail,
        data: GridData,
        config: SafeConfig,
        device: torch.device,
    ) -> None:
        self.tuned, self.data, self.config, self.device = tuned, data, config, device
        self.best = {k: p.detach().clone() for k, p in tuned.params.items()}
        self.scores: list[float | None] = [None] * tuned.copies
        self.iters = [0] * tuned.copies
        self.history: list[dict] = []
        self.frozen_val = None if data.val is None else _embed_all(frozen, data.val, data.tap, device)[0]

    @torch.no_grad()
    def score(self, iteration: int, *, loss: float) -> None:
        entry = {"iteration": iteration, "loss": loss}
        if self.data.val is not None:
            tuned = _embed_all(self.tuned, self.data.val, self.data.tap, self.device)  # [G, N, D]
            blend = F.normalize(self.config.beta * self.frozen_val[None] + tuned, dim=-1)
            logits = blend @ self.data.text.to(self.device).T  # [G, N, C]; tau does not change the arg-max
            labels = self.data.val_labels.to(self.device)
            accs = [100.0 * correct_count(member, labels) / max(len(labels), 1) for member in logits]
            for g, acc in enumerate(accs):
                if self.scores[g] is None or acc > self.scores[g]:
                    self.scores[g], self.iters[g] = acc, iteration
                    for k, p in self.tuned.params.items():
                        self.best[k][g].copy_(p[g])
            entry["val_acc"] = accs
        self.history.append(entry)

    def result(self, total: int) -> GridResult:
        if self.data.val is None:  # nothing to select on: keep the last state
            self.best = {k: p.detach().clone() for k, p in self.tuned.params.items()}
            self.iters = [total] * self.tuned.copies
        tuned = self.tuned._like(self.best).requires_grad_(False)
        return GridResult(tuned, self.scores, self.iters, self.history)


@torch.no_grad()
def _embed_all(tail: PoolingTail, source: ViewSource, tap: str, device: torch.device) -> torch.Tensor:
    """``tail`` on the center view of every image of ``source`` → ``[G, N, D]``."""
    parts = [
        tail(source.batch(np.arange(s, min(s + EVAL_BATCH, len(source))))[tap].to(device))
        for s in range(0, len(source), EVAL_BATCH)
    ]
    return torch.cat(parts, dim=1)


# ---------------------------------------------------------------------------- the method


def dense_tap(task: FitTask) -> str:
    """The store's map entering the pooling layer (``rn/layer4`` or the input of the last ViT block)."""
    return task.info.backbone["dense_tap"]


def frozen_tail(task: FitTask) -> PoolingTail:
    """AttnPool_O: the pooling tail of the store's own backbone, re-loaded and fingerprint-checked."""
    return PoolingTail.from_backbone(task.backbone()).to(task.device)


def fit_safe(
    task: FitTask, config: SafeConfig, *, generator: torch.Generator
) -> tuple[SafeHead, dict, list[dict]]:
    """Train the grid (in chunks of ``grid_chunk`` points, each on the same batches) and build the winner's head."""
    tap, points = dense_tap(task), config.grid()
    frozen = frozen_tail(task)
    text = F.normalize(task.text(config.templates).float(), dim=-1)
    data = GridData(
        task.views(task.train, policy=TRAIN_POLICY, taps=(tap,)),
        task.train.labels,
        task.views(task.val, taps=(tap,)),
        task.val.labels,
        text,
        tap,
    )
    chunk = config.grid_chunk or (len(points) if task.device.type == "cuda" else 1)
    state = generator.get_state()
    results = []
    for start in range(0, len(points), chunk):
        generator.set_state(state)  # every chunk sees the batches a lone run would
        results.append(
            train_grid(
                frozen, data, config, points[start : start + chunk], generator=generator, device=task.device
            )
        )
    members = [(r, g) for r in results for g in range(r.tuned.copies)]
    scores, iters = [r.scores[g] for r, g in members], [r.best_iters[g] for r, g in members]
    win = first_best(scores)
    result, index = members[win]
    head = SafeHead(frozen, result.tuned.member(index), text, tap=tap, beta=config.beta, tau=config.tau)
    grid = [
        {"lr": lr, "wd": wd, "val_acc": scores[i], "iteration": iters[i]} for i, (lr, wd) in enumerate(points)
    ]
    selection = {
        "lr": points[win][0],
        "wd": points[win][1],
        "val_acc": scores[win],
        "iteration": iters[win],
        "on": task.val.name,
        "grid": grid,
    }
    history = [{**entry, "grid_offset": i * chunk} for i, r in enumerate(results) for entry in r.history]
    return head, selection, history


@register_method
class Safe(Method):
    name = "safe"
    description = (
        "SAFE: a trainable copy of the pooling layer (RN attnpool / ViT last block) on cached dense maps, "
        "blended with the frozen one; lr x wd grid on shared batches, selected on val (§2.7)."
    )
    Config = SafeConfig
    deviations = SAFE_DEVIATIONS
    paper_protocol = "Same as coop: SAFE selects every choice on the few-shot val (min(k,4) per class)."
    min_views = {TRAIN_POLICY: 1}

    quick = {"iterations": 10, "lrs": "1e-4", "wds": "0", "eval_every": 5, "warmup": 2}
    needed = Needs(
        eval_taps=("pooled", "dense"), train_views=(ViewNeed(TRAIN_POLICY, 2, ("pooled", "dense")),)
    )

    @classmethod
    def rebuild_head(cls, bundle, state, backbone) -> SafeHead:
        bb = backbone()
        return SafeHead(
            PoolingTail.from_backbone(bb),
            PoolingTail.from_backbone(bb),
            state["text"],
            tap=bundle.inputs[0],
            beta=float(state["beta"]),
            tau=float(state["tau"]),
        )

    def fit(self, task: FitTask, *, generator: torch.Generator) -> FitResult:
        head, selection, history = fit_safe(task, self.config, generator=generator)
        return FitResult(head, selection=selection, history=history)
