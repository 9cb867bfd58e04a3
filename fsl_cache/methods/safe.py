"""SAFE (METHODS §2.7): fine-tune a copy of CLIP's pooling tail on cached dense maps, blend with the frozen one.

[PAPER] SAFE Alg. 1, Eq. 2–4, Sec. IV-A; protocol [CODE] linzhiqiu/cross_modal_adaptation (``train.py``,
``engine/clip/partial_model.py``, ``engine/optimizer/default.py::HYPER_DICT``). No public SAFE code exists.

``AttnPool_O`` (frozen) and ``AttnPool_F`` (trainable, initialised from it) read the store's ``dense`` tap:
RN ``layer4`` or the input of the ViT's last block. Training logits ``τ·normalize(AttnPool_F(F))·Wᵀ``
against the frozen zero-shot text classifier; inference ``τ·normalize(β·AttnPool_O(F) + AttnPool_F(F))·Wᵀ``.
The whole lr × wd grid trains in one pass over the data: every batch is read once and feeds every
grid member, which gives the numbers of separate runs. Members train stacked (one batched pass,
:mod:`.pooling`) or chunk by chunk, whichever a few timed steps find faster (``grid_chunk``): stacking
wins on small heads, where per-op costs dominate, and on GPUs; 24 RN50 attention pools (1.4 GB of
weights) stacked on a CPU are memory-bound.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..console import duration, training_notice, training_steps
from ..training import EarlierRun, FitTask, Head, ViewSource
from ..training.sampler import epoch_batches
from ..training.schedule import lr_factor
from ..training.settings import TrainSettings
from .base import FitResult, Method, ValidationFree
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
    """Grid points trained stacked per step; 0: whichever of the whole grid and one point at a time a few timed
    steps find faster; lower it to save memory."""

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
    "with the same seed (stacked or point by point, whichever a few timed steps find faster).",
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
    """torch's AdamW on parameters stacked ``[G, ...]``, with a learning rate and weight decay per member.

    One fused kernel per member and step (torch's ``AdamW(fused=True)`` kernel over all of the member's
    tensors): on small heads the dozen elementwise ops per parameter this replaces were most of a step.
    """

    def __init__(
        self,
        params: list[torch.Tensor],
        *,
        weight_decays: Sequence[float],
        eps: float,
        betas: tuple[float, float] = (0.9, 0.999),
    ) -> None:
        self.params, self.weight_decays, self.eps, self.betas = params, list(weight_decays), eps, betas
        self.m = [torch.zeros_like(p) for p in params]
        self.v = [torch.zeros_like(p) for p in params]
        self.steps = torch.zeros((), device=params[0].device)

    @torch.no_grad()
    def step(self, lrs: Sequence[float]) -> None:
        """One update of every member ``g`` with learning rate ``lrs[g]``; clears the gradients."""
        self.steps += 1
        for p in self.params:
            if p.grad is None:  # the attention key bias: softmax ignores it, so its gradient is exactly zero
                p.grad = torch.zeros_like(p)
        for g, (lr, wd) in enumerate(zip(lrs, self.weight_decays)):
            torch._fused_adamw_(
                [p[g] for p in self.params],
                [p.grad[g] for p in self.params],
                [m[g] for m in self.m],
                [v[g] for v in self.v],
                [],
                [self.steps] * len(self.params),
                lr=lr,
                beta1=self.betas[0],
                beta2=self.betas[1],
                weight_decay=wd,
                eps=self.eps,
                amsgrad=False,
                maximize=False,
            )
        for p in self.params:
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
    """Train one copy of ``frozen`` per (lr, wd) point on the same batches, in chunks of stacked points.

    Every point sees the batches and takes the steps of a lone run with the same generator; the chunk
    size (``grid_chunk``, or the fastest measured) changes only the speed.
    """
    device = torch.device(device)
    with flush_denormals(device):
        total = total_iterations(config, len(data.train) * data.train.num_views)
        chunk, per_step = choose_chunk(frozen, data, config, points, generator=generator, device=device)
        training_notice(
            f"safe: {len(points)} grid points x {total:,} steps, {_chunking(chunk, len(points))}; "
            f"estimate {duration(per_step * total)} ({1e3 * per_step:.1f} ms per step, timed)"
        )
        return _train_grid(frozen, data, config, points, generator=generator, device=device, chunk=chunk)


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


class _Chunk:
    """Grid points trained stacked: their flat parameters, optimiser and learning-rate schedules."""

    def __init__(
        self, frozen: PoolingTail, points: list[tuple[float, float]], config: SafeConfig, total: int
    ) -> None:
        self.tail = frozen.stacked(len(points)).requires_grad_(True)
        self.optimizer = StackedAdamW(
            list(self.tail.params.values()), weight_decays=[wd for _, wd in points], eps=config.eps
        )
        self.tau, self.size = config.tau, len(points)
        schedules = [
            TrainSettings(
                epochs=1,
                batch_size=config.batch_size,
                lr=lr,
                warmup=config.warmup,
                warmup_mode="linear",
                warmup_lr=config.warmup_lr,
            )
            for lr, _ in points
        ]
        self.lrs = [[rate(step, total, s) for s in schedules] for step in range(total)]

    def step(self, step: int, x: torch.Tensor, y: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        """One optimiser step of every member on batch ``x``; returns the summed loss (not synchronised)."""
        logits = self.tau * F.normalize(self.tail(x), dim=-1) @ text.T  # [G, B, C]
        # summed over members: each member's gradient is that of its own mean cross-entropy
        loss = F.cross_entropy(logits.flatten(0, 1), y.repeat(self.size), reduction="sum") / len(y)
        loss.backward()
        self.optimizer.step(self.lrs[step])
        return loss.detach()


def _train_grid(
    frozen: PoolingTail,
    data: GridData,
    config: SafeConfig,
    points: list[tuple[float, float]],
    *,
    generator: torch.Generator,
    device: torch.device,
    chunk: int,
) -> GridResult:
    frozen = frozen.to(device)
    total = total_iterations(config, len(data.train) * data.train.num_views)
    chunks = [_Chunk(frozen, points[s : s + chunk], config, total) for s in range(0, len(points), chunk)]
    selection = _Selection(chunks, frozen, data, config, device)
    text = data.text.to(device)
    batches = train_batches(len(data.train), data.train.num_views, config, total, generator)
    with training_steps(total, f"safe ({len(points)} points)") as advance:
        for step, (positions, views) in enumerate(batches):
            x = data.train.batch(positions, views)[data.tap].to(device)
            y = data.labels[torch.as_tensor(positions)].to(device)
            losses = [c.step(step, x, y, text) for c in chunks]
            if (config.eval_every and (step + 1) % config.eval_every == 0) or step + 1 == total:
                selection.score(step + 1, loss=float(sum(losses)) / len(points))
            advance(1)
    return selection.result(total)


def choose_chunk(
    frozen: PoolingTail,
    data: GridData,
    config: SafeConfig,
    points: list[tuple[float, float]],
    *,
    generator: torch.Generator,
    device: torch.device,
) -> tuple[int, float]:
    """Points per stacked chunk and the seconds per grid step: ``grid_chunk``, or whichever of the whole
    grid stacked and one point at a time measures faster on a few steps here (stacking wins on small
    heads and GPUs; large heads on a CPU are memory-bound stacked)."""
    candidates = [min(config.grid_chunk, len(points))] if config.grid_chunk else sorted({len(points), 1})
    timed = {
        c: _time_steps(frozen, data, config, points, c, generator=generator, device=device)
        for c in candidates
    }
    best = min(timed, key=timed.get)
    return best, timed[best]


PROBE_SECONDS = 1.0
"""Time spent measuring one chunking (after one warm-up step, at least 2 and at most 10 steps)."""


def _time_steps(frozen, data, config, points, chunk, *, generator, device) -> float:
    """Seconds per grid step with chunks of ``chunk`` points: every chunk of a throwaway copy of the grid
    steps on the real first batches, as in training (lockstep chunks share the caches, so one chunk
    alone would look faster than it is)."""
    probe = torch.Generator(device=generator.device)
    probe.set_state(generator.get_state())  # the real run still draws its own batches
    steps = min(10, total_iterations(config, len(data.train) * data.train.num_views))
    frozen = frozen.to(device)
    trial = [_Chunk(frozen, points[s : s + chunk], config, steps + 1) for s in range(0, len(points), chunk)]
    text = data.text.to(device)
    batches = train_batches(
        len(data.train),
        data.train.num_views,
        dataclasses.replace(config, iterations=steps + 1),
        steps + 1,
        probe,
    )
    times = []
    for step, (positions, views) in enumerate(batches):
        start = time.perf_counter()
        x = data.train.batch(positions, views)[data.tap].to(device)
        y = data.labels[torch.as_tensor(positions)].to(device)
        float(sum(c.step(step, x, y, text) for c in trial))  # synchronised
        times.append(time.perf_counter() - start)
        if len(times) > 2 and sum(times[1:]) >= PROBE_SECONDS:
            break
    timed = sorted(times[1:]) or times
    return timed[len(timed) // 2]


def _chunking(chunk: int, points: int) -> str:
    if chunk >= points:
        return "all stacked"
    return "one point at a time" if chunk == 1 else f"{chunk} points stacked at a time"


def rate(step: int, total: int, settings: TrainSettings) -> float:
    """Learning rate at iteration ``step``: the engine's linear warm-up, then cosine to 0 over ``total``."""
    return settings.lr * lr_factor(step, total=total, settings=settings) if settings.lr > 0 else 0.0


def total_iterations(config: SafeConfig, pairs: int) -> int:
    if config.epochs > 0:
        return config.epochs * -(-pairs // config.batch_size)
    return config.iterations


def train_batches(
    images: int, views: int, config: SafeConfig, total: int, generator: torch.Generator
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``total`` batches of (image position, view) drawn from fresh permutations of all ``images`` × ``views`` pairs."""
    done = 0
    while done < total:
        for pairs in epoch_batches(images * views, batch_size=config.batch_size, generator=generator):
            yield pairs // views, pairs % views
            done += 1
            if done == total:
                return


class _Selection:
    """Scores every member of every chunk on val at once with the blended head; keeps each member's first
    strict maximum."""

    def __init__(
        self,
        chunks: list[_Chunk],
        frozen: PoolingTail,
        data: GridData,
        config: SafeConfig,
        device: torch.device,
    ) -> None:
        self.chunks, self.data, self.config, self.device = chunks, data, config, device
        self.best = [_copy(c.tail) for c in chunks]
        points = sum(c.size for c in chunks)
        self.scores: list[float | None] = [None] * points
        self.iters = [0] * points
        self.history: list[dict] = []
        self.frozen_val = None if data.val is None else _embed_all(frozen, data.val, data.tap, device)[0]

    @torch.no_grad()
    def score(self, iteration: int, *, loss: float) -> None:
        entry = {"iteration": iteration, "loss": loss}
        if self.data.val is not None:
            tuned = torch.cat(
                [_embed_all(c.tail, self.data.val, self.data.tap, self.device) for c in self.chunks]
            )
            blend = F.normalize(self.config.beta * self.frozen_val[None] + tuned, dim=-1)  # [G, N, D]
            logits = blend @ self.data.text.to(self.device).T  # [G, N, C]; tau does not change the arg-max
            labels = self.data.val_labels.to(self.device)
            correct = (logits.argmax(dim=-1) == labels).sum(dim=-1).tolist()  # one sync for the whole grid
            accs = [100.0 * right / max(len(labels), 1) for right in correct]
            members = [(c, best, g) for c, best in zip(self.chunks, self.best) for g in range(c.size)]
            for i, (acc, (chunk, best, g)) in enumerate(zip(accs, members)):
                if self.scores[i] is None or acc > self.scores[i]:
                    self.scores[i], self.iters[i] = acc, iteration
                    for k, p in chunk.tail.params.items():
                        best[k][g].copy_(p[g])
            entry["val_acc"] = accs
        self.history.append(entry)

    def result(self, total: int) -> GridResult:
        if self.data.val is None:  # nothing to select on: keep the last state
            self.best = [_copy(c.tail) for c in self.chunks]
            self.iters = [total] * len(self.iters)
        params = {k: torch.cat([best[k] for best in self.best]) for k in self.best[0]}
        tuned = self.chunks[0].tail._like(params).requires_grad_(False)
        return GridResult(tuned, self.scores, self.iters, self.history)


def _copy(tail: PoolingTail) -> dict[str, torch.Tensor]:
    return {k: p.detach().clone() for k, p in tail.params.items()}


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
    """Train the grid (all points on the same batches) and build the winner's head."""
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
    result = train_grid(frozen, data, config, points, generator=generator, device=task.device)
    scores, iters, win = result.scores, result.best_iters, result.winner
    head = SafeHead(frozen, result.tuned.member(win), text, tap=tap, beta=config.beta, tau=config.tau)
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
    return head, selection, result.history


def reuse_safe(
    task: FitTask, config: SafeConfig, earlier: EarlierRun, *, generator: torch.Generator
) -> tuple[SafeHead, dict, list[dict]]:
    """What :func:`fit_safe` returns, taken from ``earlier``, a finished ``safe`` run of ``config`` on ``task``:
    its saved head, selection and history; ``generator`` is advanced past every batch that run drew, so
    what trains next on it draws what it would have after training SAFE here."""
    tap = dense_tap(task)
    frozen = frozen_tail(task)
    text = F.normalize(task.text(config.templates).float(), dim=-1)
    head = SafeHead(frozen, frozen.member(0), text, tap=tap, beta=config.beta, tau=config.tau)
    loaded = head.load_state_dict({k: v.to(task.device) for k, v in earlier.tensors.items()}, strict=False)
    if loaded.unexpected_keys or set(loaded.missing_keys) != set(head.state_dict()) - set(head.saved_state()):
        raise ValueError(f"the head of run {earlier.path} is not a SAFE head of this store")
    head.tuned.requires_grad_(False)
    images = len(task.train)
    views = task.store.arrays[f"images/{task.train.pool}/views/{TRAIN_POLICY}/{tap}"]["shape"][1]
    for _ in train_batches(images, views, config, total_iterations(config, images * views), generator):
        pass
    return head, earlier.record["selection"], earlier.record["history"]


@register_method
class Safe(Method):
    name = "safe"
    description = (
        "SAFE: a trainable copy of the pooling layer (RN attnpool / ViT last block) on cached dense maps, "
        "blended with the frozen one; lr x wd grid on shared batches, selected on val (§2.7)."
    )
    Config = SafeConfig
    deviations = SAFE_DEVIATIONS
    validation_free = ValidationFree(
        "none: SAFE picks its lr x wd grid point and stopping iteration on val (paper Sec. IV-A)",
        options=None,
    )
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
