"""A split as a fit sees it: rows of a store pool, their labels and their indices in the dataset split."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class SplitRef:
    """The images of one split a fit uses: rows of a store pool, their labels and split indices."""

    name: str
    """``train``, ``val`` or ``test``."""
    pool: str
    """Store pool holding the images, e.g. ``train_pool`` or ``val_full``."""
    rows: np.ndarray
    """Rows in the pool, in split order (int64)."""
    labels: torch.Tensor
    """Class index per image (int64)."""
    split_index: np.ndarray
    """Index of each image in the dataset's split list (what the run record stores)."""

    def __len__(self) -> int:
        return len(self.rows)
