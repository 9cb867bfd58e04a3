"""Which image, which cached view, in which batch: every draw comes from a passed ``torch.Generator``."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch


class ViewSampler:
    """One augmented view per image per epoch (METHODS §1.6).

    [PROPOSED] Image ``i`` in epoch ``e`` uses view ``1 + ((e + o_i) mod (V - 1))`` with a seeded
    per-image offset ``o_i``: every view is used once before any repeats, like fresh augmentation
    when ``V - 1 >= epochs``. View 0 (the center crop) is never a training view unless ``V == 1``.
    """

    def __init__(self, num_images: int, num_views: int, *, generator: torch.Generator) -> None:
        self.num_views = num_views
        span = max(num_views - 1, 1)
        self.offsets = torch.randint(0, span, (num_images,), generator=generator).numpy()

    def views(self, epoch: int, positions: np.ndarray) -> np.ndarray:
        """View index for each split position in ``positions`` at ``epoch``."""
        if self.num_views == 1:
            return np.zeros(len(positions), dtype=np.int64)
        return 1 + (epoch + self.offsets[positions]) % (self.num_views - 1)


def epoch_batches(
    num_images: int,
    *,
    batch_size: int,
    generator: torch.Generator,
    shuffle: bool = True,
    drop_last: bool = False,
    merge_singleton: bool = False,
) -> Iterator[np.ndarray]:
    """Split positions of one epoch in batches (a fresh permutation per call when ``shuffle``)."""
    order = torch.randperm(num_images, generator=generator).numpy() if shuffle else np.arange(num_images)
    starts = list(range(0, num_images, batch_size))
    if drop_last and num_images % batch_size and len(starts) > 1:
        starts = starts[:-1]
    if merge_singleton and len(starts) > 1 and num_images - starts[-1] == 1:
        starts = starts[:-1]  # the last batch swallows the lone image
    for i, start in enumerate(starts):
        stop = starts[i + 1] if i + 1 < len(starts) else (start + batch_size if drop_last else num_images)
        yield order[start : min(stop, num_images)]


def batches_per_epoch(num_images: int, *, batch_size: int, drop_last: bool, merge_singleton: bool) -> int:
    full, rest = divmod(num_images, batch_size)
    if rest and drop_last and full:
        return full
    if rest == 1 and merge_singleton and full:
        return full
    return full + (1 if rest else 0)
