"""LDC's modules (METHODS §2.6): MAF adapters and fusion, the MAF head, ICD, ALF, and the β search.

Each module is its equation and nothing else, so a test can check it on hand-made tensors; the
method (``ldc.py``) wires them to cached taps. [CODE] LiShuo1001/LDC ``clip_ldc/model.py``
(``ModifiedResNet.adapter``, ``VisionTransformer.adapter``, ``CLIP.adapter``, ``CLIP.my_forward``)
and ``ldc_train.py`` (``Eval.search_hp``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from torch import nn

from .ldc_adapter import ConvAdapter
from .ldc_fused import FusedConvAdapter

Fuse = Literal["wf", "mean", "lf"]
WF_WEIGHTS = (0.1, 0.2, 0.3, 0.4)
"""[CODE] ``fuse_type=2``: fixed weights of levels 1..4 (the setting of every reported result)."""
VIT_MAF_HIDDEN = 2048
"""[CODE] ViT ``adapter_mlp``: Linear(output_dim → 2048) is hard-coded, whatever the width."""


def mlp(d_in: int, d_hidden: int, d_out: int) -> nn.Sequential:
    """``Linear(nb) → BN1d → ReLU → Linear(nb)``: the shape of every LDC MLP (MAF head, ICD, ALF gate, LF)."""
    return nn.Sequential(
        nn.Linear(d_in, d_hidden, bias=False),
        nn.BatchNorm1d(d_hidden),
        nn.ReLU(inplace=True),
        nn.Linear(d_hidden, d_out, bias=False),
    )


# ---------------------------------------------------------------------------- MAF: adapters


class TokenAdapter(nn.Module):
    """ViT adapter ``A^k = PatchMean(ReLU(LayerNorm(Linear(x_k))))``: ``[B, L, W] → [B, W]``.

    The mean runs over all L tokens, CLS included ([CODE] ``PatchMean(dim=1)``). With
    ``mean_tokens=False`` (LDC-lite) the input is already a token mean ``[B, W]``.
    """

    def __init__(self, width: int, *, mean_tokens: bool = True) -> None:
        super().__init__()
        self.linear = nn.Linear(width, width, bias=False)
        self.norm = nn.LayerNorm(width)  # [CODE] clip LayerNorm computes in fp32; so does autocast
        self.mean_tokens = mean_tokens

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.norm(self.linear(x)))
        return y.mean(dim=-2) if self.mean_tokens else y


def fuse_levels(levels: Sequence[torch.Tensor], how: Fuse) -> torch.Tensor:
    """WF ``Σ w_k A^k`` with ``w = (0.1, 0.2, 0.3, 0.4)`` or the plain mean of the four adapted levels."""
    if how == "wf":
        return sum(w * a for w, a in zip(WF_WEIGHTS, levels, strict=True))
    if how == "mean":
        return sum(levels) / 4.0
    raise ValueError(f"fuse_levels takes wf or mean, not {how!r} (lf concatenates pooled levels)")


# ---------------------------------------------------------------------------- MAF: fused embedding z^e


class FrozenProjection(nn.Module):
    """ViT's frozen ``proj`` ``[W, D]`` as a module: ``x @ proj`` (no ``ln_post``, [CODE] ``x6 @ self.proj``)."""

    def __init__(self, proj: torch.Tensor) -> None:
        super().__init__()
        self.weight = nn.Parameter(proj.detach().float().clone(), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight


class _MultiLevel(nn.Module):
    """Keeps the frozen pooling in eval mode whatever mode the head is put in."""

    frozen: nn.Module

    def train(self, mode: bool = True) -> _MultiLevel:
        super().train(mode)
        self.frozen.eval()
        return self


class RNMultiLevel(_MultiLevel):
    """``z^e`` from RN maps layer1..4: four :class:`ConvAdapter`, WF/mean then the frozen attnpool, or LF.

    LF: ``z^e = MLP_LF([P(A¹x1); …; P(A⁴x4)])`` with MLP_LF = ``mlp(4D, c4, D)`` ([CODE] RN50: 4096→2048→1024).
    ``frozen`` is the backbone's attention pooling; it takes no gradient step, but gradients flow through it.
    """

    def __init__(
        self,
        channels: Sequence[int],
        sides: Sequence[int],
        *,
        attnpool: nn.Module,
        embed_dim: int,
        fuse: Fuse = "wf",
        pre_pooled: bool = False,
        fused: bool = False,
    ) -> None:
        super().__init__()
        out_channels, grid = channels[-1], sides[-1]
        pools = [1 if pre_pooled else side // grid for side in sides]
        # fused: same parameters and state_dict, tile-by-tile kernel (ldc_fused.py)
        adapter_cls = FusedConvAdapter if fused else ConvAdapter
        self.adapters = nn.ModuleList(
            adapter_cls(c, out_channels, pool=p) for c, p in zip(channels, pools, strict=True)
        )
        self.fuse = fuse
        self.lf = mlp(4 * embed_dim, out_channels, embed_dim) if fuse == "lf" else None
        self.frozen = freeze(attnpool)

    def forward(self, maps: Sequence[torch.Tensor]) -> torch.Tensor:
        adapted = [adapter(x) for adapter, x in zip(self.adapters, maps, strict=True)]  # 4 × [B, c4, g, g]
        if self.lf is not None:
            return self.lf(torch.cat([self.frozen(a) for a in adapted], dim=1))  # [B, 4D] → [B, D]
        return self.frozen(fuse_levels(adapted, self.fuse))  # [B, D]


class ViTMultiLevel(_MultiLevel):
    """``z^e`` from ViT blocks 6, 8, 10, 12: four :class:`TokenAdapter`, WF/mean or LF, then ``@ proj``.

    LF: ``mlp(4W, W, W)`` on ``[A¹; …; A⁴]`` before the projection ([CODE] ``adapter_weight``).
    """

    def __init__(
        self, width: int, *, proj: torch.Tensor, fuse: Fuse = "wf", pre_pooled: bool = False
    ) -> None:
        super().__init__()
        self.adapters = nn.ModuleList(TokenAdapter(width, mean_tokens=not pre_pooled) for _ in range(4))
        self.fuse = fuse
        self.lf = mlp(4 * width, width, width) if fuse == "lf" else None
        self.frozen = FrozenProjection(proj)

    def forward(self, blocks: Sequence[torch.Tensor]) -> torch.Tensor:
        adapted = [adapter(x) for adapter, x in zip(self.adapters, blocks, strict=True)]  # 4 × [B, W]
        fused = self.lf(torch.cat(adapted, dim=1)) if self.lf is not None else fuse_levels(adapted, self.fuse)
        return self.frozen(fused)  # [B, D]


def freeze(module: nn.Module) -> nn.Module:
    """``module`` in eval mode with every parameter out of the optimiser's reach (gradients still flow through)."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


# ---------------------------------------------------------------------------- ICD and ALF


class ICD(nn.Module):
    """Inter-class deconfusion: ``s^ICD = s^ZS + A3(A1(s^ZS) + A2(z^e))`` ([CODE] ``my_forward``, additive sign)."""

    def __init__(self, num_classes: int, embed_dim: int) -> None:
        super().__init__()
        self.a1 = mlp(num_classes, embed_dim, embed_dim)
        self.a2 = mlp(embed_dim, embed_dim, embed_dim)
        self.a3 = mlp(embed_dim, embed_dim, num_classes)

    def forward(self, s_zs: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        return s_zs + self.a3(self.a1(s_zs) + self.a2(z))  # [B, C]; z is the un-normalised z^e


class ALF(nn.Module):
    """Adaptive logits fusion: ``w = σ(mlp(z^e))``, ``s^ALF = w·s^MAF + (1 − w)·s^ICD`` ([CODE] ``g_weight``)."""

    def __init__(self, embed_dim: int) -> None:
        super().__init__()
        self.gate = mlp(embed_dim, embed_dim, 1)

    def weight(self, z: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.gate(z))  # [B, 1]

    def forward(self, s_maf: torch.Tensor, s_icd: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        w = self.weight(z)
        return w * s_maf + (1 - w) * s_icd


# ---------------------------------------------------------------------------- β search


def beta_grid(steps: int = 50) -> list[float]:
    """``[i / steps for i in 0..steps]``: 0, 0.02, …, 1.0 for ``steps=50`` ([CODE] ``search_hp``)."""
    return [i * 1.0 / steps for i in range(steps + 1)]


def fuse_beta(s_maf: torch.Tensor, s_icd: torch.Tensor, beta: float | torch.Tensor) -> torch.Tensor:
    """``β·s^MAF + (1 − β)·s^ICD`` ([CODE] ``Eval.fuse_logits``)."""
    return beta * s_maf + (1 - beta) * s_icd


@torch.no_grad()
def search_beta(
    s_maf: torch.Tensor, s_icd: torch.Tensor, labels: torch.Tensor, *, steps: int = 50
) -> tuple[float, float]:
    """(β, accuracy %) of the first strict maximum over :func:`beta_grid`.

    [CODE] ``Eval.search_hp``: starts from β = 0 and accuracy 0 and keeps a β only if it is strictly
    better, so ties go to the smallest β and a split where nothing is right keeps β = 0.
    """
    best_beta, best_correct = 0.0, 0
    labels = labels.to(s_maf.device)
    for beta in beta_grid(steps):
        correct = int((fuse_beta(s_maf, s_icd, beta).argmax(dim=-1) == labels).sum())
        if correct > best_correct:
            best_beta, best_correct = beta, correct
    return best_beta, 100.0 * best_correct / max(len(labels), 1)
