"""LDC's RN adapter as plain modules (the reference the fused kernel in ``ldc_fused.py`` must equal)."""

from __future__ import annotations

from torch import nn


class ConvAdapter(nn.Sequential):
    """RN adapter ``A^k = AvgPool_s(ReLU(BN2d(Conv1×1(x_k))))`` mapping ``[B, c_k, H_k, W_k]`` to layer4's grid.

    ``pool`` is the side ratio to layer4 (RN50: 8, 4, 2, 1); ``pool=1`` (layer4, or LDC-lite's
    pre-pooled maps) has no pooling.
    """

    def __init__(self, in_channels: int, out_channels: int, *, pool: int) -> None:
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.AvgPool2d(pool) if pool > 1 else nn.Identity(),
        )
