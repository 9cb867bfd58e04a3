"""The one training loop every gradient-based method runs on cached tensors.

Per epoch: a seeded permutation of the support set, one cached augmented view per image (the view
sampler), optimiser and schedule from :class:`TrainSettings`, optional mixed precision (CUDA only),
and model selection on a selection split (few-shot val, or the test oracle only under
``--protocol paper``), keeping the best state. Nothing here reads a split it is not given.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..console import duration, training_notice, training_steps
from ..evaluation.metrics import correct_count
from ..evaluation.scoring import predict
from .data import ViewSource
from .head import Head
from .sampler import ViewSampler, batches_per_epoch, epoch_batches
from .schedule import build_optimizer, build_scheduler, per_iteration
from .settings import TrainSettings

LossFn = Callable[[dict[str, torch.Tensor], torch.Tensor, dict[str, torch.Tensor]], torch.Tensor]
"""``loss(outputs, labels, inputs)``: ``outputs`` are the head's named logits."""


def cross_entropy(outputs: dict[str, torch.Tensor], labels: torch.Tensor, inputs=None) -> torch.Tensor:
    """Cross-entropy on the headline logits (the first head)."""
    return F.cross_entropy(next(iter(outputs.values())), labels)


@dataclass
class Selector:
    """Scores a head on a selection split: accuracy of the headline logits (center view)."""

    source: ViewSource
    labels: torch.Tensor
    name: str = "val"
    """``val``, or ``test`` for the paper-protocol oracle."""
    score: Callable[[Head], float] | None = None
    """Override the scoring (e.g. a fused head selected by its own rule)."""

    def __call__(self, head: Head, device: torch.device) -> float:
        if self.score is not None:
            return self.score(head)
        logits = next(iter(predict(head, self.source, device=device).values()))
        return 100.0 * correct_count(logits, self.labels) / max(len(self.labels), 1)


@dataclass
class TrainResult:
    """The trained head (best or last state) and how it was chosen."""

    head: Head
    best_epoch: int
    """Epoch (0-based) of the kept state; -1 if training was skipped."""
    best_iter: int
    best_score: float | None
    history: list[dict] = field(default_factory=list)

    def selection(self, selector: Selector | None) -> dict:
        return {
            "epoch": self.best_epoch,
            "iteration": self.best_iter,
            "score": self.best_score,
            "on": selector.name if selector else "last",
        }


@dataclass
class TrainData:
    """The support set: cached views of the train images and their labels."""

    source: ViewSource
    labels: torch.Tensor


def train(
    head: Head,
    data: TrainData,
    *,
    settings: TrainSettings,
    generator: torch.Generator,
    selector: Selector | None = None,
    loss_fn: LossFn = cross_entropy,
    device: str | torch.device = "cpu",
    on_epoch: Callable[[int, Head], None] | None = None,
) -> TrainResult:
    """Train ``head`` in place on ``data`` and return it in its selected state."""
    member = Member(head, data, settings, generator, selector, loss_fn, on_epoch)
    return train_many([member], device=device)[0]


@dataclass
class Member:
    """One head of a :func:`train_many` group, with everything :func:`train` takes for it."""

    head: Head
    data: TrainData
    settings: TrainSettings
    generator: torch.Generator
    selector: Selector | None = None
    loss_fn: LossFn = cross_entropy
    on_epoch: Callable[[int, Head], None] | None = None


def train_many(members: list[Member], *, device: str | torch.device = "cpu") -> list[TrainResult]:
    """Train several heads in lockstep: step ``i`` of every member runs before step ``i + 1`` of any.

    Each member computes exactly what :func:`train` would (its own generator, optimiser, schedule and
    selection), so results equal separate runs. Members whose sources are one :class:`SharedBatches`
    and whose draws coincide (same seed and schedule: a grid over lr, weight decay, loss weights...)
    then read each cached batch once instead of once per member.
    """
    device = torch.device(device)
    loops = []
    for m in members:
        m.head.to(device)
        loops.append(_Loop(m.head, m.data, m.settings, m.generator, m.selector, m.loss_fn, device))
    running = [loop.steps(m.on_epoch) for loop, m in zip(loops, members) if m.settings.trains]
    total = sum(loop.total for loop, m in zip(loops, members) if m.settings.trains)
    if total:
        heads = f"{len(running)} heads in lockstep, " if len(running) > 1 else ""
        training_notice(
            f"training: {total:,} steps ({heads}{loops[0].epochs} epochs of {loops[0].per_epoch})"
        )
    with training_steps(total, "training") as advance:
        clock = _StepClock(total)
        while running:
            running = [steps for steps in running if next(steps, _DONE) is not _DONE]
            clock.tick(len(running))
            advance(len(running))
    return [loop.finish() for loop in loops]


class _StepClock:
    """Announces the whole run's estimate once a few steps after the first (a warm-up) are timed."""

    TIMED = 3

    def __init__(self, total: int) -> None:
        self.total, self.done = total, 0
        self.start: tuple[float, int] | None = None
        self.announced = False

    def tick(self, steps: int) -> None:
        self.done += steps
        if self.announced:
            return
        if self.start is None:
            self.start = (time.perf_counter(), self.done)
        elif self.done - self.start[1] >= self.TIMED:
            per_step = (time.perf_counter() - self.start[0]) / (self.done - self.start[1])
            training_notice(
                f"estimate {duration(per_step * self.total)} ({1e3 * per_step:.1f} ms per step, timed)"
            )
            self.announced = True


_DONE = object()


class SharedBatches:
    """A :class:`ViewSource` several lockstep members read through: the latest batch is served again.

    Lockstep members with the same draws ask for the same ``(positions, views)`` one after another, so
    remembering one batch is enough; the tensors are shared, which heads must not modify in place.
    """

    def __init__(self, source: ViewSource) -> None:
        self.source = source
        self.num_views = source.num_views
        self._last: tuple[bytes, dict[str, torch.Tensor]] | None = None
        self.streams = getattr(source, "streams", True)

    def __len__(self) -> int:
        return len(self.source)

    def batch(self, positions: np.ndarray, views: np.ndarray | None = None) -> dict[str, torch.Tensor]:
        key = _batch_key(positions, views)
        if self._last is None or self._last[0] != key:
            self._last = (key, self.source.batch(positions, views))
        return self._last[1]

    def prefetch(self, positions: np.ndarray, views: np.ndarray | None = None) -> None:
        """Start reading the next batch unless it is the one already held (the source ignores repeats)."""
        if hasattr(self.source, "prefetch") and (
            self._last is None or self._last[0] != _batch_key(positions, views)
        ):
            self.source.prefetch(positions, views)


def _batch_key(positions: np.ndarray, views: np.ndarray | None) -> bytes:
    positions = np.asarray(positions, dtype=np.int64)
    return positions.tobytes() + (b"center" if views is None else np.asarray(views, dtype=np.int64).tobytes())


class _Loop:
    """State of one training run; methods are the steps of the loop."""

    def __init__(self, head, data, settings, generator, selector, loss_fn, device) -> None:
        self.head, self.data, self.settings, self.generator = head, data, settings, generator
        self.selector, self.loss_fn, self.device = selector, loss_fn, device
        n = len(data.source)
        self.per_epoch = batches_per_epoch(
            n,
            batch_size=settings.batch_size,
            drop_last=settings.drop_last,
            merge_singleton=settings.merge_singleton,
        )
        self.total = settings.iters or settings.epochs * self.per_epoch
        self.epochs = -(-self.total // max(self.per_epoch, 1))
        params = [p for p in head.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(params, settings)
        self.scheduler = build_scheduler(
            self.optimizer, settings, iters_per_epoch=self.per_epoch, total_iters=self.total
        )
        self.sampler = ViewSampler(n, data.source.num_views, generator=generator)
        self.amp = settings.amp and device.type == "cuda"
        self.scaler = torch.amp.GradScaler("cuda") if self.amp else None
        self.iteration = 0
        self.best: tuple[float, int, int, dict] | None = None
        self.history: list[dict] = []

    def steps(self, on_epoch) -> Iterator[None]:
        """Run the loop, yielding after every optimiser step (so :func:`train_many` can interleave loops)."""
        for epoch in range(self.epochs):
            if on_epoch is not None:
                on_epoch(epoch, self.head)
            losses, correct, seen = [], 0, 0
            for loss, right, n in self._epoch(epoch):
                losses.append(loss)
                correct, seen = correct + right, seen + n
                yield
            if not per_iteration(self.settings):
                self.scheduler.step()
            entry = {
                "epoch": epoch,
                "iteration": self.iteration,
                "loss": float(np.mean(losses)) if losses else None,
                "train_acc": 100.0 * correct / max(seen, 1),
            }
            if self.settings.eval_every == 0:
                entry["select_acc"] = self._select(epoch)
            self.history.append(entry)
            if self.iteration >= self.total:
                break

    def _epoch(self, epoch: int) -> Iterator[tuple[float, int, int]]:
        """(loss, correct, images) per step of one epoch."""
        s = self.settings
        # the whole epoch's order up front (the same single permutation draw) so the next batch can be prefetched
        batches = list(
            epoch_batches(
                len(self.data.source),
                batch_size=s.batch_size,
                generator=self.generator,
                drop_last=s.drop_last,
                merge_singleton=s.merge_singleton,
            )
        )
        for i, positions in enumerate(batches):
            upcoming = batches[i + 1] if i + 1 < len(batches) and self.iteration + 1 < self.total else None
            loss, right = self._step(
                positions,
                self.sampler.views(epoch, positions),
                None if upcoming is None else (upcoming, self.sampler.views(epoch, upcoming)),
            )
            self.iteration += 1
            if per_iteration(s):
                self.scheduler.step()
            if s.eval_every and self.iteration % s.eval_every == 0:
                self.history.append(
                    {"epoch": epoch, "iteration": self.iteration, "select_acc": self._select(epoch)}
                )
            yield loss, right, len(positions)
            if self.iteration >= self.total:
                break

    def _step(
        self, positions: np.ndarray, views: np.ndarray, upcoming: tuple[np.ndarray, np.ndarray] | None
    ) -> tuple[float, int]:
        self.head.train()
        batch = self.data.source.batch(positions, views)
        if upcoming is not None and hasattr(self.data.source, "prefetch"):
            self.data.source.prefetch(*upcoming)  # streamed sources read it while this step computes
        x = {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}
        y = self.data.labels[torch.as_tensor(positions)].to(self.device)
        with torch.autocast("cuda", dtype=torch.float16, enabled=self.amp):
            outputs = self.head.outputs(x)
            loss = self.loss_fn(outputs, y, x)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
            self._clip()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self._clip()
            self.optimizer.step()
        return float(loss.detach()), correct_count(next(iter(outputs.values())).detach(), y)

    def _clip(self) -> None:
        if self.settings.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(self.head.parameters(), self.settings.grad_clip)

    def _select(self, epoch: int) -> float | None:
        if self.selector is None or self.settings.select == "last":
            return None
        acc = self.selector(self.head, self.device)
        if self.best is None or acc > self.best[0]:  # first strict maximum ([CODE] Tip main.py)
            self.best = (acc, epoch, self.iteration, _snapshot(self.head))
        return acc

    def finish(self) -> TrainResult:
        self.head.eval()
        if self.best is None:
            last = self.epochs - 1 if self.settings.trains else -1
            return TrainResult(self.head, last, self.iteration, None, self.history)
        acc, epoch, iteration, state = self.best
        self.head.load_state_dict(state, strict=False)
        return TrainResult(self.head, epoch, iteration, acc, self.history)


def _snapshot(head: Head) -> dict[str, torch.Tensor]:
    """Copies of what training can change: trainable parameters and buffers (not frozen encoders)."""
    trainable = {name for name, p in head.named_parameters() if p.requires_grad}
    buffers = {name for name, _ in head.named_buffers()}
    return {k: v.detach().clone() for k, v in head.state_dict().items() if k in trainable or k in buffers}
