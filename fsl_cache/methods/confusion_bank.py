"""CAPT-C's Confusion Bank (METHODS §2.9.3 step 1) and the retrieval of confusing samples from it (step 3).

[PROPOSED] The official code keeps per-class image lists with no confusion statistics; the bank here
is the paper's C×C table built from cached train views: hard counts ``N[y, c]``, soft scores
``S[y, c]`` and the cell lists of misclassified (image, view) entries, plus each class's top
confusable classes ``N_K(c)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class ConfusionBank:
    """Confusion statistics of ``M = N·V`` train views (entry ``m`` = image ``img[m]``, view ``view[m]``)."""

    counts: torch.Tensor
    """``N[y, c]`` int64 ``[C, C]``: views of class ``y`` predicted ``c ≠ y`` (diagonal 0)."""
    soft: torch.Tensor
    """``S[y, c]`` float ``[C, C]``: summed softmax mass of views of ``y`` on ``c ≠ y`` (diagonal 0)."""
    true: torch.Tensor
    """``[M]`` label of each entry."""
    pred: torch.Tensor
    """``[M]`` predicted class of each entry."""
    img: torch.Tensor
    """``[M]`` train image (split position) of each entry."""
    view: torch.Tensor
    """``[M]`` cached view index of each entry."""

    def cell(self, y: int, c: int) -> list[tuple[int, int]]:
        """``cell[y][c]``: the (image, view) entries of class ``y`` predicted ``c``."""
        hit = torch.nonzero((self.true == y) & (self.pred == c) & (self.true != self.pred)).flatten()
        return [(int(self.img[m]), int(self.view[m])) for m in hit]

    def to_json(self, classnames=None, *, top: int = 5) -> dict:
        """Summary for the run record: misclassified views and the most populated cells."""
        off = self.counts.clone()
        flat = torch.argsort(off.flatten(), descending=True, stable=True)[:top]
        c = off.shape[0]
        cells = [
            {"true": int(i) // c, "pred": int(i) % c, "count": int(off.flatten()[i])}
            for i in flat
            if off.flatten()[i] > 0
        ]
        if classnames is not None:
            for cell in cells:
                cell["true_name"], cell["pred_name"] = classnames[cell["true"]], classnames[cell["pred"]]
        return {"views": int(self.true.numel()), "misclassified": int(self.counts.sum()), "top_cells": cells}


def build_bank(logits: torch.Tensor, labels: torch.Tensor) -> ConfusionBank:
    """The bank from per-view logits ``[N, V, C]`` of train images with ``labels`` ``[N]``."""
    n, v, c = logits.shape
    labels = labels.long()
    pred = logits.argmax(dim=-1)  # [N, V]
    probs = logits.float().softmax(dim=-1)  # [N, V, C]
    true = labels[:, None].expand(n, v)
    wrong = pred != true
    counts = torch.bincount((true * c + pred)[wrong], minlength=c * c).reshape(c, c)
    soft = torch.zeros(c, c).index_add_(0, labels, probs.sum(dim=1))
    soft.fill_diagonal_(0.0)
    img = torch.arange(n)[:, None].expand(n, v)
    view = torch.arange(v)[None, :].expand(n, v)
    return ConfusionBank(counts, soft, true.reshape(-1), pred.reshape(-1), img.reshape(-1), view.reshape(-1))


def confusable_classes(
    counts: torch.Tensor, soft: torch.Tensor, text: torch.Tensor, *, k: int
) -> torch.Tensor:
    """``N_K(c)`` ``[C, k]``: top-``k`` of ``N[c,·] + N[·,c]``; ties and fill by ``S`` (symmetric), then by ``W Wᵀ``.

    ``k`` is capped at ``C − 1``. Rows with no statistics (novel classes) come from text similarity alone.
    """
    c = counts.shape[0]
    k = min(k, c - 1)
    hard = (counts + counts.T).double().numpy()
    soft_sym = (soft + soft.T).double().numpy()
    sim = (text @ text.T).double().numpy()
    out = np.empty((c, k), dtype=np.int64)
    for row in range(c):
        others = np.array([j for j in range(c) if j != row])
        # np.lexsort sorts by the last key first: count, then soft score, then text similarity (all descending)
        order = np.lexsort((-sim[row, others], -soft_sym[row, others], -hard[row, others]))
        out[row] = others[order[:k]]
    return torch.from_numpy(out)


def retrieve(
    f_hat: torch.Tensor,
    anchor: torch.Tensor,
    confusers: torch.Tensor,
    weights: torch.Tensor,
    *,
    keys: torch.Tensor,
    true: torch.Tensor,
    pred: torch.Tensor,
    img: torch.Tensor,
    class_mean: torch.Tensor,
    k: int,
    tau: float,
    image_id: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """SAM retrieval: ``r̄`` ``[B, D]`` from the most similar confusing bank entries, and the chosen entries ``[B, k]``.

    Candidates of query ``i``: misclassified entries of the cells ``(ĉ, c_k)`` and ``(c_k, ĉ)``
    (``anchor`` ``[B]`` = ĉ, ``confusers`` ``[B, K_s]`` = c_k), **never a view of image ``image_id[i]``**
    (train queries). Top-``k`` by ``f̂_i·key``; ``r̄ = Σ softmax(S/τ)·key``. A query without candidates
    falls back to ``normalize(Σ_k ω_k mean[c_k])`` (class means of the confusers); its entries are -1.
    """
    b, m = f_hat.shape[0], keys.shape[0]
    chosen = torch.full((b, k), -1, dtype=torch.long, device=f_hat.device)
    fallback = F.normalize((weights[..., None] * class_mean[confusers]).sum(dim=1), dim=-1)  # [B, D]
    if m == 0:
        return fallback, chosen
    sel = torch.zeros(b, class_mean.shape[0], dtype=torch.bool, device=f_hat.device)
    sel.scatter_(1, confusers, True)  # [B, C]
    wrong = (true != pred)[None, :]
    forward_cell = (true[None, :] == anchor[:, None]) & sel.gather(1, pred[None, :].expand(b, m))
    reverse_cell = (pred[None, :] == anchor[:, None]) & sel.gather(1, true[None, :].expand(b, m))
    mask = wrong & (forward_cell | reverse_cell)  # [B, M]
    if image_id is not None:
        mask &= img[None, :] != image_id[:, None]
    sim = f_hat @ keys.T  # [B, M]
    top = min(k, m)
    score, idx = sim.masked_fill(~mask, float("-inf")).topk(top, dim=-1)  # [B, top]
    valid = torch.isfinite(score)
    attn = (score / tau).masked_fill(~valid, float("-inf"))
    found = valid.any(dim=-1)
    attn = torch.where(found[:, None], attn, torch.zeros_like(attn)).softmax(dim=-1) * valid
    r_bar = (attn[..., None] * keys[idx]).sum(dim=1)  # [B, D]
    chosen[:, :top] = torch.where(valid, idx, torch.full_like(idx, -1))
    return torch.where(found[:, None], r_bar, fallback), chosen
