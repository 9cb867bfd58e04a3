"""Run a head over a whole split in batches (no gradients, eval mode) and score it."""

from __future__ import annotations

import numpy as np
import torch

from .metrics import Metrics, score

EVAL_BATCH = 1024
"""Images per forward pass at evaluation; pooled features are small, heavy maps stream."""


@torch.no_grad()
def predict(
    head, source, *, device: torch.device | str = "cpu", batch_size: int | None = None
) -> dict[str, torch.Tensor]:
    """``{head name: logits [N, C]}`` for every image of ``source`` on its center view (view 0).

    ``batch_size`` defaults to the head's ``eval_batch_size`` if it has one (heads on heavy maps), else ``EVAL_BATCH``.
    """
    batch_size = batch_size or getattr(head, "eval_batch_size", EVAL_BATCH)
    was_training = head.training
    head.eval()
    chunks: dict[str, list[torch.Tensor]] = {}
    try:
        for start in range(0, len(source), batch_size):
            positions = np.arange(start, min(start + batch_size, len(source)))
            x = {k: v.to(device) for k, v in source.batch(positions).items()}
            for name, logits in head.outputs(x).items():
                chunks.setdefault(name, []).append(logits.float().cpu())
    finally:
        head.train(was_training)
    return {name: torch.cat(parts) for name, parts in chunks.items()}


def evaluate(
    head, source, labels: torch.Tensor, *, num_classes: int, device: torch.device | str = "cpu"
) -> dict[str, Metrics]:
    """Metrics of every head of ``head`` on the split behind ``source``."""
    return {
        name: score(logits, labels, num_classes=num_classes)
        for name, logits in predict(head, source, device=device).items()
    }
